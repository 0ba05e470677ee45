"""Layer 4 — masks: ``topk_mask`` combines structure and allocation; ``apply_masks``,
``sparsity``, ``summary`` and the one-shot ``prune``.

Every mask is made by one primitive, the selection engine in :mod:`jaxprune._select`: exact
counts, ties in index order, NaN pruned first, no array larger than one leaf and no gather of
all scores on one device. Its invariants, and why each XLA workaround is there, are stated in
``jaxprune/_select/README.md``.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _checks, _select, _tree, allocation, stacking
from jaxprune import structure as structure_lib
from jaxprune._select import elementwise
from jaxprune._typing import Masks, Params, PyTree, Scores, Sparsity, Where
from jaxprune.scores import magnitude_scores
from jaxprune.tree import Layout

LayoutLike = str | Layout | Callable[[str, Any], Layout] | None

_MAX_UNITS = 2**31 - 1


# ----------------------------------------------------------------------------- lowest_k

def lowest_k(scores: jax.Array, k: int | jax.Array) -> jax.Array:
  """Marks exactly the ``k`` lowest entries of one array (``k`` may be traced).

  Ties are broken by row-major index (lower first) and NaN counts as the lowest value. This is
  the exact selection :func:`topk_mask` uses, exposed for transforms that drop or grow a given
  number of weights (SET, RigL).

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> jp.lowest_k(jnp.array([3., 1., 1., 2.]), 2)
    Array([False,  True,  True, False], dtype=bool)
  """
  return _select.lowest([jnp.asarray(scores)], k)[0]


# ----------------------------------------------------------------------------- N:M

@functools.partial(jax.jit, static_argnames=("st",))
def _n_of_m_keep(scores: jax.Array, st: structure_lib.NOfM) -> jax.Array:
  # Jitted (one program per shape and structure): an eager call compiled a dozen one-op
  # programs per leaf shape, ~14x the time of the whole mask under jit.
  shape = scores.shape
  ax = st.axis % len(shape)
  keys = _select.to_keys(scores).reshape(shape[:ax] + (shape[ax] // st.m, st.m) + shape[ax + 1:])
  e_ax = ax + 1
  mine = jnp.expand_dims(keys, e_ax + 1)    # element e along e_ax
  other = jnp.expand_dims(keys, e_ax)       # element f along e_ax + 1
  order = np.arange(st.m)
  earlier = (order[None, :] < order[:, None]).reshape(
      (1,) * e_ax + (st.m, st.m) + (1,) * (len(shape) - ax - 1))
  before = (other < mine) | ((other == mine) & earlier)
  position = jnp.sum(before, axis=e_ax + 1, dtype=jnp.int32)
  return (position >= st.m - st.n).reshape(shape)


def _n_of_m_tolerance(s) -> float:
  """How far a sparsity may be from ``1 - n/m``: 1e-6, or the value's own precision (an
  injected bfloat16 hyperparameter is rounded to 8 bits)."""
  dtype = getattr(s, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
    return max(1e-6, float(jnp.finfo(dtype).eps))
  return 1e-6


def _n_of_m_leaf(path, scores, s, st):
  tol = _n_of_m_tolerance(s)
  if not _tree.is_traced(s):
    value = float(s)
    if value == 0.0:
      return jnp.ones_like(scores, dtype=bool)
    if abs(value - st.sparsity) > tol:
      raise ValueError(_n_of_m_message(st, value, path))
    return _n_of_m_keep(scores, st)
  # Traced: checked when the program runs (a GMP ramp passes through sparsities N:M cannot give).
  s = _checks.check(~((s == 0) | (jnp.abs(s - st.sparsity) <= tol)),
                    lambda v: _n_of_m_message(st, float(v), path, traced=True), s)
  return _n_of_m_keep(scores, st) | (s <= 0)


def _n_of_m_message(st, value, path, traced=False):
  when = " (a traced value, checked when the program runs)" if traced else ""
  return (f"n_of_m({st.n}, {st.m}) gives sparsity {st.sparsity:g} only, but sparsity {value:g} "
          f"was asked for leaf '{path}'{when}. Use {st.sparsity:g} or 0; to reach N:M while "
          f"training, use a schedule that jumps from 0 to {st.sparsity:g} (e.g. "
          "jp.one_shot_schedule), not a gradual ramp.")


# ----------------------------------------------------------------------------- topk_mask

class _Units(NamedTuple):
  """A leaf's selection still to make: prune the ``k`` lowest of its unit scores."""
  units: jax.Array
  k: Any


