"""Counting predicates over leaves in fused, variadic reductions (see README.md)."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax


def count_many(arrays, predicates, group_axes, *, per_array=False, stack=True):
  """For each predicate ``f_j``: how many elements have ``f_j(a)`` true (per group, or in all).

  All predicates are counted in ONE variadic ``lax.reduce`` per array: one pass over memory, no
  intermediate the size of the array. (XLA:CPU does not fuse a single-output ``reduce``, nor an
  output it can hoist out of a loop or drop as unused, with its producer: it writes an int32
  copy of the array first. Callers count two or more predicates that they use.) With
  ``per_array``, a list of one count array per array. Without ``stack``, each array's counts
  are a tuple, one per predicate (no concatenate kernel after the reduction).
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
    per.append(jnp.stack(counts, axis=-1) if stack else tuple(counts))
  if per_array:
    return per
  return functools.reduce(jnp.add, per) if stack else tuple(
      functools.reduce(jnp.add, c) for c in zip(*per))


def add_counts(per, per_array=False):
  """Sums per-leaf counts (the unsharded ``combine`` of :func:`radix.threshold`)."""
  return per if per_array else functools.reduce(jnp.add, per)


def group_shape(arrays, group_axes) -> tuple[int, ...]:
  """The shape of per-group results: ``()`` overall, else 1 on ``group_axes``."""
  if group_axes is None:
    return ()
  return tuple(1 if i in group_axes else n for i, n in enumerate(arrays[0].shape))


def opaque(arrays, token):
  """``arrays`` behind an optimization barrier tied to ``token``, a value that changes at every
  pass of a loop. What a pass computes from them (the order keys) is then not loop-invariant to
  XLA, which would otherwise hoist it out of the loop and materialize it: a uint32 copy of every
  leaf, held in the loop state. The barrier itself is an identity and copies nothing."""
  return lax.optimization_barrier((arrays, token))[0]
