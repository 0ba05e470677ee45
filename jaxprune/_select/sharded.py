"""Sharding: counts in a ``shard_map`` on Explicit meshes, and the helpers that keep masks and
count vectors sharded like their leaves (see README.md)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxprune._select import radix


def mesh_axes(arrays):
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


def threshold_sharded(arrays, k, mesh, axes):
  """:func:`radix.threshold` inside ``shard_map`` over the arrays' mesh axes: each device counts
  its shards of all arrays, sums them, and ONE ``psum`` per radix pass combines the devices (XLA
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

    return radix.threshold(list(shards), k, None, combine)

  thresh, per_leaf = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), *specs), out_specs=(P(), P()), axis_names=set(names),
      check_vma=False)(k, *arrays)
  return thresh, list(per_leaf)


def cumsum_explicit_safe(x: jax.Array, axis: int) -> jax.Array:
  """``cumsum`` along ``axis``; under an Explicit mesh, that axis is gathered first (a cumsum
  cannot run over a sharded axis there) and the result is sharded back like ``x``."""
  sharding = jax.typeof(x).sharding
  spec = getattr(sharding, "spec", None)
  if spec is None or axis >= len(spec) or spec[axis] is None:
    return jnp.cumsum(x, axis=axis)
  unsharded = jax.sharding.PartitionSpec(*[None if i == axis else a for i, a in enumerate(spec)])
  gathered = jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, unsharded))
  return jax.sharding.reshard(jnp.cumsum(gathered, axis=axis), sharding)


def shaped_like(mask, leaf):
  """``mask`` with an elementwise tie to ``leaf`` (``leaf < -inf`` is always false), so that
  sharding propagation gives a mask expanded from per-unit decisions the leaf's sharding."""
  if isinstance(mask, jax.Array) and mask.shape == leaf.shape and mask.ndim:
    return mask | (leaf < -jnp.inf)
  return mask