def _keep_leaf(path, scores, s, st):
  """Keep-mask of one leaf under layerwise allocation, or the :class:`_Units` selection that
  makes it (all leaves' selections are made together, by ``_select.lowest_each``)."""
  if isinstance(st, structure_lib.NOfM):
    return _n_of_m_leaf(path, scores, s, st)
  if isinstance(st, structure_lib.PerOutput):
    ax = st.axis % scores.ndim
    group_axes = tuple(i for i in range(scores.ndim) if i != ax)
    k = allocation.num_to_prune(s, st.num_units(scores.shape))
    return ~_select.lowest([scores], k, group_axes)[0]
  # Even k = 0 or k = n goes to the selection: the leaves of one type share one program, and
  # which leaves it holds must not depend on the sparsities' values (each set of leaves would
  # be another compilation of eager calls).
  units = st.unit_scores(scores)
  return _Units(units, allocation.num_to_prune(s, units.size))


def _layerwise_keep(paths, leaves, chosen, per_leaf, sts, axes):
  keep, pending = {}, {}
  for i, c in enumerate(chosen):
    if not c:
      continue
    if axes[i] is not None:
      keep[i] = _keep_stacked(paths[i], leaves[i], per_leaf[i], sts[i], axes[i])
    elif isinstance(got := _keep_leaf(paths[i], leaves[i], per_leaf[i], sts[i]), _Units):
      pending[i] = got
    else:
      keep[i] = got
  if pending:
    pruned = _select.lowest_each([u.units for u in pending.values()],
                                 [u.k for u in pending.values()])
    for i, p in zip(pending, pruned):
      keep[i] = _expand_keep(p, elementwise.template(leaves[i]), st=sts[i])
  return keep


@functools.partial(jax.jit, static_argnames=("st",))
def _expand_keep(pruned_units: jax.Array, leaf: jax.Array, *, st) -> jax.Array:
  """The keep-mask of ``leaf`` from its pruned units, sharded like the leaf. Jitted, so that an
  eager call runs one program per leaf type, not one eager op (each compiled) per operation."""
  return _select.shaped_like(st.expand(~pruned_units, leaf.shape), leaf)


def _keep_stacked(path, scores, s, st, ax):
  """Keep-mask of a leaf holding its layers on axis ``ax``: each slice is its own layer.

  Every slice loses exactly ``round(s·n)`` of its units; structure axes count in the slice's
  dimensions. Unstructured, N:M and ``per_output`` select on the stacked leaf itself (per-group
  selection over the other axes); channels and blocks score their units slice by slice.
  """
  sl = stacking.slice_shape(scores.shape, ax)
  if isinstance(st, structure_lib.NOfM):
    return _n_of_m_leaf(path, scores, s, structure_lib.NOfM(
        st.n, st.m, stacking.full_axis(st.axis, ax, len(sl))))
  if isinstance(st, structure_lib.PerOutput):
    out_ax = stacking.full_axis(st.axis, ax, len(sl))
    group_axes = tuple(i for i in range(scores.ndim) if i not in (ax, out_ax))
    k = allocation.num_to_prune(s, st.num_units(sl))
    return ~_select.lowest([scores], k, group_axes)[0]
  n = st.num_units(sl)
  k = allocation.num_to_prune(s, n)
  if isinstance(k, int) and k == 0:
    return jnp.ones_like(scores, dtype=bool)
  if isinstance(k, int) and k == n:
    return jnp.zeros_like(scores, dtype=bool)
  if isinstance(st, structure_lib.Unstructured):
    group_axes = tuple(i for i in range(scores.ndim) if i != ax)
    return ~_select.lowest([scores], k, group_axes)[0]
  units = _stacked_units(scores, st, ax)
  pruned = _select.lowest([units], k, tuple(range(1, units.ndim)))[0]
  return _select.shaped_like(_stacked_expand(~pruned, st, sl, ax), scores)


