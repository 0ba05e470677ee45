"""Layer 6 — pruning transforms: optax gradient transformations that prune while training.

Two shapes of transform, one rule for both — the transform enforces its masks itself by emitting
``where(mask, u, -p)``, so that ``optax.apply_updates`` lands every pruned weight on exactly 0:

* **A wrapper** (every transform with ``inner_tx``: :func:`magnitude_pruning`,
  :func:`random_pruning` and :func:`pruning` take it, :func:`saliency_pruning` and
  :func:`movement_pruning` need it) is the whole optimizer, so it cannot be misplaced — the form
  to use: it sees the raw gradients (which gradient criteria need), gives the inner optimizer
  the gradients of the surviving weights only, and enforces the masks on what the inner
  optimizer returns, whatever that chain holds (clipping, ``reduce_on_plateau``...)::

      tx = jp.magnitude_pruning(schedule, update_every=100, inner_tx=optax.chain(
          optax.clip_by_global_norm(1.0), optax.adamw(1e-3), reduce_on_plateau()))

* **A chain link** (:func:`magnitude_pruning`, :func:`random_pruning`, :func:`pruning` without
  ``inner_tx``) goes **last** in ``optax.chain``, after learning-rate scaling::

      tx = optax.chain(optax.adamw(1e-3), jp.magnitude_pruning(schedule, update_every=100))

  Anything after it would rescale the ``-p`` that zeroes a pruned weight.

Either form checks, at the next update, that the weights it pruned are exactly 0 in the params
it receives, and raises with the fix when they are not (something after it changed its update;
see ``jaxprune/_transform_utils.py`` for how the check stays free on the other steps).

Masks are recomputed every ``update_every`` steps inside ``lax.cond`` and only shrink: weights
pruned earlier are scored lowest (NaN), so each prunable leaf (or all of them, with
``scope="global"``) holds exactly ``round(s·n)`` pruned weights while the schedule does not
decrease.

With ``straight_through=True`` the params stay dense and the masks are recomputed from scratch
at every update step (pruned weights can come back): apply them in the forward pass with
:func:`apply_masks_straight_through`, so that the pruned weights still receive (dense)
gradients.

**Non-finite params.** ``p + (-p)`` is NaN when ``p`` is ``inf`` or NaN, so a weight that is
non-finite when it is pruned stays NaN (masked: ``jp.apply_masks`` still zeroes it). The masks
stay exact: surviving weights with NaN scores are pruned right after the already-pruned ones,
so no step prunes more than ``round(s·n)``. To keep params finite, so that every pruned
weight is exactly 0, skip non-finite steps with ``optax.apply_if_finite`` around the whole
chain (it leaves params and the pruning state unchanged on such a step)::

    tx = optax.apply_if_finite(optax.chain(optax.adam(1e-3), jp.magnitude_pruning(schedule)),
                               max_consecutive_errors=5)

A traced sparsity (a schedule's value, an ``inject_hyperparams`` hyperparameter) that is NaN or
outside [0, 1], or that :func:`jaxprune.n_of_m` cannot give (a gradual ramp passes through
such values: use a schedule that jumps, e.g. :func:`jaxprune.one_shot_schedule`), raises when
the step runs: a ``jax.errors.JaxRuntimeError`` carrying the ``ValueError`` message (or a
``ValueError`` with it, when JAX's C++ dispatch fast path serves the call: jax-ml/jax#34083).

State is a :class:`PruningState` NamedTuple of fixed structure; :func:`masks_from_state` finds
the masks in any nested optax state and :func:`replace_masks` puts masks into one.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune import _state, _tree, stacking
from jaxprune import _transform_utils as _util
from jaxprune._select import elementwise
from jaxprune._typing import KeyLike, Masks, Params, Where
from jaxprune.masks import LayoutLike, topk_mask
from jaxprune.scores import magnitude_scores, movement_scores, random_scores, saliency_scores
from jaxprune.structure import Blocks, Channels, Structure, Unstructured

__all__ = [
    "PruningState", "pruning", "magnitude_pruning", "random_pruning", "saliency_pruning",
    "movement_pruning", "apply_masks_straight_through", "masks_from_state", "replace_masks",
]

ScoreFn = Callable[..., Any]

_NEVER = 2**31 - 1  # end_step=None: masks are updated for the whole training

class PruningState(NamedTuple):
  """State of the transforms built by :func:`pruning` (and the named pruning transforms)."""
  count: jax.Array          # int32 scalar: updates seen so far.
  masks: optax.Params       # bool keep-masks shaped like the params (scalar True if unpruned).
  scores: optax.Params      # accumulated scores (float32) when the criterion accumulates,
                            # else optax.EmptyState().
  inner_state: optax.OptState  # the wrapped optimizer's state, or optax.EmptyState().


def _nan_pruned(scores, masks, chosen, structure=None):
  """Scores with already-pruned weights set to NaN: pruned first, so masks only shrink.

  A surviving weight whose score is NaN (non-finite training) would tie with them and could
  push one of them out of the pruned set, so that the AND with the old masks pruned more than
  ``round(s·n)``. Its score becomes ``-inf`` instead: below every number, above the pruned. For
  channels and blocks it becomes 0, the least an element adds to a channel's norm (``-inf``
  would make the norm ``inf``).
  """
  units = isinstance(structure, (Channels, Blocks))
  treedef = jax.tree.structure(scores)
  m_leaves = treedef.flatten_up_to(masks)
  out = [_nan_unless_kept(m, s, units) if c else s
         for m, s, c in zip(m_leaves, jax.tree.leaves(scores), chosen, strict=True)]
  return jax.tree.unflatten(treedef, out)


def _nan_unless_kept(m, s, units=False):
  """One leaf of :func:`_nan_pruned`."""
  live_nan = jnp.zeros((), s.dtype) if units else jnp.full((), -jnp.inf, s.dtype)
  return jnp.where(m, jnp.where(jnp.isnan(s), live_nan, s), jnp.full((), jnp.nan, s.dtype))


def _magnitude_unless_pruned(m, p):
  """``_nan_pruned``'s scores of magnitude pruning, elementwise (for unstructured masks)."""
  return _nan_unless_kept(m, jnp.abs(p))


