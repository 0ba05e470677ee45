"""Layer 6 — group pruning: an optax transform that removes whole coupled channels while training.

:func:`jaxprune.magnitude_pruning` with ``structure=jp.channels()`` removes output channels of
each leaf on its own: a conv loses output channels, but the next conv keeps the input rows that
read them, so :func:`jaxprune.surgery.shrink` cannot make the model smaller.
:func:`group_pruning` prunes the channel groups that :func:`jaxprune.surgery.channel_groups`
finds by tracing the model (a conv's output channels together with its bias, the next conv's
input rows and the BatchNorm in between; an MLP's hidden units with the next layer's rows;
attention heads across q/k/v/out): every ``update_every`` steps the masks are recomputed with
:func:`jaxprune.surgery.group_masks` at the sparsity the schedule gives, and the masks these
steps produce are what ``shrink`` needs to remove the channels physically::

    groups = jp.surgery.channel_groups(fn, params, x)   # or surgery.module_fn for a Flax model
    tx = optax.chain(optax.adam(1e-3), jp.group_pruning(
        groups, jp.polynomial_schedule(0.5, begin_step=100, end_step=1000), update_every=50))

It is a chain link like :func:`jaxprune.magnitude_pruning` (it goes **last**, after learning-rate
scaling) and enforces its masks the same way (:func:`jaxprune.transforms.pruning`'s
``where(mask, u, -p)``), so pruned weights land on exactly 0; its state is a
:class:`jaxprune.PruningState`, found by :func:`jaxprune.masks_from_state`.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune import _tree, surgery
from jaxprune._transform_utils import (
    NO_PARAMS_MSG,
    as_schedule,
    check_options,
    enforce,
    is_placeholder,
    ones_masks,
)
from jaxprune.transforms import _NEVER, PruningState

__all__ = ["group_pruning"]


@functools.lru_cache(maxsize=64)
def _masked_groups(groups: tuple) -> tuple:
  """The prunable groups, each with only the members masks apply to (``member.masked``).

  Groups traced on a model's whole state also name leaves that are not params (BatchNorm
  statistics) or not masked (biases); masks never touch those, so the transform works on the
  params tree. Cached on the groups' identity: ``inject_hyperparams`` rebuilds the transform at
  every step, and the same tuple keeps ``group_masks``' compiled computation.
  """
  return tuple(dataclasses.replace(g, members=tuple(m for m in g.members if m.masked))
               for g in groups if g.prunable and any(m.masked for m in g.members))


def group_pruning(groups: Sequence, sparsity, *, update_every: int = 1,
                  end_step: int | None = None,
                  scope: str = "layerwise") -> optax.GradientTransformationExtraArgs:
  """Gradual pruning of whole channel groups while training (a chain link that goes last).

  Every ``update_every`` steps (step 0 included, until ``end_step``) the masks become
  ``surgery.group_masks(groups, params, s_t, scope=scope) & masks``: in every prunable group
  the ``round(s_t · size)`` channels of smallest L2 norm over all its masked members are
  removed from all of them at once (``scope="global"``: ``round(s_t · N)`` over the channels of
  all groups). Pruned weights land on exactly 0, so pruned channels score 0 and stay pruned;
  masks only shrink. The leaves that are masked are the members of prunable groups that
  ``channel_groups`` was told masks apply to (its ``where``); every other leaf has the scalar
  mask ``True`` and passes through unchanged.

  Args:
    groups: from :func:`jaxprune.surgery.channel_groups`, traced on a tree with the params'
      paths (it may hold more leaves, e.g. an NNX model's BatchNorm statistics: only masked
      members are used). Static.
    sparsity: the fraction of channels removed from every group: a number in [0, 1], a 0-d
      array (may be traced, e.g. by ``optax.inject_hyperparams``) or a schedule
      ``step -> sparsity`` (e.g. :func:`jaxprune.polynomial_schedule`).
    update_every: recompute masks when ``count % update_every == 0`` (may be traced).
    end_step: no mask update from this step on (None: for the whole training).
    scope: ``"layerwise"`` (each group loses ``round(s · size)`` channels) or ``"global"``.
      Static.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`jaxprune.PruningState`.

  Raises:
    ValueError: naming ``groups`` if no group is prunable with a masked member; for a bad
      ``sparsity``, ``scope`` or ``update_every``; at ``init`` if ``params`` lacks a member leaf
      or its axis has another length than traced.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxprune as jp
    >>> params = {"w1": jnp.arange(1., 13.).reshape(3, 4), "w2": jnp.ones((4, 2))}
    >>> fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
    >>> groups = jp.surgery.channel_groups(fn, params, jnp.ones((1, 3)))
    >>> tx = optax.chain(optax.sgd(0.0), jp.group_pruning(groups, 0.5))
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> pruned = optax.apply_updates(params, updates)  # hidden units 0 and 1 are gone
    >>> pruned["w1"][:, 0], pruned["w2"][:, 0]
    (Array([0., 0., 0.], dtype=float32), Array([0., 0., 1., 1.], dtype=float32))

  References:
    Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017 (L2-norm channel scores);
    Zhu and Gupta, "To prune, or not to prune", 2017 (the gradual schedule);
    Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023 (coupled groups).
  """
  sched = as_schedule(sparsity)
  check_options(scope, "uniform", update_every)
  try:
    kernels = _masked_groups(tuple(groups))
  except (TypeError, AttributeError) as e:
    raise ValueError("groups: expected the channel groups of jaxprune.surgery.channel_groups, "
                     f"got {type(groups).__name__}") from e
  if not kernels:
    raise ValueError("groups: no group is prunable with a masked member (see the reasons "
                     "jaxprune.surgery.channel_groups gives, and its `where`).")
  member_axes = {(m.path, m.axis, len(m.index)) for g in kernels for m in g.members}
  member_paths = frozenset(path for path, _, _ in member_axes)

  def chosen_of(params):
    return [p in member_paths for p in _tree.flatten(params)[0]]

  def init_fn(params):
    if is_placeholder(params):
      masks = jax.tree.map(lambda x: x, params)
      return PruningState(jnp.zeros([], jnp.int32), masks, optax.EmptyState(),
                          optax.EmptyState())
    paths, leaves, _ = _tree.flatten(params)
    shapes = dict(zip(paths, (np.shape(x) for x in leaves), strict=True))
    for path, axis, length in sorted(member_axes):
      if path not in shapes:
        raise ValueError(f"groups: they mask the leaf '{path}', which params lacks; pass the "
                         "groups traced with these params.")
      if shapes[path][axis] != length:
        raise ValueError(f"groups: leaf '{path}' axis {axis} has length {shapes[path][axis]}, "
                         f"but the groups were traced with {length}.")
    return PruningState(jnp.zeros([], jnp.int32), ones_masks(params, chosen_of(params)),
                        optax.EmptyState(), optax.EmptyState())

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS_MSG)
    count = state.count

    def recompute(masks):
      new = surgery.group_masks(kernels, params, sched(count), scope=scope)
      return jax.tree.map(lambda n, m: jnp.broadcast_to(n, jnp.shape(m)) & m, new, masks)

    every = jnp.asarray(update_every, jnp.int32)
    end = jnp.asarray(_NEVER if end_step is None else end_step, jnp.int32)
    masks = lax.cond((count % every == 0) & (count < end), recompute, lambda m: m, state.masks)
    updates = enforce(masks, updates, params, chosen_of(params))
    return updates, state._replace(count=optax.safe_increment(count), masks=masks)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