def _stacked_units(scores, st, ax):
  """The unit scores of every slice, stacked on a leading axis: ``(L, *units of a slice)``."""
  return jax.vmap(st.unit_scores, in_axes=ax, out_axes=0)(scores)


def _stacked_expand(keep_units, st, sl, ax):
  return jax.vmap(lambda m: st.expand(m, sl), in_axes=0, out_axes=ax)(keep_units)


def _global_keep(paths, leaves, chosen, s, sts, axes=None):
  if any(isinstance(st, (structure_lib.NOfM, structure_lib.PerOutput)) for st in sts.values()):
    name = type(next(iter(sts.values()))).__name__
    raise ValueError(f"scope='global' does not apply to {name}: its count is fixed "
                     "per group; use scope='layerwise'.")
  idx = [i for i, c in enumerate(chosen) if c]
  axes = [None] * len(leaves) if axes is None else axes
  # Stacked leaves: units never span two layers (unstructured units are the weights anyway).
  by_slice = [axes[i] is not None and not isinstance(sts[i], structure_lib.Unstructured)
              for i in idx]
  units = [_stacked_units(leaves[i], sts[i], axes[i]) if b else sts[i].unit_scores(leaves[i])
           for i, b in zip(idx, by_slice)]
  total = sum(u.size for u in units)
  if total > _MAX_UNITS:
    raise ValueError(f"scope='global' counts with int32; {total} prunable units exceed 2**31-1.")
  k = allocation.num_to_prune(s, total)
  pruned = _select.lowest(units, k)
  keep = {}
  for i, p, b in zip(idx, pruned, by_slice):
    if b:
      sl = stacking.slice_shape(leaves[i].shape, axes[i])
      keep[i] = _select.shaped_like(_stacked_expand(~p, sts[i], sl, axes[i]), leaves[i])
    else:
      keep[i] = _expand_keep(p, elementwise.template(leaves[i]), st=sts[i])
  return keep


