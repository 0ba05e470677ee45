"""Physical removal: :func:`shrink` drops the channels masks remove from whole groups."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _tree
from jaxprune.surgery._analysis import analyze


def _tolerance(dtype) -> float:
  return 2e-2 if jnp.finfo(dtype).bits <= 16 else 1e-4


def _verify(fn, masked, small, inputs) -> None:
  ref = jax.jit(fn)(masked, *inputs)
  got = jax.jit(fn)(small, *inputs)
  if jax.tree.structure(ref) != jax.tree.structure(got):
    raise ValueError("the shrunk params give fn a different output structure.")
  ref_leaves = jax.tree_util.tree_flatten_with_path(ref)[0]
  for (kp, r), g in zip(ref_leaves, jax.tree.leaves(got), strict=True):
    r, g = np.asarray(r), np.asarray(g)
    if r.shape != g.shape:
      raise ValueError(f"the shrunk model's output '{_tree.path_str(kp)}' has shape {g.shape}, "
                       f"the masked model's {r.shape}.")
    if not jnp.issubdtype(r.dtype, jnp.inexact):
      same = np.array_equal(r, g)
      err = 0.0
    else:
      tol = _tolerance(r.dtype)
      r64, g64 = r.astype(np.float64), g.astype(np.float64)
      scale = max(1.0, float(np.max(np.abs(r64), initial=0.0)))
      err = float(np.max(np.abs(r64 - g64), initial=0.0))
      same = np.allclose(g64, r64, rtol=tol, atol=tol * scale, equal_nan=True)
    if not same:
      raise ValueError(
          f"the shrunk model differs from the masked model on the example inputs (output "
          f"'{_tree.path_str(kp)}', max abs diff {err:.3g}); fn likely depends on a pruned axis "
          "in a way tracing could not see. Please report this with the model.")


def _check_masks(params, masks) -> list:
  """The mask leaves, after checking they fit params (errors name the path)."""
  _tree.check_same_structure(params, masks, "params", "masks")
  paths, leaves, _ = _tree.flatten(params)
  mleaves = jax.tree.leaves(masks)
  for p, x, m in zip(paths, leaves, mleaves, strict=True):
    if getattr(m, "dtype", None) != jnp.bool_ and not isinstance(m, (bool, np.bool_)):
      raise ValueError(f"mask for '{p}' must be bool, got {getattr(m, 'dtype', type(m))}.")
    if np.shape(m) not in ((), np.shape(x)):
      raise ValueError(f"mask for '{p}' has shape {np.shape(m)}; the leaf has shape "
                       f"{np.shape(x)} (a mask is the leaf's shape, or a scalar).")
  return mleaves


def shrink(fn: Callable[..., Any], params: Any, masks: Any, *inputs: Any,
           where: _tree.Where | None = None, strict: bool = True, verify: bool = True) -> Any:
  """Smaller params: removes every channel the masks remove from a whole group.

  ``fn(shrink(fn, params, masks, x), x)`` equals ``fn(apply_masks(params, masks), x)`` for
  every ``x`` (to float rounding): a group's channel ``j`` is removed when every member leaf
  chosen by ``where`` has all its entries at ``j`` masked; the removed slices of all members
  (masked or not: biases, BatchNorm statistics) are dropped; weights masked otherwise stay as
  zeros. Not jit-able (it changes shapes); runs on the host once.

  Args:
    fn: a pure, deterministic ``fn(params, *inputs)``.
    params: the parameter tree.
    masks: a mask tree like ``params`` (bool arrays or scalar ``True``), e.g. from
      :func:`group_masks`.
    *inputs: example inputs for tracing (and for the ``verify`` check).
    where: the leaves the masks apply to, as in :func:`channel_groups`.
    strict: raise when a mask removes a channel from only some masked members of a group, or
      from a group tracing refused. If False such channels are kept (their zeros stay).
    verify: check the equality above on ``inputs`` and raise if it fails.

  Returns:
    A tree like ``params`` with smaller arrays.

  Raises:
    ValueError: naming the group, for a partly removed channel or a refused group (with the
      reason), and naming the path, for masks whose tree or shapes do not match params.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune import surgery
    >>> params = {"w1": jnp.ones((3, 4)), "b1": jnp.zeros(4), "w2": jnp.ones((4, 2))}
    >>> fn = lambda p, x: jax.nn.relu(x @ p["w1"] + p["b1"][None]) @ p["w2"]
    >>> x = jnp.ones((5, 3))
    >>> masks = surgery.group_masks(surgery.channel_groups(fn, params, x), params, 0.5)
    >>> small = surgery.shrink(fn, params, masks, x)
    >>> {k: v.shape for k, v in small.items()}
    {'b1': (2,), 'w1': (3, 2), 'w2': (2, 2)}
  """
  mask_leaves = _check_masks(params, masks)
  res = analyze(fn, params, inputs, where)
  leaves = res.leaves
  at = {p: i for i, p in enumerate(res.paths)}
  keep: dict[int, np.ndarray] = {}
  for gi, g in enumerate(res.groups):
    masked = [m for m in g.members if m.masked]
    if not masked:
      continue
    removed = []
    for m in masked:
      i = at[m.path]
      mk = np.broadcast_to(np.asarray(mask_leaves[i], bool), np.shape(leaves[i]))
      alive = np.moveaxis(mk, m.axis, 0).reshape(len(m.index), -1).any(axis=1)
      alive_ch = np.zeros(g.size, bool)
      valid = m.index >= 0
      np.logical_or.at(alive_ch, m.index[valid], alive[valid])
      removed.append(~alive_ch)
    removed = np.stack(removed)
    everywhere, somewhere = removed.all(axis=0), removed.any(axis=0)
    if not g.prunable:
      if strict and not g.fixed and everywhere.any():
        raise ValueError(f"the masks remove channels {np.nonzero(everywhere)[0][:8].tolist()} "
                         f"of group '{g.name}', which cannot be pruned: it "
                         f"{'; it '.join(g.reasons)}.")
      continue
    partial = somewhere & ~everywhere
    if strict and partial.any():
      j = int(np.nonzero(partial)[0][0])
      gone = [str(m) for m, r in zip(masked, removed, strict=False) if r[j]]
      kept = [str(m) for m, r in zip(masked, removed, strict=False) if not r[j]]
      raise ValueError(
          f"the masks prune group '{g.name}' only partly: channel {j} (and "
          f"{int(partial.sum()) - 1} more) is removed from {gone} but kept in {kept}. A channel "
          "must be removed from every masked member of its group; build masks with "
          "surgery.group_masks, or pass strict=False to keep such channels.")
    if everywhere.any():
      keep[gi] = ~everywhere

  by_axis: dict[tuple[int, int], list] = defaultdict(list)
  for gi, g in enumerate(res.groups):
    if gi in keep:
      for m in g.members:
        by_axis[(at[m.path], m.axis)].append((keep[gi], m.index))
  # what each leaf needs: masking (non-trivial mask) and/or gathers of the kept positions
  todo = {}
  for i, x in enumerate(leaves):
    takes = []
    for ax in range(np.ndim(x)):
      pos = np.ones(np.shape(x)[ax], bool)
      for k, idx in by_axis.get((i, ax), ()):
        valid = idx >= 0
        pos[valid] &= k[idx[valid]]
      if not pos.all():
        takes.append((ax, np.nonzero(pos)[0]))
    m = mask_leaves[i]
    trivial = np.shape(m) == () and bool(np.asarray(m))
    if takes or not trivial:
      todo[i] = (not trivial, takes)
  chosen = sorted(todo)

  def work(xs, ms):  # one compiled program for all leaves, not one per leaf and op
    masked, small = [], []
    for i, x, m in zip(chosen, xs, ms, strict=True):
      needs_mask, takes = todo[i]
      y = jnp.where(m, x, jnp.zeros((), x.dtype)) if needs_mask else x
      masked.append(y)
      for ax, kept in takes:
        y = jnp.take(y, kept, axis=ax)
      small.append(y)
    return masked, small

  masked_sel, small_sel = jax.jit(work)([jnp.asarray(leaves[i]) for i in chosen],
                                        [jnp.asarray(mask_leaves[i]) for i in chosen])
  masked_leaves, out = list(leaves), list(leaves)
  for i, y, z in zip(chosen, masked_sel, small_sel, strict=True):
    masked_leaves[i], out[i] = y, z
  masked_params = jax.tree.unflatten(res.treedef, masked_leaves)
  small = jax.tree.unflatten(res.treedef, out)
  if verify:
    _verify(fn, masked_params, small, inputs)
  return small