def _lazy_magnitude_scores(masks, params, chosen):
  """:func:`_nan_pruned` of the magnitude scores, as scores the selection computes where it
  uses them (``_select.elementwise``): no tree of them exists in the step."""
  treedef = jax.tree.structure(params)
  out = [elementwise.Elementwise(_magnitude_unless_pruned, m, p) if c else p
         for m, p, c in zip(treedef.flatten_up_to(masks), jax.tree.leaves(params), chosen,
                            strict=True)]
  return jax.tree.unflatten(treedef, out)


def _and(a, b):
  return jax.tree.map(jnp.logical_and, a, b)


def _accumulate(acc, step_scores, chosen):
  treedef = jax.tree.structure(acc)
  steps = treedef.flatten_up_to(step_scores)
  out = [a + s.astype(jnp.float32) if c else a
         for a, s, c in zip(jax.tree.leaves(acc), steps, chosen, strict=True)]
  return jax.tree.unflatten(treedef, out)


def _score_with(accumulated, params, chosen):
  """The accumulated scores on chosen leaves, the params elsewhere (a tree like params)."""
  treedef = jax.tree.structure(params)
  out = [a if c else p for a, p, c in
         zip(treedef.flatten_up_to(accumulated), jax.tree.leaves(params), chosen, strict=True)]
  return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- generic


