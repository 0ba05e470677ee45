"""Radix select: the k-th smallest order key, 2 bits a pass (see README.md)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune._select import counts as counts_lib
from jaxprune._select import elementwise
from jaxprune._select import keys as keys_lib

RADIX_BITS = 2


def radix_select(count_below, k, bits, udt, prefix_shape):
  """The smallest key ``T`` with ``count(key <= T) >= k`` (``k >= 1``), built 2 bits a pass.

  ``count_below(cands)`` returns, for a list of candidate keys, the counts of keys below each,
  stacked on a last axis. Keys must be below ``2**bits``. A pass counts the keys below the 3
  candidates ``prefix + j << shift`` (``j = 1, 2, 3``): the count below ``prefix`` itself is
  below ``k`` by construction, so the digit is the number of candidates whose count is below
  ``k``. Two bits a pass with 3 counts each (16 passes for float32) ran faster than four bits
  with 15 or 16 (8 passes): the passes are bound by the compares, not by reading the leaf,
  and the 3-output reduction compiles faster. The passes run in a ``fori_loop``: its body is
  compiled once (unrolling made compiles 5-10x slower). XLA copies the loop's read-only inputs
  into the loop state, so the scores are held once more, leaf by leaf; no buffer spans
  several leaves.
  """
  fan = 1 << RADIX_BITS
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), prefix_shape)
  k_col = k.reshape(prefix_shape + (1,))

  def one_pass(i, prefix):
    shift = np.array(bits - RADIX_BITS, udt) - jnp.asarray(i * RADIX_BITS).astype(udt)
    cands = [prefix + (np.array(j, udt) << shift) for j in range(1, fan)]
    digit = jnp.sum(count_below(cands) < k_col, axis=-1, dtype=jnp.int32)
    return prefix + (digit.astype(udt) << shift)

  return lax.fori_loop(0, bits // RADIX_BITS, one_pass, jnp.zeros(prefix_shape, udt))


def threshold(arrays, k, group_axes, combine):
  """The radix select over the order keys: the threshold key and, per array, the counts
  ``[n_below, n_at]`` of scores below and at it. ``combine(per_array_counts, per_array=False)``
  sums the arrays' counts (or, with ``per_array``, returns them, one per array): a plain sum
  here (:func:`counts.add_counts`), a sum of the local shards' counts and one ``psum`` in
  :func:`sharded.threshold_sharded`.

  Every count compares integer keys (``keys.signed_keys``, recomputed inside each fused pass), so
  the select is exact on the score type's total order: NaN lowest, ``-0.0 == +0.0``,
  subnormals distinct from 0 (a float compare on XLA:CPU flushes them), float64 in 64 bits.
  """
  ftype, bits = keys_lib.compare_dtype(arrays)
  udt = keys_lib.key_constants(ftype, bits)[0]
  gshape = counts_lib.group_shape(arrays, group_axes)

  def count_below(cands):
    # The keys of each array are traced once and compared with all the candidates (tracing
    # them per candidate made XLA's CSE merge the copies per array and pass: slower to lower).
    keys = [keys_lib.signed_keys(a, ftype, bits) for a in elementwise.opaque(arrays, cands[0])]
    return combine(counts_lib.count_many(
        keys, [lambda key, c=c: key < c for c in (keys_lib.as_signed(c, bits) for c in cands)],
        group_axes, per_array=True))

  thresh = radix_select(count_below, jnp.maximum(k, 1), bits, udt, gshape)
  below_of, at_of = keys_lib.below_and_at(thresh, ftype, bits)
  per_leaf = combine(counts_lib.count_many([elementwise.value(a) for a in arrays],
                                           [below_of, at_of], group_axes, per_array=True),
                     per_array=True)
  return thresh, per_leaf
