"""``lowest``: the one selection primitive every mask is made with (see README.md)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxprune._select import counts as counts_lib
from jaxprune._select import keys as keys_lib
from jaxprune._select import radix, sharded, ties


@functools.partial(jax.jit, static_argnums=(2,))
def lowest(arrays: list[jax.Array], k, group_axes=None) -> list[jax.Array]:
  """Bool arrays marking exactly the ``k`` lowest scores (overall, or per group along
  ``group_axes`` of a single array). NaN is lowest; ties go by leaf order, then row-major index.
  """
  ftype, bits = keys_lib.compare_dtype(arrays)
  arrays = [keys_lib.exact_cast(a, ftype) for a in arrays]
  k = jnp.asarray(k, jnp.int32)
  on_mesh = sharded.mesh_axes(arrays) if group_axes is None else None
  if on_mesh is None:
    thresh, per_leaf = radix.threshold(arrays, k, group_axes, counts_lib.add_counts)
  else:
    thresh, per_leaf = sharded.threshold_sharded(arrays, k, *on_mesh)
  below_of, at_of = keys_lib.below_and_at(thresh, ftype, bits)
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
          (take > 0) & ties.first_ties(a, at_of, jnp.maximum(take, 1), rank_axes))
      whole = lambda a, take: below_of(a) | (at_of(a) & (take > 0))
      out.append(lax.cond(split, by_index, whole, a, take))
    return out

  return lax.cond(jnp.all(ties_to_take == n_at), take_all_ties, take_ties_by_index, arrays)