@functools.lru_cache(maxsize=128)
def _masks_fn(score_fn, structure, scope, distribution, where, accumulate, straight_through,
              layout, name, stacked=None):
  """The jitted mask update of :func:`pruning` for one static configuration.

  Cached, so that eager (un-jitted) training steps reuse one compilation, also when
  ``inject_hyperparams`` rebuilds the transform at every step; inside a jitted step it is
  simply inlined. On check steps (see :func:`_transform_utils.check_step`) it also checks that
  the previous masks' pruned weights are 0 in ``params`` (not with ``straight_through``, whose
  params stay dense).
  """
  @jax.jit
  def new_masks(updates, masks, acc, params, count, s, key_t, every, end):
    paths, chosen, where_p = _util.selection(params, where)
    chosen_paths = [p for p, c in zip(paths, chosen) if c]

    def step_scores():
      return score_fn(params, grads=updates, key=key_t, where=where_p)

    if accumulate:
      acc = _accumulate(acc, step_scores(), chosen)

    def recompute(masks):
      if (score_fn is _magnitude and not (accumulate or straight_through)
          and (structure is None or isinstance(structure, Unstructured))):
        scores = _lazy_magnitude_scores(masks, params, chosen)
      else:
        scores = _score_with(acc, params, chosen) if accumulate else step_scores()
        if not straight_through:
          scores = _nan_pruned(scores, masks, chosen, structure)
      alloc = _util.allocate(params, s, distribution, where_p, stacked)
      new = topk_mask(scores, alloc, structure=structure, scope=scope, where=where_p,
                      stacked=stacked, layout=layout)
      return new if straight_through else _and(new, masks)

    def check(masks):
      bad, pruned = _util.nonzero_pruned(masks, params, chosen)
      return _util.check_misplaced(name, chosen_paths, bad, pruned, count)

    def keep(masks):
      return masks

    is_update = (count % every == 0) & (count < end)
    if straight_through:
      return lax.cond(is_update, recompute, keep, masks), acc
    # step 0 updates without a check: there is nothing to check yet
    guarded_check = lambda m: lax.cond(count > 0, check, lambda m: jnp.zeros((), jnp.int32), m)
    return _util.check_or_update(is_update, _util.check_step(count, every, end), keep,
                                 guarded_check, recompute, masks), acc

  return new_masks