def topk_mask(scores: Scores, sparsity: Sparsity, *,
              structure: structure_lib.Structure | None = None, scope: str = "layerwise",
              where: Where | None = None, stacked: stacking.Stacked = None,
              layout: LayoutLike = None) -> Masks:
  """Keep-masks that remove the lowest-scoring fraction ``sparsity`` of each prunable leaf.

  Exactly ``round(s · n)`` units of each prunable leaf are removed (``scope="layerwise"``), or
  ``round(s · N)`` over all prunable leaves together (``scope="global"``, one threshold). Units
  are weights, blocks or channels as ``structure`` says. Ties are broken by index (lower index
  pruned first), NaN scores are pruned first, and the same inputs always give the same mask,
  with or without ``jax.jit``.

  Args:
    scores: a pytree of score arrays (larger = more important), e.g. from
      :func:`magnitude_scores`.
    sparsity: the fraction to remove: a number or 0-d array (may be traced; ``round(s·n)`` of
      a traced value is computed in float32), a tree of numbers like ``scores``, a dict
      ``{path_regex: sparsity}`` or a callable ``(path, leaf) -> sparsity``
      (see :mod:`jaxprune.allocation`). With ``scope="global"`` it must be one number.
    structure: :func:`unstructured` (default), :func:`n_of_m`, :func:`blocks`,
      :func:`channels` or :func:`per_output`. Made without an ``axis``, N:M runs along each
      leaf's input axis and channels are its output units, from its layout.
    scope: ``"layerwise"`` or ``"global"``.
    where: ``(path, leaf) -> bool`` choosing prunable leaves (default: floating, ``ndim >= 2``,
      not a bias or norm scale; see :func:`jaxprune.tree.default_where`).
    stacked: the layer axis of leaves that stack several layers (``nnx.scan``): an int, a dict
      ``{path_regex: axis}`` or a callable ``(path, leaf) -> axis or None`` (see
      :mod:`jaxprune.stacking`). Each slice along it is its own layer: layerwise, each slice
      loses exactly ``round(s·n_slice)`` units, and structure axes count in a slice's
      dimensions. A leaf's sparsity applies to each of its slices.
    layout: which axes of each weight are input and output, for structures made without an
      ``axis``: None (by the leaf's name: Flax ``kernel`` and Haiku ``w`` ``(..., in, out)``,
      Equinox / PyTorch ``weight`` ``(out, in, ...)``), ``"flax"``, ``"haiku"``, ``"torch"``,
      ``"equinox"``, a :class:`jaxprune.tree.Layout` or a callable ``(path, leaf) -> Layout``
      (see :mod:`jaxprune.tree`). Static.

  Returns:
    A tree like ``scores``: a bool keep-mask of the leaf's shape for every prunable leaf and a
    scalar ``True`` for every other leaf.

  Raises:
    ValueError: naming the leaf path, for a sparsity outside [0, 1] (or NaN), a sparsity
      :func:`n_of_m` cannot give, a structure that does not fit a leaf, a ``where`` that
      selects nothing or selects a non-float leaf.
    jax.errors.JaxRuntimeError: when the program runs, carrying the same ``ValueError``
      message, for a *traced* sparsity that is NaN, outside [0, 1], or (with :func:`n_of_m`)
      neither 0 nor ``1 - n/m``; a ``ValueError`` with that message when JAX's C++ dispatch
      fast path serves the call (jax-ml/jax#34083). The check is a ``lax.cond`` and a
      ``jax.pure_callback`` that is only called when the value is bad.

  Scores are compared exactly in their own type's order (float64 under x64, float32,
  bfloat16, float16; mixed leaves in a type that holds them all), on integer keys: subnormals
  are distinct from 0, ``-0.0 == +0.0``, NaN is lowest.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.array([[0.1, -3.], [2., 0.5]]), "b": jnp.ones(2)}
    >>> masks = jp.topk_mask(jp.magnitude_scores(params), 0.5)
    >>> masks["w"], masks["b"]
    (Array([[False,  True],
           [ True, False]], dtype=bool), Array(True, dtype=bool))
  """
  st = structure_lib.unstructured() if structure is None else structure
  structure_lib.check_structure(st)
  where = stacking.where_for(where, stacked)
  paths, leaves, treedef, chosen = _tree.selected(scores, where, what="scores")
  axes = stacking.resolve(stacked, paths, leaves, chosen)
  leaf_layout = _tree.layout_fn(layout)
  sts = {}
  for i, (p, x, c, a) in enumerate(zip(paths, leaves, chosen, axes)):
    if c:
      sts[i] = structure_lib.for_leaf(st, leaf_layout(p, x))
      sts[i].validate(p, stacking.slice_shape(x.shape, a))
  # Elementwise scores (a pruning transform's own |w|) stay lazy only where the selection
  # computes them itself: unstructured selections of whole (unstacked) leaves.
  leaves = [x if scope == "layerwise" and c and a is None
            and isinstance(sts[i], structure_lib.Unstructured) else elementwise.value(x)
            for i, (x, c, a) in enumerate(zip(leaves, chosen, axes))]
  if scope == "global":
    if not allocation.is_scalar(sparsity):
      raise ValueError("scope='global' needs one sparsity (a number or 0-d array), got "
                       f"{type(sparsity).__name__}.")
    s = allocation.check_fraction(sparsity, "<global>")
    keep = _global_keep(paths, leaves, chosen, s, sts, axes)
  elif scope == "layerwise":
    per_leaf = allocation.per_leaf_sparsities(sparsity, paths, leaves, treedef, chosen)
    keep = _layerwise_keep(paths, leaves, chosen, per_leaf, sts, axes)
  else:
    raise ValueError(f"scope must be 'layerwise' or 'global', got {scope!r}.")
  out = [keep[i] if i in keep else jnp.ones((), bool) for i in range(len(leaves))]
  return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- apply / measure

