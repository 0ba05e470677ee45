"""Private helpers for the pruning transforms that the core layers do not (yet) provide.

TODO(lead): merge into ``jaxprune.allocation`` — ``erk_sparsities`` could accept a traced
``sparsity`` and return a tree of float32 scalars in that case (this is the same fixed-point
solve as ``allocation.erk_sparsities``, vectorized over leaves so that it runs under ``jit``
with a schedule's value, e.g. ``magnitude_pruning(schedule, distribution="erk")``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _tree


def erk_sparsities_traced(params, sparsity, *, where: _tree.Where | None = None):
  """ERK per-leaf sparsities for a possibly traced global ``sparsity`` (float32 scalars).

  Same rule as :func:`jaxprune.erk_sparsities`: densities proportional to
  ``sum(shape) / prod(shape)``, leaves whose density would exceed 1 kept dense and the scale
  solved again over the rest. The loop runs once per prunable leaf (a static count), which is
  enough for the fixed point to be reached.
  """
  paths, leaves, treedef, chosen = _tree.selected(params, where)
  idx = [i for i, c in enumerate(chosen) if c]
  sizes = np.array([math.prod(leaves[i].shape) for i in idx], np.float64)
  raw = np.array([sum(leaves[i].shape) / math.prod(leaves[i].shape) for i in idx], np.float64)
  n = jnp.asarray(sizes, jnp.float32)
  r = jnp.asarray(raw, jnp.float32)
  s = jnp.clip(jnp.asarray(sparsity, jnp.float32), 0.0, 1.0)
  total_keep = (1.0 - s) * jnp.float32(sizes.sum())
  dense = jnp.zeros(len(idx), bool)
  eps = jnp.zeros((), jnp.float32)
  for _ in range(len(idx)):
    budget = total_keep - jnp.sum(jnp.where(dense, n, 0.0))
    denom = jnp.sum(jnp.where(dense, 0.0, r * n))
    eps = jnp.where(denom > 0, budget / jnp.where(denom > 0, denom, 1.0), 0.0)
    dense = dense | (eps * r > 1.0)
  per = jnp.where(dense, 0.0, jnp.clip(1.0 - eps * r, 0.0, 1.0))
  out = [jnp.zeros((), jnp.float32)] * len(leaves)
  for j, i in enumerate(idx):
    out[i] = per[j]
  return jax.tree.unflatten(treedef, out)