def pruning(score_fn: ScoreFn, sparsity: optax.ScalarOrSchedule, *,
            inner_tx: optax.GradientTransformation | None = None, update_every: int = 1,
            end_step: int | None = None, structure: Structure | None = None,
            scope: str = "layerwise", distribution: str = "uniform",
            where: Where | None = None, accumulate: bool = False,
            straight_through: bool = False, key: KeyLike = None,
            stacked: stacking.Stacked = None,
            layout: LayoutLike = None) -> optax.GradientTransformationExtraArgs:
  """Prunes by any score while training; the named pruning transforms are thin wrappers of it.

  Every ``update_every`` steps (step 0 included) the masks are recomputed from
  ``score_fn(params, grads=..., key=..., where=...)`` with ``topk_mask`` at the sparsity the
  schedule gives for this step; weights pruned earlier score NaN (lowest), so masks only shrink
  and the pruned count is exactly ``round(s·n)`` per leaf (or over all leaves with
  ``scope="global"``) as long as the schedule does not decrease.

  With ``inner_tx`` (the form that cannot be misplaced) it wraps that optimizer: ``grads`` is
  the raw gradient, the inner optimizer receives the gradients of the surviving weights only,
  and the masks are enforced on its output. Without ``inner_tx`` the transform is a chain link
  and must go **last** in ``optax.chain``; ``grads`` is then the update it receives. Either way,
  if the weights it pruned are not exactly 0 at a later update (a transformation after it
  changed its output), it raises an error that says how to fix the optimizer.

  Args:
    score_fn: ``(params, *, grads, key, where) -> scores`` (larger is kept); ``key`` is
      ``fold_in(key, count)``. Static: list it in ``static_args`` of ``inject_hyperparams``.
    sparsity: the fraction to remove: a number in [0, 1], a 0-d array (may be traced, e.g. by
      ``optax.inject_hyperparams``) or a schedule ``step -> sparsity`` (see
      :mod:`jaxprune.schedules`).
    inner_tx: the optimizer to wrap (for criteria that need raw gradients), or None.
    update_every: recompute masks when ``count % update_every == 0`` (may be traced).
    end_step: no mask update from this step on (None: for the whole training). Masks that only
      shrink do not change once the schedule is flat, so this mainly saves the work; with
      ``straight_through=True`` it freezes the masks for the last steps.
    structure: a structure from :mod:`jaxprune.structure` (default unstructured). Static.
    scope: ``"layerwise"`` or ``"global"``. Static.
    distribution: ``"uniform"`` (every prunable leaf gets ``s``) or ``"erk"`` (per-leaf ERK
      sparsities whose weighted mean is ``s``). Static.
    where: ``(path, leaf) -> bool`` choosing prunable leaves. Static.
    accumulate: if True, the masks use the running sum of the per-step scores since step 0
      (kept in ``state.scores``), as movement pruning does. Static.
    straight_through: if True, the params stay dense: updates pass through unchanged, masks are
      recomputed from scratch at each update step (pruned weights can return), and the
      training loop applies them in the forward pass with
      :func:`apply_masks_straight_through`. Static.
    key: a PRNG key or int seed for random scores (None: seed 0).
    stacked: the layer axis of leaves that stack several layers (``nnx.scan``), as in
      :func:`jaxprune.topk_mask`: each slice is allocated and counted as its own layer. Static.
    layout: the weights' input/output axes for structures made without an ``axis`` (see
      :func:`jaxprune.topk_mask`; default: by leaf name). Static.

  With ``optax.inject_hyperparams``, list ``score_fn`` and the integer arguments you pass
  (``update_every``, an int ``key``) in ``static_args``: inject_hyperparams would otherwise store
  ints as weakly typed arrays that come back strongly typed, and a jitted step would trace twice.
  ``sparsity`` (a number or schedule) is the hyperparameter to inject; pass
  ``hyperparam_dtype=jnp.float32`` for bfloat16 params, or it is rounded to bfloat16.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`PruningState`.

  Raises:
    jax.errors.JaxRuntimeError: (from the compiled step; ``ValueError`` from JAX's C++ fast
      path, jax-ml/jax#34083) at an update whose params have nonzero weights where the previous
      masks prune: the transform is misplaced (see above).

  Examples:
    >>> import jax.numpy as jnp, optax, jaxprune as jp
    >>> score = lambda params, *, grads, key, where: jp.magnitude_scores(params, where=where)
    >>> tx = optax.chain(optax.sgd(0.1), jp.pruning(score, 0.5))
    >>> params = {"w": jnp.array([[1., -2.], [3., 0.5]])}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([[ 0. , -2.1],
           [ 2.9,  0. ]], dtype=float32)
  """
  sched = _util.as_schedule(sparsity)
  _util.check_options(scope, distribution, update_every, structure)
  base_key = _util.as_key(key)
  where = stacking.where_for(where, stacked)  # stacked: the default rule judges each layer

  def init_fn(params):
    inner_state = inner_tx.init(params) if inner_tx is not None else optax.EmptyState()
    params = _util.model_params(params)
    if _util.is_placeholder(params):
      masks = jax.tree.map(lambda x: x, params)
      scores = jax.tree.map(lambda x: x, params) if accumulate else optax.EmptyState()
      return PruningState(jnp.zeros([], jnp.int32), masks, scores, inner_state)
    _, chosen, _ = _util.selection(params, where)
    masks = _util.ones_masks(params, chosen)
    scores = optax.EmptyState()
    if accumulate:
      treedef = jax.tree.structure(params)
      scores = jax.tree.unflatten(treedef, [
          jnp.zeros_like(x, dtype=jnp.float32) if c else jnp.zeros((), jnp.float32)
          for x, c in zip(jax.tree.leaves(params), chosen, strict=True)])
    return PruningState(jnp.zeros([], jnp.int32), masks, scores, inner_state)

  _tree.layout_fn(layout)  # validates it
  new_masks = _masks_fn(score_fn, structure, scope, distribution, where, accumulate,
                        straight_through, layout, _NAMES.get(score_fn, "pruning"),
                        stacking.freeze(stacked))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(_util.NO_PARAMS_MSG)
    model = _util.model_params(params)
    _, chosen, _ = _util.selection(model, where)
    count = state.count
    masks, acc = new_masks(updates, state.masks, state.scores, model, count, sched(count),
                           jax.random.fold_in(base_key, count),
                           jnp.asarray(update_every, jnp.int32),
                           jnp.asarray(_NEVER if end_step is None else end_step, jnp.int32))
    inner_state = state.inner_state
    if inner_tx is not None:
      grads_in = updates if straight_through else _util.mask_grads(masks, updates, chosen)
      updates, inner_state = optax.with_extra_args_support(inner_tx).update(
          grads_in, state.inner_state, params, **extra_args)
    if not straight_through:
      updates = _util.enforce_params(masks, updates, params, chosen)
    return updates, PruningState(optax.safe_increment(count), masks, acc, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- named criteria


def _magnitude(params, *, grads, key, where):
  del grads, key
  return magnitude_scores(params, where=where)


def _random(params, *, grads, key, where):
  del grads
  return random_scores(params, key, where=where)


def _saliency(params, *, grads, key, where):
  del key
  return saliency_scores(params, grads, where=where)


def _movement(params, *, grads, key, where):
  del key
  return movement_scores(params, grads, where=where)


def magnitude_pruning(sparsity: optax.ScalarOrSchedule, *,
                      inner_tx: optax.GradientTransformation | None = None,
                      update_every: int = 1,
                      end_step: int | None = None, structure: Structure | None = None,
                      scope: str = "layerwise", distribution: str = "uniform",
                      where: Where | None = None, straight_through: bool = False,
                      stacked: stacking.Stacked = None,
                      layout: LayoutLike = None) -> optax.GradientTransformationExtraArgs:
  """Magnitude pruning while training (gradual when ``sparsity`` is a schedule).

  Every ``update_every`` steps it keeps the largest ``|w|`` and makes every pruned weight land
  on exactly 0 (it emits ``where(mask, u, -p)``) and stay there. Masks only shrink.

  Give it the whole optimizer as ``inner_tx`` (the form that cannot be misplaced; whatever
  ``inner_tx`` does, e.g. clipping or ``reduce_on_plateau``, happens inside)::

    tx = jp.magnitude_pruning(0.9, inner_tx=optax.chain(optax.adamw(1e-3), reduce_on_plateau()))

  or use it as a chain link that goes **last** in ``optax.chain`` (after learning-rate
  scaling): ``optax.chain(optax.adamw(1e-3), jp.magnitude_pruning(0.9))``. A misplaced link
  (anything after it, or the link first) raises at its next check, saying how to fix it.

  Args:
    sparsity: a number in [0, 1], a 0-d array or a schedule (e.g.
      :func:`jaxprune.polynomial_schedule` for gradual pruning).
    inner_tx: the optimizer to wrap (None: a chain link).
    update_every: recompute masks every this many steps.
    end_step: no mask update from this step on (None: for the whole training).
    structure: :func:`jaxprune.unstructured` (default), ``n_of_m``, ``blocks``, ``channels``...
    scope: ``"layerwise"`` or ``"global"`` (one threshold over all prunable leaves).
    distribution: ``"uniform"`` or ``"erk"`` (layerwise only).
    where: ``(path, leaf) -> bool`` choosing prunable leaves (default: float, ``ndim >= 2``,
      not a bias or norm scale).
    straight_through: keep params dense and mask in the forward pass (see :func:`pruning`).
    stacked: the layer axis of stacked leaves (``nnx.scan``), as in :func:`jaxprune.topk_mask`.
    layout: the weights' input/output axes for ``n_of_m`` / ``channels`` made without an
      ``axis`` (see :func:`jaxprune.topk_mask`; default: by leaf name).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`PruningState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxprune as jp
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
    >>> tx = optax.chain(optax.adam(1e-2), jp.magnitude_pruning(
    ...     jp.polynomial_schedule(0.75, begin_step=0, end_step=4), update_every=2))
    >>> state = tx.init(params)
    >>> for _ in range(6):
    ...   updates, state = tx.update(params, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> float(jp.sparsity(params))
    0.75

    The wrapper form, with clipping inside:

    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
    >>> tx = jp.magnitude_pruning(0.5, inner_tx=optax.chain(optax.clip_by_global_norm(0.1),
    ...                                                     optax.sgd(1.0)))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> float(jp.sparsity(optax.apply_updates(params, updates)))
    0.5

  References:
    Zhu and Gupta, "To prune, or not to prune", 2017 (gradual magnitude pruning);
    Han et al., "Learning both Weights and Connections for Efficient Neural Networks", 2015.
  """
  return pruning(_magnitude, sparsity, inner_tx=inner_tx, update_every=update_every,
                 end_step=end_step, structure=structure, scope=scope,
                 distribution=distribution, where=where, straight_through=straight_through,
                 stacked=stacked, layout=layout)


def random_pruning(sparsity: optax.ScalarOrSchedule, *, key: KeyLike = None,
                   inner_tx: optax.GradientTransformation | None = None,
                   update_every: int = 1, end_step: int | None = None,
                   structure: Structure | None = None,
                   scope: str = "layerwise", distribution: str = "uniform",
                   where: Where | None = None, straight_through: bool = False,
                   stacked: stacking.Stacked = None,
  layout: LayoutLike = None) -> optax.GradientTransformationExtraArgs:
  """Random pruning while training: a baseline that removes random weights (a wrapper around
  ``inner_tx``, or a chain link that goes last).

  At each update step the scores are uniform noise from ``fold_in(key, count)``; weights pruned
  earlier stay pruned, so the masks only shrink.

  Args:
    sparsity: a number in [0, 1], a 0-d array or a schedule.
    key: a PRNG key or an int seed (None: seed 0).
    inner_tx, update_every, end_step, structure, scope, distribution, where, straight_through,
      stacked, layout: as in :func:`magnitude_pruning`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`PruningState`.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxprune as jp
    >>> tx = optax.chain(optax.sgd(0.1), jp.random_pruning(0.5, key=0))
    >>> params = {"w": jnp.ones((4, 4))}
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> float(jp.sparsity(optax.apply_updates(params, updates)))
    0.5

  References:
    Liu et al., "The Unreasonable Effectiveness of Random Pruning", ICLR 2022.
  """
  return pruning(_random, sparsity, key=key, inner_tx=inner_tx, update_every=update_every,
                 end_step=end_step, structure=structure, scope=scope,
                 distribution=distribution, where=where, straight_through=straight_through,
                 stacked=stacked, layout=layout)


def saliency_pruning(inner_tx: optax.GradientTransformation,
                     sparsity: optax.ScalarOrSchedule, *, update_every: int = 1,
                     end_step: int | None = None, structure: Structure | None = None,
                     scope: str = "layerwise", distribution: str = "uniform",
                     where: Where | None = None, straight_through: bool = False,
                     stacked: stacking.Stacked = None,
                     layout: LayoutLike = None) -> optax.GradientTransformationExtraArgs:
  """Saliency (first-order Taylor, ``|w·g|``) pruning while training, wrapping ``inner_tx``.

  The criterion needs the raw gradient, so this transform is the whole optimizer: it scores
  with the gradient it receives, hands the surviving weights' gradients to ``inner_tx`` and
  makes pruned weights land on exactly 0.

  Args:
    inner_tx: the optimizer (any optax transformation, learning rate included).
    sparsity: a number in [0, 1], a 0-d array or a schedule.
    update_every, end_step, structure, scope, distribution, where, straight_through, stacked,
      layout:
      as in :func:`magnitude_pruning`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`PruningState`.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxprune as jp
    >>> tx = jp.saliency_pruning(optax.sgd(0.1), 0.5)
    >>> params = {"w": jnp.array([[1., 2.], [3., 4.]])}
    >>> grads = {"w": jnp.array([[4., 0.1], [1., 1.]])}   # saliency 4, .2, 3, 4
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([[0.6, 0. ],
           [0. , 3.9]], dtype=float32)

  References:
    Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019;
    Lee et al., "SNIP: Single-shot Network Pruning based on Connection Sensitivity", ICLR 2019.
  """
  return pruning(_saliency, sparsity, inner_tx=inner_tx, update_every=update_every,
                 end_step=end_step, structure=structure, scope=scope,
                 distribution=distribution, where=where, straight_through=straight_through,
                 stacked=stacked, layout=layout)


def movement_pruning(inner_tx: optax.GradientTransformation,
                     sparsity: optax.ScalarOrSchedule, *, update_every: int = 1,
                     end_step: int | None = None, structure: Structure | None = None,
                     scope: str = "layerwise", distribution: str = "uniform",
                     where: Where | None = None, straight_through: bool = False,
                     stacked: stacking.Stacked = None,
                     layout: LayoutLike = None) -> optax.GradientTransformationExtraArgs:
  """Movement pruning, wrapping ``inner_tx``: keeps the weights moving away from zero.

  The score ``S = −Σ_t w_t·g_t`` is accumulated over every step in ``state.scores`` (float32) and
  the masks keep the highest ``S``. Sanh et al. train with a straight-through estimator; set
  ``straight_through=True`` for that (see :func:`apply_masks_straight_through`).

  Args:
    inner_tx: the optimizer (any optax transformation, learning rate included).
    sparsity: a number in [0, 1], a 0-d array or a schedule.
    update_every, end_step, structure, scope, distribution, where, straight_through, stacked,
      layout:
      as in :func:`magnitude_pruning`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`PruningState`.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxprune as jp
    >>> tx = jp.movement_pruning(optax.sgd(0.1), 0.5)
    >>> params = {"w": jnp.array([[1., 1.], [1., 1.]])}
    >>> grads = {"w": jnp.array([[1., -1.], [-2., 2.]])}   # -w*g: -1, 1, 2, -2
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> jp.masks_from_state(state)["w"]
    Array([[False,  True],
           [ True, False]], dtype=bool)

  References:
    Sanh, Wolf and Rush, "Movement Pruning: Adaptive Sparsity by Fine-Tuning", NeurIPS 2020.
  """
  return pruning(_movement, sparsity, inner_tx=inner_tx, update_every=update_every,
                 end_step=end_step, structure=structure, scope=scope,
                 distribution=distribution, where=where, accumulate=True,
                 straight_through=straight_through, stacked=stacked, layout=layout)


_NAMES = {_magnitude: "magnitude_pruning", _random: "random_pruning",
          _saliency: "saliency_pruning", _movement: "movement_pruning"}

# ----------------------------------------------------------------------------- straight-through


@jax.custom_vjp
def _ste(p, m):
  return jnp.where(m, p, jnp.zeros((), p.dtype))


def _ste_fwd(p, m):
  return _ste(p, m), m


def _ste_bwd(m, g):
  return g, np.zeros(np.shape(m), jax.dtypes.float0)


_ste.defvjp(_ste_fwd, _ste_bwd)


def apply_masks_straight_through(params: Params, masks: Masks) -> Params:
  """``apply_masks`` in the forward pass, identity in the backward pass.

  Pruned weights are 0 in the forward pass but receive the gradient of the masked weight, so a
  straight-through transform (``straight_through=True``) can bring them back when they grow.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> masks = {"w": jnp.array([True, False])}
    >>> loss = lambda p: jnp.sum(jp.apply_masks_straight_through(p, masks)["w"] * 3.)
    >>> jax.grad(loss)({"w": jnp.array([1., 2.])})["w"]
    Array([3., 3.], dtype=float32)
  """
  _tree.check_same_structure(params, masks, "params", "masks")
  treedef = jax.tree.structure(params)
  out = []
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True):
    if np.ndim(m) == 0 and np.ndim(p) > 0:  # the scalar mask of a leaf that is not pruned
      out.append(p)
    elif np.ndim(m) == 0 and not isinstance(m, jax.core.Tracer) and bool(m):
      out.append(p)
    else:
      out.append(_ste(p, jnp.broadcast_to(m, np.shape(p))))
  return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- state access

