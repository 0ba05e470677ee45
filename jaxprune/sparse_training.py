"""Layer 6 — sparse training that changes its connectivity: SET and RigL.

Both keep every prunable leaf at exactly its target sparsity from the first step to the last,
and every ``update_every`` steps (until ``end_step``) move some connections: they drop the
``k`` active weights of smallest magnitude and grow ``k`` others, ``k = ⌊f(t) · n_active⌋``
with the cosine-decayed drop fraction ``f(t) = α/2 · (1 + cos(π t / end_step))``.
SET grows at random; RigL grows where the dense gradient is largest.

They wrap the optimizer (``inner_tx``, any optax transformation: adam, lion, adafactor, an
``inject_hyperparams``-wrapped one...), because RigL needs the raw dense gradient and because
a grown connection must start from a fresh optimizer state: its entries in every part of the
inner state shaped like the params (moments, traces, accumulators), found generically with
``optax.tree.map_params``, are reset to 0 *before* the step's inner update, which sees a zero
gradient for it (the inner optimizer only sees the gradients of connections active before and
after the step). So right after growing, a connection's state is what the optimizer makes of a
zero state and a zero gradient: exactly 0 for adam, SGD momentum, RMSProp, Lion and the like;
Adafactor's unfactored second moment holds its ``(1 - decay) · eps`` (about 4e-31). Grown weights
start at exactly 0 whatever the optimizer. (Resetting after the inner update instead would split
adam's fused update and make XLA copy every moment leaf at every step: RigL without an update
cost 4.7x a plain adam step on the half-width GPT-2 tree, 2.1x this way; docs/model_scale.md.)

The initial connectivity is random with exactly the target sparsity per leaf (ERK by default).
The first update zeroes the inactive weights; to start from the sparse point, apply the masks
to the params after ``init``: ``params = jp.apply_masks(params, jp.masks_from_state(state))``.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import _checks, _tree, allocation
from jaxprune import _transform_utils as _util
from jaxprune._select import lowest_each
from jaxprune._typing import KeyLike, PyTree, Where
from jaxprune.allocation import erk_sparsities
from jaxprune.masks import topk_mask
from jaxprune.scores import random_scores

__all__ = ["SparseTrainingState", "rigl", "set_training", "cosine_drop_fraction",
           "reset_inner_state"]


class SparseTrainingState(NamedTuple):
  """State of :func:`rigl` and :func:`set_training`."""
  count: jax.Array             # int32 scalar: updates seen so far.
  masks: optax.Params          # bool keep-masks shaped like the params (scalar True if unpruned).
  inner_state: optax.OptState  # the wrapped optimizer's state.


def cosine_drop_fraction(drop_fraction: float | jax.Array,
                         end_step: int | jax.Array) -> optax.Schedule:
  """``α/2 · (1 + cos(π t / end_step))`` for ``t < end_step``, then 0 (RigL's decay).

  Examples:
    >>> import jaxprune as jp
    >>> f = jp.cosine_drop_fraction(0.3, end_step=100)
    >>> [round(float(f(t)), 4) for t in (0, 50, 100)]
    [0.3, 0.15, 0.0]
  """
  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    end = jnp.asarray(end_step, jnp.float32)
    f = 0.5 * jnp.asarray(drop_fraction, jnp.float32) * (1.0 + jnp.cos(jnp.pi * t / end))
    return jnp.where(t < end, f, 0.0)
  return schedule


def _is_masked_node(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def reset_inner_state(inner_tx: optax.GradientTransformation, inner_state: optax.OptState,
                      reset: PyTree) -> optax.OptState:
  """Zeroes, in every part of ``inner_state`` shaped like the params, the entries ``reset`` marks.

  Which parts of the state are "like the params" is found generically with
  ``optax.tree.map_params`` (it inits ``inner_tx`` with a placeholder), never by knowing the
  optimizer's state classes; leaves whose shape differs from the param's (e.g. Adafactor's
  factored row/column statistics) are left unchanged.

  Args:
    inner_tx: the optimizer whose state this is.
    inner_state: its state.
    reset: a bool tree like the params (scalar False for leaves with nothing to reset).

  Returns:
    ``inner_state`` with the marked entries set to 0.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxprune as jp
    >>> tx = optax.sgd(0.1, momentum=0.9)
    >>> state = tx.init({"w": jnp.ones(3)})
    >>> state = (optax.TraceState(trace={"w": jnp.ones(3)}),) + state[1:]
    >>> new = jp.reset_inner_state(tx, state, {"w": jnp.array([True, False, False])})
    >>> new[0].trace["w"]
    Array([0., 1., 1.], dtype=float32)
  """
  def zero(s, r):
    if not hasattr(s, "shape") or np.ndim(r) == 0 or np.shape(s) != np.shape(r):
      return s
    return jnp.where(r, jnp.zeros((), s.dtype), s)

  return optax.tree.map_params(inner_tx, zero, inner_state, reset, is_leaf=_is_masked_node)


def _check(sparsity, update_every, end_step, drop_fraction, distribution):
  if not allocation.is_scalar(sparsity):
    raise ValueError(f"sparsity must be a number in [0, 1), got {type(sparsity).__name__}.")
  if not _tree.is_traced(sparsity) and not 0.0 <= float(sparsity) < 1.0:
    raise ValueError(f"sparsity must be in [0, 1), got {float(sparsity)}.")
  for name, v in (("update_every", update_every), ("end_step", end_step)):
    _util.check_step_count(name, v)
  if allocation.is_scalar(drop_fraction) and not _tree.is_traced(drop_fraction):
    if not 0.0 <= float(drop_fraction) <= 1.0:
      raise ValueError(f"drop_fraction must be in [0, 1], got {float(drop_fraction)}.")
  if distribution not in ("erk", "uniform"):
    raise ValueError(f"distribution must be 'erk' or 'uniform', got {distribution!r}.")


@functools.lru_cache(maxsize=128)
def _topology_fn(grow: str, where):
  """The jitted connectivity update of SET/RigL for one static configuration (cached, so that
  eager training steps reuse one compilation; inlined inside a jitted step). On check steps it
  also checks that the previous masks' inactive weights are 0 in ``params`` (see
  :mod:`jaxprune._transform_utils`)."""
  name = "rigl" if grow == "gradient" else "set_training"

  @jax.jit
  def new_topology(masks, params, updates, count, f, key_t, every, t_end):
    paths, chosen, _ = _util.selection(params, where)
    chosen_paths = [p for p, c in zip(paths, chosen) if c]
    treedef = jax.tree.structure(params)
    is_update = (count > 0) & (count % every == 0) & (count < t_end)

    def move(masks):
      m_leaves = treedef.flatten_up_to(masks)
      p_leaves = jax.tree.leaves(params)
      g_leaves = treedef.flatten_up_to(updates)
      idx = [i for i, c in enumerate(chosen) if c]
      ks = [jnp.floor(f * jnp.sum(m_leaves[i], dtype=jnp.int32).astype(jnp.float32)
                      ).astype(jnp.int32) for i in idx]
      # Drop: the k active weights of smallest magnitude (inactive ones never qualify). All
      # leaves' selections at once: leaves of one shape share one compiled selection.
      dropped = lowest_each([jnp.where(m_leaves[i], jnp.abs(p_leaves[i]).astype(jnp.float32),
                                       jnp.inf) for i in idx], ks)
      kept = [m_leaves[i] & ~d for i, d in zip(idx, dropped)]
      # Grow: the k best among all connections not kept (the just-dropped included, as in
      # RigL's Algorithm 1; one that is dropped and grown again keeps its weight and state).
      if grow == "gradient":
        scores = [jnp.abs(g_leaves[i]).astype(jnp.float32) for i in idx]
      else:
        scores = [jax.random.uniform(jax.random.fold_in(key_t, i), m_leaves[i].shape,
                                     jnp.float32) for i in idx]
      grows = lowest_each([jnp.where(kp, jnp.inf, -sc) for kp, sc in zip(kept, scores)], ks)
      new = list(m_leaves)
      for i, kp, g in zip(idx, kept, grows):
        new[i] = kp | g
      return jax.tree.unflatten(treedef, new)

    def check(masks):
      bad, pruned = _util.nonzero_pruned(masks, params, chosen)
      return _util.check_misplaced(name, chosen_paths, bad, pruned, count)

    return _util.check_or_update(is_update, _util.check_step(count, every, t_end),
                                 lambda m: m, check, move, masks)
  return new_topology


def _sparse_training(grow: str, inner_tx, sparsity, update_every, end_step, drop_fraction,
                     distribution, where, key) -> optax.GradientTransformationExtraArgs:
  _check(sparsity, update_every, end_step, drop_fraction, distribution)
  frac = (drop_fraction if callable(drop_fraction)
          else cosine_drop_fraction(drop_fraction, end_step))
  init_key, grow_key = jax.random.split(_util.as_key(key))

  def init_fn(params):
    inner_state = inner_tx.init(params)
    params = _util.model_params(params)
    count = jnp.zeros([], jnp.int32)
    if _util.is_placeholder(params):
      return SparseTrainingState(count, jax.tree.map(lambda x: x, params), inner_state)
    _, _, where_p = _util.selection(params, where)
    if _tree.is_traced(sparsity):
      raise ValueError("sparsity sets how many connections each leaf keeps and must be "
                       "concrete when the state is initialized (only the update may trace it).")
    s = float(sparsity)
    alloc = erk_sparsities(params, s, where=where_p) if distribution == "erk" else s
    masks = topk_mask(random_scores(params, init_key, where=where_p), alloc, where=where_p)
    return SparseTrainingState(count, masks, inner_state)

  new_topology = _topology_fn(grow, where)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(_util.NO_PARAMS_MSG)
    model = _util.model_params(params)
    _, chosen, _ = _util.selection(model, where)
    count = state.count
    f = jnp.asarray(frac(count), jnp.float32)
    f = _checks.check(~_checks.is_fraction(f), lambda v, c: (
        f"drop_fraction {float(v)} at step {int(c)} is outside [0, 1]."), f, count)
    masks = new_topology(state.masks, model, updates, count, f,
                         jax.random.fold_in(grow_key, count),
                         jnp.asarray(update_every, jnp.int32), jnp.asarray(end_step, jnp.int32))
    # Elementwise outside the topology's cond, so that XLA fuses them into the optimizer's own
    # update (a grown tree out of the cond was 1 byte per weight written at every step).
    grown = jax.tree.map(lambda new, old: new & ~old, masks, state.masks)
    active = jax.tree.map(lambda new, old: new & old, masks, state.masks)
    # The grown connections' state is reset before the inner update, which sees a zero gradient
    # for them: so the optimizer's update fuses as in a plain step (a reset after it made
    # XLA:CPU copy every moment leaf at every step, see docs/model_scale.md).
    inner_state = reset_inner_state(inner_tx, state.inner_state, grown)
    grads_in = _util.mask_grads(active, updates, chosen)
    inner_updates, inner_state = optax.with_extra_args_support(inner_tx).update(
        grads_in, inner_state, params, **extra_args)
    out = _util.enforce_params(masks, inner_updates, params, chosen, override=grown)
    return out, SparseTrainingState(optax.safe_increment(count), masks, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rigl(inner_tx: optax.GradientTransformation, *, sparsity: float, update_every: int,
         end_step: int, drop_fraction: optax.ScalarOrSchedule = 0.3, distribution: str = "erk",
         where: Where | None = None, key: KeyLike = None) -> optax.GradientTransformationExtraArgs:
  """RigL: sparse training that grows the connections with the largest dense gradient.

  Every ``update_every`` steps before ``end_step`` (not at step 0), each prunable leaf drops its
  ``k = ⌊f(t)·n_active⌋`` active weights of smallest ``|w|`` and grows the ``k`` connections
  with the largest ``|g|`` among those not kept, where ``g`` is the dense gradient this
  transform receives (pruned weights are exactly 0, so the gradient at them is the dense one).
  Grown weights start at 0, and their inner-optimizer state is reset to 0 before the step's
  inner update (see the module docstring). Sparsity is exact at every step.

  Args:
    inner_tx: the optimizer (any optax transformation, learning rate included).
    sparsity: the fraction of each prunable leaf's weights (overall, under ERK) that is
      inactive, in [0, 1). Static (used at ``init``).
    update_every: steps between connectivity updates (RigL's ΔT).
    end_step: no connectivity update from this step on (RigL's T_end).
    drop_fraction: α of the cosine decay ``α/2·(1 + cos(πt/end_step))``, or a schedule
      ``step -> fraction`` used as is.
    distribution: ``"erk"`` (default) or ``"uniform"``.
    where: ``(path, leaf) -> bool`` choosing sparse leaves (default: float, ``ndim >= 2``).
    key: a PRNG key or int seed for the initial random connectivity (None: seed 0).

  With ``optax.inject_hyperparams``, ``drop_fraction`` can be injected (a number is traced and
  then decayed; a schedule's value at each step is used as α); list the integer arguments
  (``update_every``, ``end_step``, an int ``key``) in ``static_args``. ``sparsity`` is only read
  by ``init`` and must be concrete there.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`SparseTrainingState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxprune as jp
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
    >>> tx = jp.rigl(optax.adam(1e-2), sparsity=0.75, update_every=2, end_step=10,
    ...              distribution="uniform")
    >>> state = tx.init(params)
    >>> for _ in range(5):
    ...   grads = jax.tree.map(jnp.sign, params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> float(jp.sparsity(params)), float(jp.sparsity(jp.masks_from_state(state)))
    (0.75, 0.75)

  References:
    Evci, Gale, Menick, Castro and Elsen, "Rigging the Lottery: Making All Tickets Winners",
    ICML 2020.
  """
  return _sparse_training("gradient", inner_tx, sparsity, update_every, end_step, drop_fraction,
                          distribution, where, key)


def set_training(inner_tx: optax.GradientTransformation, *, sparsity: float, update_every: int,
                 end_step: int, drop_fraction: optax.ScalarOrSchedule = 0.3,
                 distribution: str = "erk", where: Where | None = None,
                 key: KeyLike = None) -> optax.GradientTransformationExtraArgs:
  """SET (Sparse Evolutionary Training): drop the smallest weights, regrow at random.

  Same as :func:`rigl` except that the ``k`` grown connections are drawn uniformly at random
  (``fold_in(key, count)``) among those not kept. The paper uses a constant fraction ζ = 0.3;
  pass ``drop_fraction=optax.constant_schedule(0.3)`` for that (the default decays it like
  RigL).

  Args:
    inner_tx, sparsity, update_every, end_step, drop_fraction, distribution, where, key: as in
      :func:`rigl`; ``key`` also seeds the random regrowth.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`SparseTrainingState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxprune as jp
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
    >>> tx = jp.set_training(optax.sgd(0.1), sparsity=0.5, update_every=1, end_step=10,
    ...                      distribution="uniform")
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(params, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> int(jp.masks_from_state(state)["w"].sum())
    32

  References:
    Mocanu et al., "Scalable training of artificial neural networks with adaptive sparse
    connectivity inspired by network science", Nature Communications 9, 2383 (2018).
  """
  return _sparse_training("random", inner_tx, sparsity, update_every, end_step, drop_fraction,
                          distribution, where, key)
