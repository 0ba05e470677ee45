"""Layer 4 — masks: ``topk_mask`` combines structure and allocation; ``apply_masks``,
``sparsity``, ``summary`` and the one-shot ``prune``.

How the selection works (and why it is exact, sharding-friendly and O(one leaf) in memory):
scores are mapped to unsigned integer keys whose order is the float order (NaN lowest, so NaN
scores are pruned first; -0.0 equals +0.0). The ``k``-th smallest key is found by radix select:
``32 / 4 = 8`` passes (4 for bfloat16/float16 scores), each counting, for 16 candidate prefixes,
how many keys lie below them — a fused compare-and-sum over each leaf, summed over leaves. No
sort, no concatenation, no gather: every pass is an elementwise op plus a reduction, so sharded
leaves stay sharded and ``scope="global"`` never builds a buffer of the total size. When jit sees
the leaves sharded (``Explicit`` mesh axes), the counts run in a ``shard_map``: each device sums
its shards' counts and one ``psum`` per pass combines the devices (XLA alone would emit one
collective per count, leaf and pass). Keys equal to the threshold (ties) are pruned in a fixed
index order (leaf order, then row-major index), found inside a ``lax.cond`` that only runs when
ties straddle the threshold: one fused count per axis, or a radix select over the position. No
integer array of a leaf's size is ever built: XLA:CPU allocates an executable's temporaries at
every call, untaken branches included, so they would cost every training step, not only the ones
that update masks.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import _tree, allocation
from jaxprune import structure as structure_lib
from jaxprune.scores import magnitude_scores

_RADIX_BITS = 4
_MAX_UNITS = 2**31 - 1


# ----------------------------------------------------------------------------- selection engine

def _key_bits(dtype) -> int:
  return 16 if jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else 32


def _compare_dtype(arrays) -> tuple[jnp.dtype, int]:
  """The float type scores are compared in, and the width of its order keys."""
  dtypes = {jnp.dtype(a.dtype) for a in arrays}
  if len(dtypes) == 1 and _key_bits(next(iter(dtypes))) == 16:
    return next(iter(dtypes)), 16
  return jnp.dtype(jnp.float32), 32


def _key_constants(ftype, bits):
  udt = jnp.uint16 if bits == 16 else jnp.uint32
  top = np.array(1 << (bits - 1), udt)
  to_bits = lambda f: int(np.array(f, ftype).view(udt))
  neg_inf = (~np.array(to_bits(-np.inf), udt)).astype(udt)   # key of -inf
  pos_inf = np.array(to_bits(np.inf), udt) | top             # key of +inf
  return udt, top, neg_inf, pos_inf


def _to_keys(scores: jax.Array) -> jax.Array:
  """Order-preserving map from floats to unsigned ints: NaN -> 0 (lowest), -0.0 == +0.0."""
  ftype, bits = _compare_dtype([scores])
  udt, top, _, _ = _key_constants(ftype, bits)
  x = scores.astype(ftype)
  x = jnp.where(x == 0, jnp.zeros((), ftype), x)
  b = lax.bitcast_convert_type(x, udt)
  key = jnp.where(b >= top, ~b, b | top)
  return jnp.where(jnp.isnan(x), jnp.zeros((), udt), key)


def _decode(key, ftype, bits):
  """The float whose order key is ``key`` (inverse of the float -> key map)."""
  udt, top, _, _ = _key_constants(ftype, bits)
  raw = jnp.where(key >= top, key ^ top, ~key)
  return lax.bitcast_convert_type(raw.astype(udt), ftype)


def _count_many(arrays, predicates, group_axes, *, per_array=False):
  """For each predicate ``f_j``: how many elements have ``f_j(a)`` true (per group, or in all).

  All predicates are counted in ONE variadic ``lax.reduce`` per array: one pass over memory, no
  intermediate the size of the array. (XLA:CPU does not fuse a single-output ``reduce``, nor an
  output it can hoist out of a loop or drop as unused, with its producer: it writes an int32
  copy of the array first. Callers count two or more predicates that they use.) With
  ``per_array``, a list of one count array per array.
  """
  per = []
  for a in arrays:
    axes = tuple(range(a.ndim)) if group_axes is None else tuple(group_axes)
    ops = tuple(f(a).astype(jnp.int32) for f in predicates)
    zeros = tuple(np.int32(0) for _ in predicates)
    counts = lax.reduce(ops, zeros, lambda u, v: tuple(x + y for x, y in zip(u, v)), axes)
    if group_axes is not None:
      kd = tuple(1 if i in axes else n for i, n in enumerate(a.shape))
      counts = tuple(c.reshape(kd) for c in counts)
    per.append(jnp.stack(counts, axis=-1))
  return per if per_array else functools.reduce(jnp.add, per)


def _count_below(arrays, thresholds, group_axes, *, per_array=False):
  """For each threshold ``t_j``: how many elements are ``< t_j``, in one pass."""
  return _count_many(arrays, [lambda a, t=t: a < t for t in thresholds], group_axes,
                     per_array=per_array)


def _radix_select(count_below, k, bits, udt, prefix_shape):
  """The smallest key ``T`` with ``count(key <= T) >= k`` (``k >= 1``), built 4 bits a pass.

  ``count_below(cands)`` returns, for a list of candidate keys, the counts of keys below each,
  stacked on a last axis. Keys must be below ``2**bits``. The passes run in a ``fori_loop``: its
  body is compiled once (unrolling made compiles 5-10x slower). XLA copies the loop's read-only
  inputs into the loop state, so the scores are held once more, leaf by leaf; no buffer spans
  several leaves.
  """
  fan = 1 << _RADIX_BITS
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), prefix_shape)
  k_col = k.reshape(prefix_shape + (1,))

  def one_pass(i, prefix):
    shift = np.array(bits - _RADIX_BITS, udt) - jnp.asarray(i * _RADIX_BITS).astype(udt)
    cands = [prefix + (np.array(j, udt) << shift) for j in range(fan)]
    counts = count_below(cands)
    digit = jnp.maximum(jnp.sum(counts < k_col, axis=-1, dtype=jnp.int32) - 1, 0)
    return prefix + (digit.astype(udt) << shift)

  return lax.fori_loop(0, bits // _RADIX_BITS, one_pass, jnp.zeros(prefix_shape, udt))


def _group_shape(arrays, group_axes):
  if group_axes is None:
    return ()
  return tuple(1 if i in group_axes else n for i, n in enumerate(arrays[0].shape))


def _index_below(shape, axes, c) -> jax.Array:
  """Whether each entry's row-major position among the entries of its group (over ``axes``; the
  other axes index independent groups) is below ``c`` (uint32, one per group, broadcastable).

  Compares the multi-index with the digits of ``c`` lexicographically, from 1-D iotas: no array
  of positions exists, so none is hoisted out of the radix loop and materialized, and nothing
  is flattened (sharded axes stay as they are).
  """
  axes = sorted(axes)
  strides = [math.prod(shape[e] for e in axes[j + 1:]) for j in range(len(axes))]
  below, equal = jnp.zeros((), bool), jnp.ones((), bool)
  for j, (d, stride) in enumerate(zip(axes, strides)):
    digit = c // np.uint32(stride)
    if j:
      digit = digit % np.uint32(shape[d])
    i = jnp.arange(shape[d], dtype=jnp.uint32).reshape(
        tuple(shape[d] if e == d else 1 for e in range(len(shape))))
    below = below | (equal & (i < digit))
    equal = equal & (i == digit)
  return below


def _cumsum_explicit_safe(x: jax.Array, axis: int) -> jax.Array:
  """``cumsum`` along ``axis``; under an Explicit mesh, that axis is gathered first (a cumsum
  cannot run over a sharded axis there) and the result is sharded back like ``x``."""
  sharding = jax.typeof(x).sharding
  spec = getattr(sharding, "spec", None)
  if spec is None or axis >= len(spec) or spec[axis] is None:
    return jnp.cumsum(x, axis=axis)
  unsharded = jax.sharding.PartitionSpec(*[None if i == axis else a for i, a in enumerate(spec)])
  gathered = jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, unsharded))
  return jax.sharding.reshard(jnp.cumsum(gathered, axis=axis), sharding)


def _first_ties_by_axis(a: jax.Array, at_of, take) -> jax.Array:
  """:func:`_first_ties` over the whole leaf (``ndim >= 2``), one axis at a time: count the
  ties at each index of axis ``d`` among the entries whose earlier indices are the ones already
  found (one fused reduction to an ``[n_d]`` vector), and find in that vector's cumsum the index
  holding the ``take``-th tie. One pass per axis; nothing of the leaf's size but the mask.
  """
  fixed = jnp.ones((), bool)     # entries whose indices on the axes done equal the ones found
  before = jnp.zeros((), bool)   # entries that come before those in row-major order
  for d in range(a.ndim):
    others = tuple(e for e in range(a.ndim) if e != d)
    i = jnp.arange(a.shape[d], dtype=jnp.int32).reshape(
        tuple(a.shape[d] if e == d else 1 for e in range(a.ndim)))
    # The ties of the whole slice bound those among the fixed entries: counting both (and
    # using both) keeps the reduction variadic, so it fuses with the compare.
    counts = _count_many([a], [lambda x, fixed=fixed: at_of(x) & fixed, at_of], others)
    counts = jnp.minimum(counts[..., 0], counts[..., 1])
    r = jnp.sum(_cumsum_explicit_safe(counts, d) < take, dtype=jnp.int32)
    take = take - jnp.sum(jnp.where(i < r, counts, 0), dtype=jnp.int32)
    before = before | (fixed & (i < r))
    fixed = fixed & (i == r)
  return at_of(a) & (before | fixed)


def _first_ties(a: jax.Array, at_of, take, axes) -> jax.Array:
  """The first ``take`` entries of ``a`` where ``at_of(a)`` holds, in row-major order over
  ``axes`` (per group of the other axes; ``take`` is shaped like the groups, with values in
  ``[1, count(at_of(a))]``). ``at_of`` is applied inside every pass, so no bool copy of the leaf
  is held across the passes.

  Over a whole leaf of 2 or more axes, one pass per axis (:func:`_first_ties_by_axis`).
  Otherwise (a 1-D leaf, or groups, where a count per index would be as large as the leaf), a
  radix select over the position, like the one over the float keys: the last position taken is
  found 4 bits a pass by counting ties below 16 candidate positions in one fused reduction.
  Either way: no int32 array of the leaf's size, nothing flattened.
  """
  axes = tuple(sorted(axes))
  if len(axes) == a.ndim >= 2:
    return _first_ties_by_axis(a, at_of, take)
  n = math.prod(a.shape[d] for d in axes)
  bits = -(-max(n, 2).bit_length() // _RADIX_BITS) * _RADIX_BITS
  group_axes = None if len(axes) == a.ndim else axes
  gshape = _group_shape([a], group_axes)

  def count_below(cands):
    return _count_many(
        [a], [lambda x, c=c: at_of(x) & _index_below(x.shape, axes, c) for c in cands],
        group_axes)

  last = _radix_select(count_below, take, bits, jnp.uint32, gshape)
  return at_of(a) & _index_below(a.shape, axes, last + np.uint32(1))


def _add_counts(per, per_array=False):
  """Sums per-leaf counts (the unsharded ``combine`` of :func:`_threshold`)."""
  return per if per_array else functools.reduce(jnp.add, per)


def _threshold(arrays, k, group_axes, n_all, combine):
  """The radix select over the float order keys: the threshold key and, per array, the counts
  ``[n_below, n_at]`` of scores below and at it. ``combine(per_array_counts, per_array=False)``
  sums the arrays' counts (or, with ``per_array``, returns them, one per array): a plain sum
  here, a sum of the local shards' counts and one ``psum`` in :func:`_threshold_sharded`.
  """
  ftype, bits = _compare_dtype(arrays)
  udt, _, neg_inf_key, pos_inf_key = _key_constants(ftype, bits)
  gshape = _group_shape(arrays, group_axes)
  # Two forms of the NaN count (XLA cannot tell they are equal), both used: a single-output
  # reduce would not fuse on XLA:CPU and would write an int32 copy of every leaf first.
  nans = combine(_count_many(arrays, [jnp.isnan, lambda a: ~(a >= -jnp.inf)], group_axes,
                             per_array=True))
  n_nan = jnp.minimum(nans[..., 0], nans[..., 1])

  def count_below(cands):
    below = combine(_count_below(arrays, [_decode(c, ftype, bits) for c in cands], group_axes,
                                 per_array=True))
    c = jnp.stack(cands, axis=-1)
    nan_col = n_nan.reshape(n_nan.shape + (1,))
    return jnp.where(c == 0, 0, jnp.where(c <= neg_inf_key, nan_col,
                                          jnp.where(c > pos_inf_key, n_all, nan_col + below)))

  thresh = _radix_select(count_below, jnp.maximum(k, 1), bits, udt, gshape)
  below_of, at_of = _below_and_at(thresh, ftype, bits)
  per_leaf = combine(_count_many(arrays, [below_of, at_of], group_axes, per_array=True),
                     per_array=True)
  return thresh, per_leaf


def _below_and_at(thresh, ftype, bits):
  """Predicates: score below the threshold key ``thresh`` (NaN is lowest), and at it."""
  t = _decode(thresh, ftype, bits)
  nan_thresh = thresh == 0
  below_of = lambda a: (jnp.isnan(a) & ~nan_thresh) | (a < t)
  at_of = lambda a: jnp.where(nan_thresh, jnp.isnan(a), a == t)
  return below_of, at_of


def _mesh_axes(arrays):
  """``(mesh, axes)`` when jit sees some array sharded over named mesh axes (``Explicit`` axes:
  the array's type carries its ``PartitionSpec``), with ``axes[i]`` the mesh axes array ``i``
  is split over; else ``None`` (unsharded, replicated, ``Auto`` axes, or several meshes)."""
  mesh, axes = None, []
  for a in arrays:
    sharding = jax.typeof(a).sharding
    names = set()
    for entry in getattr(sharding, "spec", None) or ():
      if isinstance(entry, str):
        names.add(entry)
      elif isinstance(entry, tuple):
        names.update(entry)
    if names:
      if mesh is not None and sharding.mesh != mesh:
        return None
      mesh = sharding.mesh
    axes.append(frozenset(names))
  return None if mesh is None else (mesh, axes)


def _threshold_sharded(arrays, k, n_all, mesh, axes):
  """:func:`_threshold` inside ``shard_map`` over the arrays' mesh axes: each device counts its
  shards of all arrays, sums them, and ONE ``psum`` per radix pass combines the devices (XLA
  would partition every array's count separately: one collective per count, array and pass).
  An array not split over some of those axes is counted only where their index is 0.
  """
  names = tuple(n for n in mesh.axis_names if any(n in a for a in axes))
  P = jax.sharding.PartitionSpec
  specs = [jax.typeof(a).sharding.spec if ax else P() for a, ax in zip(arrays, axes)]

  def local(k, *shards):
    first = {n: lax.axis_index(n) == 0 for n in names}

    def own(count, ax):
      missing = [first[n] for n in names if n not in ax]
      return count if not missing else jnp.where(functools.reduce(jnp.logical_and, missing),
                                                 count, 0)

    def combine(per, per_array=False):
      per = [own(c, ax) for c, ax in zip(per, axes)]
      if per_array:
        return lax.psum(jnp.stack(per), names)
      return lax.psum(functools.reduce(jnp.add, per), names)

    return _threshold(list(shards), k, None, n_all, combine)

  thresh, per_leaf = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), *specs), out_specs=(P(), P()), axis_names=set(names),
      check_vma=False)(k, *arrays)
  return thresh, list(per_leaf)


@functools.partial(jax.jit, static_argnums=(2,))
def _lowest(arrays: list[jax.Array], k, group_axes=None) -> list[jax.Array]:
  """Bool arrays marking exactly the ``k`` lowest scores (overall, or per group along
  ``group_axes`` of a single array). NaN is lowest; ties go by leaf order, then row-major index.
  """
  ftype, bits = _compare_dtype(arrays)
  arrays = [a.astype(ftype) for a in arrays]
  n_all = sum(a.size for a in arrays) if group_axes is None else math.prod(
      arrays[0].shape[i] for i in group_axes)
  k = jnp.asarray(k, jnp.int32)
  sharded = _mesh_axes(arrays) if group_axes is None else None
  if sharded is None:
    thresh, per_leaf = _threshold(arrays, k, group_axes, n_all, _add_counts)
  else:
    thresh, per_leaf = _threshold_sharded(arrays, k, n_all, *sharded)
  below_of, at_of = _below_and_at(thresh, ftype, bits)
  counts = functools.reduce(jnp.add, per_leaf)
  n_below, n_at = counts[..., 0], counts[..., 1]
  ties_to_take = k - n_below  # in [0, n_at]

  # Both branches recompute from the scores, so no array-sized intermediate outlives a pass.
  def take_all_ties(arrays):
    return [below_of(a) | at_of(a) for a in arrays]

  def take_ties_by_index(arrays):
    # Only leaves whose ties are split by the threshold need an index order; there is at most
    # one such leaf in global scope. Each leaf's index selection runs inside its own cond.
    out, before = [], jnp.zeros((), jnp.int32)
    for a, leaf_counts in zip(arrays, per_leaf):
      n_here = leaf_counts[..., 1]
      take = jnp.clip(ties_to_take - before, 0, n_here)
      if group_axes is None:
        before = before + n_here
      split = jnp.any((take > 0) & (take < n_here))
      rank_axes = tuple(range(a.ndim)) if group_axes is None else tuple(group_axes)
      by_index = lambda a, take, rank_axes=rank_axes: below_of(a) | (
          (take > 0) & _first_ties(a, at_of, jnp.maximum(take, 1), rank_axes))
      whole = lambda a, take: below_of(a) | (at_of(a) & (take > 0))
      out.append(lax.cond(split, by_index, whole, a, take))
    return out

  return lax.cond(jnp.all(ties_to_take == n_at), take_all_ties, take_ties_by_index, arrays)


def lowest_k(scores: jax.Array, k) -> jax.Array:
  """Marks exactly the ``k`` lowest entries of one array (``k`` may be traced).

  Ties are broken by row-major index (lower first) and NaN counts as the lowest value. This is
  the exact selection :func:`topk_mask` uses, exposed for transforms that drop or grow a given
  number of weights (SET, RigL).

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> jp.lowest_k(jnp.array([3., 1., 1., 2.]), 2)
    Array([False,  True,  True, False], dtype=bool)
  """
  return _lowest([jnp.asarray(scores)], k)[0]


# ----------------------------------------------------------------------------- N:M

def _n_of_m_keep(scores: jax.Array, st: structure_lib.NOfM) -> jax.Array:
  shape = scores.shape
  ax = st.axis % len(shape)
  keys = _to_keys(scores).reshape(shape[:ax] + (shape[ax] // st.m, st.m) + shape[ax + 1:])
  e_ax = ax + 1
  mine = jnp.expand_dims(keys, e_ax + 1)    # element e along e_ax
  other = jnp.expand_dims(keys, e_ax)       # element f along e_ax + 1
  order = np.arange(st.m)
  earlier = (order[None, :] < order[:, None]).reshape(
      (1,) * e_ax + (st.m, st.m) + (1,) * (len(shape) - ax - 1))
  before = (other < mine) | ((other == mine) & earlier)
  position = jnp.sum(before, axis=e_ax + 1, dtype=jnp.int32)
  return (position >= st.m - st.n).reshape(shape)


def _n_of_m_leaf(path, scores, s, st):
  if not _tree.is_traced(s):
    value = float(s)
    if value == 0.0:
      return jnp.ones_like(scores, dtype=bool)
    if abs(value - st.sparsity) > 1e-6:
      raise ValueError(f"n_of_m({st.n}, {st.m}) gives sparsity {st.sparsity:g}, but sparsity "
                       f"{value:g} was asked for leaf '{path}' (use {st.sparsity:g} or 0).")
    return _n_of_m_keep(scores, st)
  return _n_of_m_keep(scores, st) | (s <= 0)


# ----------------------------------------------------------------------------- topk_mask

def _shaped_like(mask, leaf):
  """``mask`` with an elementwise tie to ``leaf`` (``leaf < -inf`` is always false), so that
  sharding propagation gives a mask expanded from per-unit decisions the leaf's sharding."""
  if isinstance(mask, jax.Array) and mask.shape == leaf.shape and mask.ndim:
    return mask | (leaf < -jnp.inf)
  return mask


def _keep_leaf(path, scores, s, st):
  """Keep-mask of one leaf under layerwise allocation."""
  if isinstance(st, structure_lib.NOfM):
    return _n_of_m_leaf(path, scores, s, st)
  if isinstance(st, structure_lib.PerOutput):
    ax = st.axis % scores.ndim
    group_axes = tuple(i for i in range(scores.ndim) if i != ax)
    k = allocation.num_to_prune(s, st.num_units(scores.shape))
    return ~_lowest([scores], k, group_axes)[0]
  units = st.unit_scores(scores)
  k = allocation.num_to_prune(s, units.size)
  if isinstance(k, int) and k == 0:
    return jnp.ones_like(scores, dtype=bool)
  if isinstance(k, int) and k == units.size:
    return jnp.zeros_like(scores, dtype=bool)
  return _shaped_like(st.expand(~_lowest([units], k)[0], scores.shape), scores)


def _global_keep(paths, leaves, chosen, s, st):
  if isinstance(st, (structure_lib.NOfM, structure_lib.PerOutput)):
    raise ValueError(f"scope='global' does not apply to {type(st).__name__}: its count is fixed "
                     "per group; use scope='layerwise'.")
  idx = [i for i, c in enumerate(chosen) if c]
  units = [st.unit_scores(leaves[i]) for i in idx]
  total = sum(u.size for u in units)
  if total > _MAX_UNITS:
    raise ValueError(f"scope='global' counts with int32; {total} prunable units exceed 2**31-1.")
  k = allocation.num_to_prune(s, total)
  pruned = _lowest(units, k)
  return {i: _shaped_like(st.expand(~p, leaves[i].shape), leaves[i])
          for i, p in zip(idx, pruned)}


def topk_mask(scores, sparsity, *, structure=None, scope: str = "layerwise",
              where: _tree.Where | None = None):
  """Keep-masks that remove the lowest-scoring fraction ``sparsity`` of each prunable leaf.

  Exactly ``round(s · n)`` units of each prunable leaf are removed (``scope="layerwise"``), or
  ``round(s · N)`` over all prunable leaves together (``scope="global"``, one threshold). Units
  are weights, blocks or channels as ``structure`` says. Ties are broken by index (lower index
  pruned first), NaN scores are pruned first, and the same inputs always give the same mask,
  with or without ``jax.jit``.

  Args:
    scores: a pytree of score arrays (larger = more important), e.g. from
      :func:`magnitude_scores`.
    sparsity: the fraction to remove: a number or 0-d array (may be traced; traced values are
      clipped to [0, 1] and rounded in float32), a tree of numbers like ``scores``, a dict
      ``{path_regex: sparsity}`` or a callable ``(path, leaf) -> sparsity``
      (see :mod:`jaxprune.allocation`). With ``scope="global"`` it must be one number.
    structure: :func:`unstructured` (default), :func:`n_of_m`, :func:`blocks`,
      :func:`channels` or :func:`per_output`.
    scope: ``"layerwise"`` or ``"global"``.
    where: ``(path, leaf) -> bool`` choosing prunable leaves (default: floating, ``ndim >= 2``).

  Returns:
    A tree like ``scores``: a bool keep-mask of the leaf's shape for every prunable leaf and a
    scalar ``True`` for every other leaf.

  Raises:
    ValueError: naming the leaf path, for a sparsity outside [0, 1], a structure that does not
      fit a leaf, a ``where`` that selects nothing or selects a non-float leaf.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.array([[0.1, -3.], [2., 0.5]]), "b": jnp.ones(2)}
    >>> masks = jp.topk_mask(jp.magnitude_scores(params), 0.5)
    >>> masks["w"], masks["b"]
    (Array([[False,  True],
           [ True, False]], dtype=bool), Array(True, dtype=bool))
  """
  st = structure_lib.unstructured() if structure is None else structure
  paths, leaves, treedef, chosen = _tree.selected(scores, where, what="scores")
  for p, x, c in zip(paths, leaves, chosen):
    if c:
      st.validate(p, tuple(x.shape))
  if scope == "global":
    if not allocation.is_scalar(sparsity):
      raise ValueError("scope='global' needs one sparsity (a number or 0-d array), got "
                       f"{type(sparsity).__name__}.")
    s = allocation.check_fraction(sparsity, "<global>")
    keep = _global_keep(paths, leaves, chosen, s, st)
  elif scope == "layerwise":
    per_leaf = allocation.per_leaf_sparsities(sparsity, paths, leaves, treedef, chosen)
    keep = {i: _keep_leaf(paths[i], leaves[i], per_leaf[i], st)
            for i, c in enumerate(chosen) if c}
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


def apply_masks(params, masks):
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


def _counted_for_sparsity(path, leaf):
  is_mask = getattr(leaf, "dtype", None) == jnp.bool_ and np.ndim(leaf) >= 1
  return is_mask or _tree.default_where(path, leaf)


def sparsity(tree, *, where: _tree.Where | None = None) -> jax.Array:
  """The fraction of zeros (params) or of ``False`` (masks) among prunable leaves.

  By default, bool leaves with ``ndim >= 1`` (masks) and floating leaves with ``ndim >= 2``
  count; scalar masks (unpruned leaves) and biases do not. Jit-able; returns a float32 scalar.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> float(jp.sparsity({"w": jnp.array([[0., 1.], [0., 0.]]), "b": jnp.zeros(2)}))
    0.75
  """
  paths, leaves, _, chosen = _tree.selected(tree, where or _counted_for_sparsity,
                                            require_any=False, require_float=False)
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
  rows: list[dict]

  def totals(self) -> dict:
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

  def __str__(self):
    head, body, widths, fmt = self._lines("  ")
    rule = "-" * len(fmt(head))
    return "\n".join([fmt(head), rule] + [fmt(r) for r in body[:-1]] + [rule, fmt(body[-1])])

  def to_markdown(self) -> str:
    head, body, widths, fmt = self._lines(" | ")
    lines = ["| " + fmt(head) + " |", "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + ["| " + fmt(r) + " |" for r in body])


def summary(params, masks=None, *, where: _tree.Where | None = None) -> Summary:
  """Per prunable leaf: path, shape, kept, total and sparsity (host-side, not jit-able).

  With ``masks``, kept counts the mask's ``True`` entries; without, the nonzero params.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> print(jp.summary({"w": jnp.array([[0., 1.], [2., 3.]])}))
    path   shape   kept  total  sparsity
    ------------------------------------
    w      (2, 2)     3      4    0.2500
    ------------------------------------
    total             3      4    0.2500
  """
  paths, leaves, _, chosen = _tree.selected(params, where)
  mleaves = _check_masks(params, masks)[2] if masks is not None else [None] * len(leaves)
  rows = []
  for p, x, m, c in zip(paths, leaves, mleaves, chosen):
    if not c:
      continue
    total = int(np.prod(np.shape(x)))
    if m is None:
      kept = int(np.count_nonzero(np.asarray(x)))
    else:
      kept = int(np.count_nonzero(np.broadcast_to(np.asarray(m), np.shape(x))))
    rows.append({"path": p, "shape": tuple(np.shape(x)), "kept": kept, "total": total,
                 "sparsity": 1.0 - kept / total if total else 0.0})
  return Summary(rows)


def prune(params, sparsity, *, scores=magnitude_scores, structure=None,
          scope: str = "layerwise", where: _tree.Where | None = None):
  """One-shot pruning: ``masks = topk_mask(scores(params), sparsity, ...)``, then apply them.

  Args:
    params: a pytree of arrays.
    sparsity: as in :func:`topk_mask`.
    scores: a tree of scores, or a callable ``(params, *, where) -> scores``
      (default :func:`magnitude_scores`).
    structure, scope, where: as in :func:`topk_mask`.

  Returns:
    ``(pruned_params, masks)``.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params, masks = jp.prune({"w": jnp.arange(1., 9.).reshape(2, 4)}, 0.75)
    >>> params["w"]
    Array([[0., 0., 0., 0.],
           [0., 0., 7., 8.]], dtype=float32)
  """
  s = scores(params, where=where) if callable(scores) else scores
  masks = topk_mask(s, sparsity, structure=structure, scope=scope, where=where)
  return apply_masks(params, masks), masks