_is_pruning_state = _state.is_pruning_state  # kept for callers of the old private name


def masks_from_state(opt_state: Any) -> Masks:
  """The keep-masks held anywhere inside an optimizer state, as one tree like the params.

  Looks through ``optax.chain``, ``MultiSteps``, ``inject_hyperparams``, ``apply_if_finite``,
  ``lookahead``, ``masked``, ``multi_transform`` and other wrappers, and takes an
  ``nnx.Optimizer``, its ``opt_state`` or ``nnx.state(optimizer)`` as they are. If several
  jaxprune states are found (two pruning links on different leaves, one per
  ``multi_transform`` group, a link inside a wrapper), their masks are merged into one tree
  with the params' structure: the AND of the masks that cover a leaf, and scalar ``True`` for a
  leaf no transform prunes (the ``optax.MaskedNode`` holes of ``optax.masked`` are filled).

  The masks are always plain bool arrays: from an ``nnx.Optimizer`` (whose state leaves are
  Flax NNX ``Variable`` wrappers such as ``nnx.OptVariable``), the wrappers are removed and the
  containers kept, so the result is an ``nnx.State`` of arrays shaped like
  ``nnx.state(model, nnx.Param)``, ready for :func:`jaxprune.apply_masks`,
  :func:`jaxprune.summary` or :func:`replace_masks`.

  Raises:
    ValueError: if the state holds no jaxprune pruning state, or pruning states whose masks
      cover different trees.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxprune as jp
    >>> tx = optax.chain(optax.adam(1e-3), jp.magnitude_pruning(0.5))
    >>> params = {"w": jnp.array([[1., 2.], [3., 4.]])}
    >>> _, state = tx.update(params, tx.init(params), params)
    >>> jp.masks_from_state(state)["w"]
    Array([[False, False],
           [ True,  True]], dtype=bool)

    One pruning link per group of ``optax.multi_transform``, merged:

    >>> params = {"a": jnp.arange(1., 5.).reshape(2, 2), "b": jnp.arange(1., 7.).reshape(3, 2)}
    >>> tx = optax.multi_transform({"a": jp.magnitude_pruning(0.5), "b": jp.magnitude_pruning(0.)},
    ...                            {"a": "a", "b": "b"})
    >>> _, state = tx.update(params, tx.init(params), params)
    >>> print(jp.summary(params, jp.masks_from_state(state)))
    path   shape   kept  total  sparsity
    ------------------------------------
    a      (2, 2)     2      4    0.5000
    b      (3, 2)     6      6    0.0000
    ------------------------------------
    total             8     10    0.2000
  """
  return _state.masks_from_state(opt_state)


