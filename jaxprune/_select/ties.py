"""The tie-break: the first ``take`` entries at the threshold, in row-major index order, with no
int32 array of a leaf's size and nothing flattened (see README.md)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._select import counts as counts_lib
from jaxprune._select import radix
from jaxprune._select.sharded import cumsum_explicit_safe


def index_below(shape, axes, c) -> jax.Array:
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


def first_ties_by_axis(a: jax.Array, at_of, take) -> jax.Array:
  """:func:`first_ties` over the whole leaf (``ndim >= 2``), one axis at a time: count the
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
    counts = counts_lib.count_many([a], [lambda x, fixed=fixed: at_of(x) & fixed, at_of], others)
    counts = jnp.minimum(counts[..., 0], counts[..., 1])
    r = jnp.sum(cumsum_explicit_safe(counts, d) < take, dtype=jnp.int32)
    take = take - jnp.sum(jnp.where(i < r, counts, 0), dtype=jnp.int32)
    before = before | (fixed & (i < r))
    fixed = fixed & (i == r)
  return at_of(a) & (before | fixed)


def first_ties(a: jax.Array, at_of, take, axes) -> jax.Array:
  """The first ``take`` entries of ``a`` where ``at_of(a)`` holds, in row-major order over
  ``axes`` (per group of the other axes; ``take`` is shaped like the groups, with values in
  ``[1, count(at_of(a))]``). ``at_of`` is applied inside every pass, so no bool copy of the leaf
  is held across the passes.

  Over a whole leaf of 2 or more axes, one pass per axis (:func:`first_ties_by_axis`).
  Otherwise (a 1-D leaf, or groups, where a count per index would be as large as the leaf), a
  radix select over the position, like the one over the float keys: the last position taken is
  found 4 bits a pass by counting ties below 16 candidate positions in one fused reduction.
  Either way: no int32 array of the leaf's size, nothing flattened.
  """
  axes = tuple(sorted(axes))
  if len(axes) == a.ndim >= 2:
    return first_ties_by_axis(a, at_of, take)
  n = math.prod(a.shape[d] for d in axes)
  bits = -(-max(n, 2).bit_length() // radix.RADIX_BITS) * radix.RADIX_BITS
  group_axes = None if len(axes) == a.ndim else axes
  gshape = counts_lib.group_shape([a], group_axes)

  def count_below(cands):
    return counts_lib.count_many(
        counts_lib.opaque([a], cands[1]),
        [lambda x, c=c: at_of(x) & index_below(x.shape, axes, c) for c in cands],
        group_axes)

  last = radix.radix_select(count_below, take, bits, jnp.uint32, gshape)
  return at_of(a) & index_below(a.shape, axes, last + np.uint32(1))