def _check_masks(params, masks):
  _tree.check_same_structure(params, masks, "params", "masks")
  paths, leaves, _ = _tree.flatten(params)
  mleaves = jax.tree.leaves(masks)
  for p, x, m in zip(paths, leaves, mleaves):
    mshape, pshape = np.shape(m), np.shape(x)
    if getattr(m, "dtype", None) != jnp.bool_ and not isinstance(m, bool):
      raise ValueError(f"mask for '{p}' must be bool, got {getattr(m, 'dtype', type(m))}.")
    if mshape not in ((), pshape):
      raise ValueError(f"mask for '{p}' has shape {mshape}; the leaf has shape {pshape} "
                       "(a mask is the leaf's shape, or a scalar).")
  return paths, leaves, mleaves


def apply_masks(params: Params, masks: Masks) -> Params:
  """Zeroes the pruned weights: ``jnp.where(mask, p, 0)`` leaf by leaf (never ``p * mask``,
  which turns ``inf`` or ``NaN`` into ``NaN``).

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> jp.apply_masks({"w": jnp.array([jnp.nan, 2.])}, {"w": jnp.array([False, True])})["w"]
    Array([0., 2.], dtype=float32)
  """
  paths, leaves, mleaves = _check_masks(params, masks)
  treedef = jax.tree.structure(params)
  out = []
  for x, m in zip(leaves, mleaves):
    if np.shape(m) == () and not _tree.is_traced(m) and bool(m):
      out.append(x)
    else:
      out.append(jnp.where(m, x, jnp.zeros((), jnp.asarray(x).dtype)))
  return jax.tree.unflatten(treedef, out)


def _is_mask_leaf(leaf) -> bool:
  return getattr(leaf, "dtype", None) == jnp.bool_ and np.ndim(leaf) >= 1


def sparsity(tree: PyTree, *, where: Where | None = None) -> jax.Array:
  """The fraction of zeros (params) or of ``False`` (masks) among prunable leaves.

  By default, bool leaves with ``ndim >= 1`` (masks) and the leaves the default ``where``
  selects (floating, ``ndim >= 2``, not biases or norm scales) count; scalar masks (unpruned
  leaves) do not. Jit-able; returns a float32 scalar.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> float(jp.sparsity({"w": jnp.array([[0., 1.], [0., 0.]]), "b": jnp.zeros(2)}))
    0.75
  """
  paths, leaves, _, chosen = _tree.selected(tree, where, require_any=False,
                                            require_float=False)
  if where is None:
    chosen = [c or _is_mask_leaf(x) for x, c in zip(leaves, chosen)]
  zeros, total = jnp.zeros((), jnp.float32), 0
  for x, c in zip(leaves, chosen):
    if c:
      dead = ~x if x.dtype == jnp.bool_ else x == 0
      zeros = zeros + jnp.sum(dead, dtype=jnp.int32).astype(jnp.float32)
      total += x.size
  return zeros / total if total else zeros


