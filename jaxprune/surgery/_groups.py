"""Scores and masks per channel group: :func:`group_scores`, :func:`group_masks`."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _tree
from jaxprune import masks as masks_lib
from jaxprune.surgery._types import ChannelGroup, Member


def _member_table(groups, params):
  paths, leaves, _ = _tree.flatten(params)
  at = {p: i for i, p in enumerate(paths)}
  for g in groups:
    for m in g.members:
      if m.path not in at:
        raise ValueError(f"group '{g.name}' names the leaf '{m.path}', which params lacks; "
                         "pass the params the groups were traced with.")
      if len(m.index) != np.shape(leaves[at[m.path]])[m.axis]:
        raise ValueError(f"leaf '{m.path}' axis {m.axis} has length "
                         f"{np.shape(leaves[at[m.path]])[m.axis]}, but group '{g.name}' was "
                         f"traced with {len(m.index)}.")
  return paths, leaves, at


def _per_position(values: jax.Array, x, m: Member, size: int) -> jax.Array:
  """Sums ``values`` (shaped like leaf ``x``) over all axes but ``m.axis``, then into channels."""
  per_pos = jnp.sum(jnp.moveaxis(values, m.axis, 0).reshape(len(m.index), -1), axis=1)
  valid = np.nonzero(m.index >= 0)[0]
  return jnp.zeros(size, jnp.float32).at[m.index[valid]].add(per_pos[valid])


def group_scores(groups: Sequence[ChannelGroup], params: Any, scores: Any = None
                 ) -> dict[str, jax.Array]:
  """One score per channel of every prunable group (larger = more important).

  Args:
    groups: from :func:`channel_groups`.
    params: the parameter tree the groups were traced with.
    scores: optional tree like ``params`` of per-weight scores (e.g.
      :func:`jaxprune.magnitude_scores`); a channel's score is then the sum of its masked members'
      scores. Default: the L2 norm of all masked members' weights at the channel.

  Returns:
    ``{group name: float32 array of shape (size,)}``. Jit-able (close over ``groups``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune import surgery
    >>> params = {"w1": jnp.array([[3., 0.], [4., 1.]]), "w2": jnp.ones((2, 1))}
    >>> fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
    >>> groups = surgery.channel_groups(fn, params, jnp.ones((1, 2)))
    >>> surgery.group_scores(groups, params)["w1:1"]
    Array([5.0990195, 1.4142135], dtype=float32)
  """
  paths, leaves, at = _member_table(groups, params)
  score_leaves = None
  if scores is not None:
    _tree.check_same_structure(params, scores, "params", "scores")
    score_leaves = jax.tree.leaves(scores)
  out = {}
  for g in groups:
    if not g.prunable:
      continue
    total = jnp.zeros(g.size, jnp.float32)
    for m in g.members:
      if not m.masked:
        continue
      x = leaves[at[m.path]]
      if score_leaves is None:
        v = jnp.square(jnp.asarray(x, jnp.float32))
      else:
        v = jnp.asarray(score_leaves[at[m.path]], jnp.float32)
        if v.shape != np.shape(x):
          raise ValueError(f"scores for '{m.path}' have shape {v.shape}; the leaf has shape "
                           f"{np.shape(x)}.")
      total = total + _per_position(v, x, m, g.size)
    out[g.name] = jnp.sqrt(total) if score_leaves is None else total
  return out


def group_masks(groups: Sequence[ChannelGroup], params: Any, sparsity: Any, *, scores: Any = None,
                scope: str = "layerwise") -> Any:
  """Masks that remove the lowest-scoring channels of every prunable group, in all its members.

  This is ``topk_mask(..., structure=channels())`` extended to coupled groups: each group is
  scored as a unit (:func:`group_scores`) and exactly ``round(s · size)`` of its channels are
  removed (``scope="global"``: ``round(s · N)`` over all groups' channels), ties broken by
  index, via :func:`jaxprune.topk_mask` on the per-group score vectors.

  Args:
    groups: from :func:`channel_groups`.
    params: the parameter tree the groups were traced with.
    sparsity: the fraction of channels to remove: a number, a dict ``{group-name regex: s}``
      (unmatched groups keep all channels), or a callable ``(group name, scores) -> s``.
    scores: optional per-weight scores, see :func:`group_scores`.
    scope: ``"layerwise"`` (per group) or ``"global"``.

  Returns:
    A mask tree like ``params``: a bool array on every leaf a prunable group masks, scalar
    ``True`` elsewhere. Pass it to :func:`shrink` or :func:`jaxprune.apply_masks`.

  Raises:
    ValueError: if no group is prunable, or for a bad sparsity (see :func:`jaxprune.topk_mask`).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune import surgery
    >>> params = {"w1": jnp.array([[3., 0.], [4., 1.]]), "w2": jnp.ones((2, 1))}
    >>> fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
    >>> groups = surgery.channel_groups(fn, params, jnp.ones((1, 2)))
    >>> masks = surgery.group_masks(groups, params, 0.5)
    >>> masks["w1"], masks["w2"]
    (Array([[ True, False],
           [ True, False]], dtype=bool), Array([[ True],
           [False]], dtype=bool))
  """
  paths, leaves, at = _member_table(groups, params)
  if not any(g.prunable for g in groups):
    raise ValueError("no channel group of fn is prunable; see channel_groups(...) for reasons.")
  # One jitted computation, cached per (groups, sparsity, scope): eager top-k over many small
  # vectors costs seconds in dispatch.
  spec = sparsity
  if isinstance(sparsity, dict):
    spec = ("dict", tuple(sparsity.items()))
  elif isinstance(sparsity, (jax.Array, np.ndarray)):
    spec = None
  try:
    hash((groups, spec, scope))
  except TypeError:
    return jax.jit(functools.partial(_group_masks, groups, sparsity, scope))(params, scores)
  groups = tuple(groups)
  return _group_masks_jit(params, scores, sparsity if spec is None else None, groups=groups,
                          spec=spec, scope=scope)


@functools.partial(jax.jit, static_argnames=("groups", "spec", "scope"))
def _group_masks_jit(params, scores, dynamic, *, groups, spec, scope):
  if spec is None:
    sparsity = dynamic
  elif isinstance(spec, tuple) and spec and spec[0] == "dict":
    sparsity = dict(spec[1])
  else:
    sparsity = spec
  return _group_masks(groups, sparsity, scope, params, scores)


def _group_masks(groups, sparsity, scope, params, scores):
  paths, leaves, at = _member_table(groups, params)
  s = group_scores(groups, params, scores)
  keep = masks_lib.topk_mask(s, sparsity, scope=scope, where=lambda p, x: True)
  out: list = [None] * len(leaves)
  for g in groups:
    if not g.prunable:
      continue
    k = keep[g.name]
    for m in g.members:
      if not m.masked:
        continue
      i = at[m.path]
      shape = np.shape(leaves[i])
      pos = jnp.where(jnp.asarray(m.index >= 0), k[np.maximum(m.index, 0)], True)
      pos = pos.reshape([-1 if a == m.axis else 1 for a in range(len(shape))])
      cur = jnp.ones(shape, bool) if out[i] is None else out[i]
      out[i] = cur & pos
  out = [jnp.ones((), bool) if m is None else m for m in out]
  return jax.tree.unflatten(jax.tree.structure(params), out)

