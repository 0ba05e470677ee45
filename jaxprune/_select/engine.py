"""``lowest``: the one selection primitive every mask is made with (see README.md)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune._select import counts as counts_lib
from jaxprune._select import elementwise, radix, sharded, ties
from jaxprune._select import keys as keys_lib


def _exclusive_cumsum(x):
  return jnp.cumsum(x) - x


def _unstack(v: jax.Array) -> list[jax.Array]:
  """The entries of a small vector, as scalars made by ONE fused reduction with an output per
  entry. XLA:CPU compiles a kernel once for all the leaves of one shape only when their fused
  computations are equal; a scalar sliced out of ``v`` at a constant ``j`` fuses into leaf
  ``j``'s kernels and makes them differ (and a running sum fused into them made leaf ``j``'s
  kernels add ``j`` counts: 50 distinct, ever longer kernels for 50 leaves)."""
  n = v.shape[0]
  i = jnp.arange(n)
  ops = tuple(jnp.where(i == j, v, 0) for j in range(n))
  return list(lax.reduce(ops, tuple(np.zeros((), v.dtype) for _ in range(n)),
                         lambda u, w: tuple(x + y for x, y in zip(u, w)), (0,)))


def lowest(arrays: list, k, group_axes=None) -> list[jax.Array]:
  """Bool arrays marking exactly the ``k`` lowest scores (overall, or per group along
  ``group_axes`` of a single array). NaN is lowest; ties go by leaf order, then row-major index.
  An array may be :class:`elementwise.Elementwise` scores: every pass computes them from their
  operands (unsharded), so no array of them exists.
  """
  operands, fns = zip(*map(elementwise.operands_and_fn, arrays))
  return _lowest(list(operands), k, group_axes, fns)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _lowest(operands, k, group_axes, fns):
  arrays = [elementwise.from_parts(o, f) for o, f in zip(operands, fns)]
  ftype, bits = keys_lib.compare_dtype(arrays)
  arrays = [elementwise.then(functools.partial(keys_lib.exact_cast, ftype=ftype), a)
            for a in arrays]
  k = jnp.asarray(k, jnp.int32)
  on_mesh = (sharded.mesh_axes([elementwise.template(a) for a in arrays])
             if group_axes is None else None)
  if on_mesh is None:
    thresh, per_leaf = radix.threshold(arrays, k, group_axes, counts_lib.add_counts)
  else:
    arrays = [elementwise.value(a) for a in arrays]
    thresh, per_leaf = sharded.threshold_sharded(arrays, k, *on_mesh)
  # The tie passes take the operands (a cond's operands are buffers) and compute the scores.
  parts = [elementwise.operands_and_fn(a) for a in arrays]
  rebuild = lambda j, o: elementwise.from_parts(o, parts[j][1])
  below_of, at_of = keys_lib.below_and_at(thresh, ftype, bits)
  counts = functools.reduce(jnp.add, per_leaf)
  n_below, n_at = counts[..., 0], counts[..., 1]
  ties_to_take = k - n_below  # in [0, n_at]

  # Both branches recompute from the scores, so no array-sized intermediate outlives a pass.
  def take_all_ties(ops):
    return [below_of(a) | at_of(a)
            for a in (elementwise.value(rebuild(j, o)) for j, o in enumerate(ops))]

  def take_ties_by_index(ops):
    arrays = [rebuild(j, o) for j, o in enumerate(ops)]
    # Ties go in leaf order: each leaf takes what its predecessors' ties leave, and only a leaf
    # whose ties that splits needs an index order. There is at most one such leaf in global
    # scope, so whole leaves (ndim >= 2) of one type share one tie-break
    # (ties.first_ties_shared); other leaves and groups each get their own cond.
    n_at_of = [c[..., 1] for c in per_leaf]
    if group_axes is None:
      takes = _unstack(jnp.clip(ties_to_take - _exclusive_cumsum(jnp.stack(n_at_of)), 0,
                                jnp.stack(n_at_of)))
    else:
      takes = [ties_to_take]
    out, shared = [None] * len(arrays), {}
    for j, (a, take, n_here) in enumerate(zip(arrays, takes, n_at_of)):
      if group_axes is None and a.ndim >= 2:
        shared.setdefault(elementwise.type_of(a), []).append(j)
        continue
      split = jnp.any((take > 0) & (take < n_here))
      rank_axes = tuple(range(a.ndim)) if group_axes is None else tuple(group_axes)

      def by_index(o, take, j=j, rank_axes=rank_axes):
        scores = elementwise.value(rebuild(j, o))
        return below_of(scores) | ((take > 0) & ties.first_ties(
            scores, at_of, jnp.maximum(take, 1), rank_axes))

      def whole(o, take, j=j):
        scores = elementwise.value(rebuild(j, o))
        return below_of(scores) | (at_of(scores) & (take > 0))

      out[j] = lax.cond(split, by_index, whole, ops[j], take)
    for js in shared.values():
      split = [(takes[j] > 0) & (takes[j] < n_at_of[j]) for j in js]
      # A lone array (layerwise) is in this branch because its ties are split (or k is 0).
      tied = ties.first_ties_shared([arrays[j] for j in js], at_of, split, [takes[j] for j in js],
                                    gate=len(arrays) > 1)
      for j, t in zip(js, tied):
        out[j] = below_of(elementwise.value(arrays[j])) | t
    return out

  return lax.cond(jnp.all(ties_to_take == n_at), take_all_ties, take_ties_by_index,
                  [o for o, _ in parts])


def lowest_each(arrays: list, ks: list) -> list[jax.Array]:
  """``[lowest([a], k)[0] for a, k in zip(arrays, ks)]``: the ``k_j`` lowest of each array on
  its own (layerwise scope), with the same guarantees, compiled once per type of array.

  Arrays of one type (shape, dtype, sharding) share ONE selection program: a ``lax.map`` over
  them whose body picks array ``j`` with a ``lax.switch`` (a copy of one array), runs the radix
  select and, when its ties are split, the tie-break on it, and returns a few scalars (the
  threshold key, the ties to take, the multi-index of the last one). A final elementwise pass
  per array makes its mask from them. Compile time then grows with the number of types, not of
  arrays (GPT-2's 50 prunable leaves have 6 shapes); per-array selections made every array's
  radix loop and tie-break a program of its own. An array alone of its type, and arrays sharded
  over ``Explicit`` mesh axes (whose counts run in a ``shard_map``), take :func:`lowest`.
  An array may be :class:`elementwise.Elementwise` scores: the switch branch then computes
  the scores of array ``j`` from its operands, and so does its final pass, so no score tree
  exists (its type is that of its operands and function).
  Not jitted itself: called eagerly, each part hits the cache of its own jitted program
  (:func:`lowest` per array shape, the shared one per type and number of arrays), so a new
  tree compiles only the shapes it adds.
  """
  out = [None] * len(arrays)
  classes: dict = {}
  for j, a in enumerate(arrays):
    operands = elementwise.operands_and_fn(a)[0]
    if a.ndim == 0 or sharded.mesh_axes(list(operands)) is not None:
      out[j] = lowest([elementwise.value(a)], ks[j])[0]
    else:
      classes.setdefault(elementwise.type_of(a), []).append(j)
  for js in classes.values():
    fn = elementwise.operands_and_fn(arrays[js[0]])[1]
    if len(js) == 1:
      out[js[0]] = lowest([arrays[js[0]]], ks[js[0]])[0]
      continue
    operands = [elementwise.operands_and_fn(arrays[j])[0] for j in js]
    for j, m in zip(js, _lowest_of_one_type(operands, [ks[j] for j in js], fn)):
      out[j] = m
  return out


def _identity(a):
  return a


@functools.partial(jax.jit, static_argnums=(2,))
def _lowest_of_one_type(operands, ks, fn):
  score = fn or _identity
  ftype, bits = keys_lib.compare_dtype([jax.eval_shape(score, *operands[0])])
  shape = operands[0][0].shape
  k = jnp.stack([jnp.asarray(x, jnp.int32) for x in ks])

  def select(j):
    # The branch computes the scores (one array's), so only they are copied.
    a = keys_lib.exact_cast(lax.switch(j, [lambda o=o: score(*o) for o in operands]), ftype)
    thresh, per_leaf = radix.threshold([a], k[j], None, counts_lib.add_counts)
    take = k[j] - per_leaf[0][0]           # the ties to take, in [0, n_at]
    split = (take > 0) & (take < per_leaf[0][1])
    at_of = keys_lib.below_and_at(thresh, ftype, bits)[1]
    index = lax.cond(split, lambda: ties.last_tie(a, at_of, jnp.maximum(take, 1)),
                     lambda: [jnp.zeros((), jnp.int32)] * len(shape))
    return thresh, take, split, jnp.stack(index)

  thresh, take, split, index = lax.map(select, jnp.arange(len(operands)))
  # Scalars made by one fused reduction each (see _unstack), so that the final passes of
  # arrays of one shape compile to equal kernels.
  thresh, take, split = _unstack(thresh), _unstack(take), _unstack(split.astype(jnp.int32))
  index = [_unstack(index[:, d]) for d in range(len(shape))]
  return [_mark(o, thresh[j], take[j], split[j], [index[d][j] for d in range(len(shape))],
                fn=fn, ftype=ftype, bits=bits) for j, o in enumerate(operands)]


@functools.partial(jax.jit, static_argnames=("fn", "ftype", "bits"))
def _mark(operands, thresh, take, split, index, *, fn, ftype, bits):
  """The final pass of :func:`lowest_each` over one array (its scores ``fn(*operands)``, or
  the one operand): below the threshold, or a tie taken (all of them, or those up to
  ``index`` when the ties are split). Jitted, so that it is traced once per type of array."""
  a = keys_lib.exact_cast((fn or _identity)(*operands), ftype)
  below_of, at_of = keys_lib.below_and_at(thresh, ftype, bits)
  up_to = ties.up_to_index(a.shape, index)
  return below_of(a) | (at_of(a) & jnp.where(split > 0, up_to, take > 0))