@dataclasses.dataclass
class Summary:
  """Per-leaf sparsity rows; ``str()`` prints them as an aligned table."""
  rows: list[dict[str, Any]]

  def totals(self) -> dict[str, Any]:
    kept = sum(r["kept"] for r in self.rows)
    total = sum(r["total"] for r in self.rows)
    return {"path": "total", "shape": "", "kept": kept, "total": total,
            "sparsity": 1.0 - kept / total if total else 0.0}

  def _lines(self, sep: str):
    head = ["path", "shape", "kept", "total", "sparsity"]
    body = [[r["path"], str(tuple(r["shape"])) if r["shape"] != "" else "", str(r["kept"]),
             str(r["total"]), f"{r['sparsity']:.4f}"] for r in self.rows + [self.totals()]]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(5)]
    fmt = lambda row: sep.join(
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return head, body, widths, fmt

  def __str__(self) -> str:
    head, body, widths, fmt = self._lines("  ")
    rule = "-" * len(fmt(head))
    return "\n".join([fmt(head), rule] + [fmt(r) for r in body[:-1]] + [rule, fmt(body[-1])])

  def to_markdown(self) -> str:
    head, body, widths, fmt = self._lines(" | ")
    lines = ["| " + fmt(head) + " |", "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + ["| " + fmt(r) + " |" for r in body])


def summary(params: Params, masks: Masks | None = None, *,
            where: Where | None = None, stacked: stacking.Stacked = None) -> Summary:
  """Per prunable leaf: path, shape, kept, total and sparsity (host-side, not jit-able).

  With ``masks``, kept counts the mask's ``True`` entries; without, the nonzero params. With
  ``stacked`` (as in :func:`topk_mask`), a stacked leaf has one row per layer, its path
  suffixed with ``[l]`` and its shape the slice's.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> print(jp.summary({"w": jnp.array([[0., 1.], [2., 3.]])}))
    path   shape   kept  total  sparsity
    ------------------------------------
    w      (2, 2)     3      4    0.2500
    ------------------------------------
    total             3      4    0.2500
  """
  paths, leaves, _, chosen = _tree.selected(params, stacking.where_for(where, stacked))
  mleaves = _check_masks(params, masks)[2] if masks is not None else [None] * len(leaves)
  axes = stacking.resolve(stacked, paths, leaves, chosen)
  rows = []
  for p, x, m, c, a in zip(paths, leaves, mleaves, chosen, axes):
    if not c:
      continue
    live = np.asarray(x) != 0 if m is None else np.broadcast_to(np.asarray(m), np.shape(x))
    layers = [(p, live)] if a is None else [
        (f"{p}[{i}]", np.take(live, i, axis=a)) for i in range(np.shape(x)[a])]
    for name, part in layers:
      total, kept = int(part.size), int(np.count_nonzero(part))
      rows.append({"path": name, "shape": tuple(part.shape), "kept": kept, "total": total,
                   "sparsity": 1.0 - kept / total if total else 0.0})
  return Summary(rows)


def prune(params: Params, sparsity: Sparsity, *,
          scores: Scores | Callable[..., Scores] = magnitude_scores,
          structure: structure_lib.Structure | None = None, scope: str = "layerwise",
          where: Where | None = None, stacked: stacking.Stacked = None,
          layout: LayoutLike = None) -> tuple[Params, Masks]:
  """One-shot pruning: ``masks = topk_mask(scores(params), sparsity, ...)``, then apply them.

  Args:
    params: a pytree of arrays.
    sparsity: as in :func:`topk_mask`.
    scores: a tree of scores like ``params``, or a callable ``(params, *, where) -> scores``
      (default :func:`magnitude_scores`). A tree with the params' paths is a tree even when it
      is callable (an ``eqx.Module``).
    structure, scope, where, stacked, layout: as in :func:`topk_mask`.

  Returns:
    ``(pruned_params, masks)``.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params, masks = jp.prune({"w": jnp.arange(1., 9.).reshape(2, 4)}, 0.75)
    >>> params["w"]
    Array([[0., 0., 0., 0.],
           [0., 0., 7., 8.]], dtype=float32)
  """
  where = stacking.where_for(where, stacked)
  s = scores(params, where=where) if _tree.is_function(scores, params) else scores
  masks = topk_mask(s, sparsity, structure=structure, scope=scope, where=where, stacked=stacked,
                    layout=layout)
  return apply_masks(params, masks), masks