def replace_masks(opt_state: optax.OptState, masks: Masks) -> optax.OptState:
  """A copy of ``opt_state`` whose jaxprune pruning states hold ``masks`` (e.g. a lottery
  ticket's, to train the next round with them).

  ``masks`` is a tree like the params (as :func:`masks_from_state` returns it); each pruning
  state takes the masks of the leaves it covers (inside ``optax.masked`` the other leaves stay
  holes), and each leaf must have the shape of the mask it replaces (scalar ``True`` for
  unpruned leaves). ``nnx.state(optimizer)`` (pruning states as ``nnx.State`` mappings) works
  too.

  Each replaced mask keeps the wrapper it had in ``opt_state``: in an ``nnx.Optimizer``'s
  ``opt_state``, whose leaves are Flax NNX ``Variable`` wrappers (``nnx.OptVariable``), the new
  mask is the same ``Variable`` class with the same metadata and the new value, so the result
  goes wherever the original went and ``nnx.state(optimizer)`` keeps its structure:
  ``optimizer.opt_state = jp.replace_masks(optimizer.opt_state, masks)``, or in place
  ``nnx.update(optimizer.opt_state, nnx.state(jp.replace_masks(optimizer.opt_state, masks)))``.
  Masks given as ``Variable`` wrappers are unwrapped first. The result shares no ``Variable``
  with ``opt_state``.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxprune as jp
    >>> tx = optax.chain(optax.sgd(0.1), jp.magnitude_pruning(0.0))
    >>> params = {"w": jnp.array([[1., 2.], [3., 4.]])}
    >>> state = jp.replace_masks(tx.init(params), {"w": jnp.array([[True, False], [True, True]])})
    >>> updates, state = tx.update(params, state, params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([[0.9, 0. ],
           [2.7, 3.6]], dtype=float32)
  """
  return _state.replace_masks(opt_state, masks)
