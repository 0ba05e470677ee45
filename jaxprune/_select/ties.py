"""The tie-break: the first ``take`` entries at the threshold, in row-major index order, with no
int32 array of a leaf's size and nothing flattened (see README.md)."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune._select import counts as counts_lib
from jaxprune._select import elementwise, radix
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


def _iota(shape, d) -> jax.Array:
  return jnp.arange(shape[d], dtype=jnp.int32).reshape(
      tuple(shape[d] if e == d else 1 for e in range(len(shape))))


def up_to_index(shape, index) -> jax.Array:
  """Whether each entry's multi-index is at or before ``index`` (one scalar per axis) in
  row-major order, from 1-D iotas."""
  fixed, before = jnp.ones((), bool), jnp.zeros((), bool)
  for d, r in enumerate(index):
    i = _iota(shape, d)
    before = before | (fixed & (i < r))
    fixed = fixed & (i == r)
  return before | fixed


def _last_tie_index(shape, count, left) -> list[jax.Array]:
  """The multi-index (one int32 scalar per axis) of the ``left``-th tie in row-major order.

  One pass per axis ``d``: ``count(fixed, others)`` returns, for each index of ``d``, the ties
  among the entries whose earlier indices are the ones already found, and the ties of the whole
  slice (two outputs of one fused reduction, see :func:`first_ties_shared`); the index holding
  the ``left``-th tie is found in the cumsum of their minimum.
  """
  index = []
  for d in range(len(shape)):
    others = tuple(e for e in range(len(shape)) if e != d)
    fixed = functools.reduce(jnp.logical_and,
                             [_iota(shape, e) == r for e, r in enumerate(index)],
                             jnp.ones((), bool))
    counts = jnp.minimum(*count(fixed, others))
    # The indices before the one holding the left-th tie: those where the cumsum is below it.
    before = cumsum_explicit_safe(counts, d) < left
    r, taken = lax.reduce((before.astype(jnp.int32), jnp.where(before, counts, 0)),
                          (np.int32(0), np.int32(0)),
                          lambda u, v: (u[0] + v[0], u[1] + v[1]), tuple(range(len(shape))))
    index.append(r)
    left = left - taken
  return index


def _tie_counts(a, at_of, fixed, others):
  # The ties of the whole slice bound those among the fixed entries: counting both (and using
  # both) keeps the reduction variadic, so it fuses with the compare.
  return counts_lib.count_many([a], [lambda x: at_of(x) & fixed, at_of], others, stack=False)


def first_ties_shared(leaves, at_of, split, take, gate=True) -> list[jax.Array]:
  """The ties taken in each of ``leaves`` (of one type, ``ndim >= 2``): the first ``take[j]``
  ties in row-major order of the one leaf whose ties are split (``split[j]``; at most one is),
  and all ties or none (``take[j] > 0``) of the others.

  The split leaf's last tie taken is found one axis at a time (:func:`_last_tie_index`): count
  its ties at each index of axis ``d`` among the entries whose earlier indices are the ones
  already found (one fused reduction to an ``[n_d]`` vector), and find in that vector's cumsum
  the index holding the ``take``-th tie. One pass per axis; nothing of a leaf's size but the
  masks. The leaves share the passes, inside one ``lax.cond`` (taken when some leaf is split;
  without ``gate``, when the caller already knows it is likely, they run unconditionally):
  each pass counts in one ``lax.switch`` branch per leaf, so the leaf is chosen when the
  program runs and the scalar work that follows is compiled once for all of them, not once per
  leaf (per-leaf tie-breaks were most of the compile time of a global mask).
  """
  shape = leaves[0].shape

  def last_tie():
    sel = jnp.argmax(jnp.stack(split))
    left = jnp.sum(jnp.where(jnp.stack(split), jnp.stack(take), 0), dtype=jnp.int32)
    # The minimum of the two counts is taken after the switch, in one kernel for all leaves.
    count = lambda fixed, others: lax.switch(
        sel, [lambda a=a: _tie_counts(elementwise.value(a), at_of, fixed, others)
              for a in leaves])
    return _last_tie_index(shape, count, left)

  if gate:
    index = lax.cond(jnp.any(jnp.stack(split)), last_tie,
                     lambda: [jnp.zeros((), jnp.int32)] * len(shape))
  else:
    index = last_tie()   # with no leaf split, the index found is unused
  up_to = up_to_index(shape, index)
  return [at_of(elementwise.value(a)) & jnp.where(s, up_to, t > 0)
          for a, s, t in zip(leaves, split, take)]


def last_tie(a: jax.Array, at_of, take) -> list[jax.Array]:
  """The multi-index (one int32 scalar per axis) of the ``take``-th entry of ``a`` where
  ``at_of(a)`` holds, in row-major order (``1 <= take <= count``): one pass per axis for
  ``ndim >= 2``, a radix select over the position for 1-D (see :func:`first_ties`). With
  :func:`up_to_index`, the ties taken are ``at_of(a) & up_to_index(a.shape, index)``."""
  if a.ndim >= 2:
    return _last_tie_index(a.shape, lambda fixed, others: _tie_counts(a, at_of, fixed, others),
                           take)
  return [_last_position(a, at_of, take, (0,)).astype(jnp.int32)]


def first_ties_by_axis(a: jax.Array, at_of, take) -> jax.Array:
  """:func:`first_ties` over the whole leaf (``ndim >= 2``): the ties up to :func:`last_tie`."""
  return at_of(a) & up_to_index(a.shape, last_tie(a, at_of, take))


def first_ties(a: jax.Array, at_of, take, axes) -> jax.Array:
  """The first ``take`` entries of ``a`` where ``at_of(a)`` holds, in row-major order over
  ``axes`` (per group of the other axes; ``take`` is shaped like the groups, with values in
  ``[1, count(at_of(a))]``). ``at_of`` is applied inside every pass, so no bool copy of the leaf
  is held across the passes.

  Over a whole leaf of 2 or more axes, one pass per axis (:func:`first_ties_by_axis`).
  Otherwise (a 1-D leaf, or groups, where a count per index would be as large as the leaf), a
  radix select over the position, like the one over the float keys: the last position taken is
  found 2 bits a pass by counting ties below 3 candidate positions in one fused reduction.
  Either way: no int32 array of the leaf's size, nothing flattened.
  """
  axes = tuple(sorted(axes))
  if len(axes) == a.ndim >= 2:
    return first_ties_by_axis(a, at_of, take)
  last = _last_position(a, at_of, take, axes)
  return at_of(a) & index_below(a.shape, axes, last + np.uint32(1))


def _last_position(a, at_of, take, axes) -> jax.Array:
  """The row-major position over ``axes`` (uint32, per group of the other axes) of the
  ``take``-th entry where ``at_of(a)`` holds: a radix select over the position, counting the
  ties below 3 candidate positions per pass in one fused reduction."""
  n = math.prod(a.shape[d] for d in axes)
  bits = -(-max(n, 2).bit_length() // radix.RADIX_BITS) * radix.RADIX_BITS
  group_axes = None if len(axes) == a.ndim else axes
  gshape = counts_lib.group_shape([a], group_axes)

  def count_below(cands):
    return counts_lib.count_many(
        counts_lib.opaque([a], cands[0]),
        [lambda x, c=c: at_of(x) & index_below(x.shape, axes, c) for c in cands],
        group_axes)

  return radix.radix_select(count_below, take, bits, jnp.uint32, gshape)
