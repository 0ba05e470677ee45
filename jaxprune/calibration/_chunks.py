"""Evaluation in fixed-size row chunks, so results do not depend on how many devices share a batch.

XLA does not promise bit-identical results for one computation at different shapes: a
LayerNorm over 4,096 rows and over the 512 rows of one of 8 data-parallel shards can differ in
the last bit, and a Gram matrix ``Σ xᵀx`` reduced over 8 shards is summed in another order than
on one device. SparseGPT's weight updates and sequential calibration amplify such bits into
different masks. Here a batch's leading axis is cut into chunks of ``chunk_size`` rows; every
chunk runs through the same per-chunk program (``lax.map``: the same shapes on 1 device or on
each of 8), and per-chunk results are summed in chunk order. With the batch sharded on its
leading axis over a mesh, each device maps over its own chunks (``shard_map``, parameters
replicated), and the per-chunk results are gathered before the ordered sum. The results are
then the same bits for any number of devices whose share of a batch is a multiple of
``chunk_size``.

The gather and the sum run in their own program, with no loop: XLA:CPU runs a program with a
``while`` loop asynchronously on a thread pool, and a collective in it can wait forever for
devices that never get a thread (host devices simulated on few cores).
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def batch_mesh(batch) -> tuple[Any, Any] | None:
  """``(mesh, axis)`` when every leaf of ``batch`` is sharded on its leading axis over
  ``axis`` of one mesh of several devices, else None (one device, or replicated rows)."""
  found = set()
  for x in jax.tree.leaves(batch):
    sharding = getattr(x, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not isinstance(sharding, NamedSharding) or not spec or spec[0] is None:
      found.add(None)
    else:
      found.add((sharding.mesh, spec[0]))
  if len(found) != 1 or None in found:
    return None
  mesh, axis = found.pop()
  return (mesh, axis) if shards(mesh, axis) > 1 else None


def shards(mesh, axis) -> int:
  names = axis if isinstance(axis, tuple) else (axis,)
  return int(np.prod([mesh.shape[n] for n in names]))


def check_rows(batch, chunk_size: int, devices: int, caller: str) -> None:
  """An error unless every leaf of ``batch`` has the same leading (row) axis and every
  device's share of those rows is a whole number of chunks."""
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
    raise ValueError(f"{caller}: chunk_size must be a positive int; got {chunk_size!r}.")
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"{caller}: chunk_size needs every leaf of a batch to have the same "
                     f"leading (row) axis; got leading sizes {sorted(map(str, sizes))}.")
  rows = sizes.pop()
  if rows % (chunk_size * devices):
    raise ValueError(f"{caller}: a batch of {rows} rows over {devices} device(s) is not a whole "
                     f"number of chunks of chunk_size={chunk_size} rows per device.")


def map_chunks(f: Callable[[Any, Any], Any], params, batch, chunk_size: int, where, *,
               rows_out: bool = False) -> Any:
  """``f(params, chunk)`` for every chunk of ``batch``, stacked on a new leading axis (sharded
  over the batch's mesh axis ``where = (mesh, axis)``, or on one device for None); with
  ``rows_out``, ``f`` returns rows and the chunks' rows are put back in order instead. Call it
  under ``jax.jit``."""
  def local(p, b):
    chunks = jax.tree.map(lambda x: x.reshape((-1, chunk_size) + x.shape[1:]), b)
    out = lax.map(lambda c: f(p, c), chunks)
    if rows_out:
      out = jax.tree.map(lambda y: y.reshape((-1,) + y.shape[2:]), out)
    return out

  if where is None:
    return local(params, batch)
  mesh, axis = where
  params = jax.tree.map(lambda x: _constrain(x, mesh, P()), params)
  batch = jax.tree.map(lambda x: _constrain(x, mesh, P(axis)), batch)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis)), out_specs=P(axis),
                       check_vma=False)(params, batch)


def _constrain(x, mesh, spec: P):
  """``x`` laid out as ``spec`` on ``mesh``, inside jit (``reshard`` on Explicit axes)."""
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, spec)
  return lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def ordered_sum(stacked) -> Any:
  """Sums every leaf over its leading axis in index order, ``((s0 + s1) + s2) + …``, unrolled
  (no loop, no tree reduction)."""
  return jax.tree.map(lambda s: functools.reduce(operator.add, [s[i] for i in range(s.shape[0])]),
                      stacked)


@functools.lru_cache(maxsize=16)
def ordered_sum_program(mesh) -> Callable:
  """``ordered_sum`` jitted; with a mesh, the stacked input is gathered first and the result is
  replicated on it."""
  if mesh is None:
    return jax.jit(ordered_sum)
  return jax.jit(lambda stacked: ordered_sum(jax.tree.map(lambda x: _constrain(x, mesh, P()),
                                                          stacked)))
