"""Layer 3 — allocation: how much of each prunable leaf to remove.

A sparsity can be given as
  * a number (or a 0-d jax array, possibly traced): the same for every prunable leaf;
  * a tree of numbers with the params' structure (entries of unpruned leaves are ignored),
    e.g. from :func:`erk_sparsities`;
  * a dict ``{regex: sparsity}``: the first pattern that ``re.fullmatch``-es a leaf's path wins;
    leaves no pattern matches keep sparsity 0; a pattern matching no prunable leaf is an error;
  * a callable ``(path, leaf) -> sparsity``.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _checks, _tree, stacking
from jaxprune._typing import Params, PyTree, Sparsity, Where


def _is_number(x) -> bool:
  return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool)


def is_scalar(x: object) -> bool:
  """True for a Python/numpy number or a 0-d jax array (concrete or traced)."""
  return _is_number(x) or (isinstance(x, (jax.Array, np.ndarray)) and np.ndim(x) == 0)


def check_fraction(value: float | jax.Array, path: str, what: str = "sparsity", *,
                   deferred: list | None = None) -> float | jax.Array:
  """Validates a fraction in [0, 1] for leaf ``path``.

  A concrete value is checked now. A traced one is checked when the program runs
  (``jaxprune._checks``: NaN or a value outside [0, 1] raises a ``ValueError`` carried by a
  ``jax.errors.JaxRuntimeError``); it returns the value made to depend on that check (use it in
  place of ``value``); with ``deferred``, ``(path, value)`` is appended to it instead,
  for the caller to check many values at once.
  """
  if _is_number(value) or (isinstance(value, np.ndarray) and value.ndim == 0):
    v = float(value)
    if not 0.0 <= v <= 1.0 or math.isnan(v):
      raise ValueError(f"{what} {v} for leaf '{path}' is outside [0, 1].")
    return v
  if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) != 0:
    raise ValueError(f"{what} for leaf '{path}' must be a number or a 0-d array, got an array "
                     f"of shape {np.shape(value)}.")
  if isinstance(value, jax.Array) and not _tree.is_traced(value):
    v = float(value)
    if not 0.0 <= v <= 1.0 or math.isnan(v):
      raise ValueError(f"{what} {v} for leaf '{path}' is outside [0, 1].")
    return value
  if isinstance(value, jax.Array):
    if deferred is None:
      return _checks.check_fractions([value], [path], what)[0]
    deferred.append((path, value))
    return value
  raise ValueError(f"{what} for leaf '{path}' must be a number or a 0-d array, got "
                   f"{type(value).__name__}.")


def _check_deferred(deferred: list, what: str = "sparsity") -> dict:
  """One run-time check for the traced values :func:`check_fraction` deferred (each distinct
  tracer once): ``{id(value): value made to depend on the check}``."""
  seen, paths, values = set(), [], []
  for path, value in deferred:
    if id(value) not in seen:
      seen.add(id(value))
      paths.append(path)
      values.append(value)
  checked = _checks.check_fractions(values, paths, what)
  return {id(v): c for v, c in zip(values, checked)}


def _compile_pattern(pattern: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"sparsity pattern {pattern!r} is not a valid regular expression: {e}. "
                     "Keys of a sparsity dict are regexes that re.fullmatch leaf paths "
                     "(escape literal characters with re.escape).") from e


def per_leaf_sparsities(sparsity: Sparsity, paths: list[str], leaves: list,
                        treedef: jax.tree_util.PyTreeDef,
                        chosen: list[bool]) -> list[float | jax.Array | None]:
  """Resolves any accepted sparsity spec to one value per leaf (None for unselected leaves)."""
  deferred: list = []
  out = _resolve(sparsity, paths, leaves, treedef, chosen, deferred)
  checked = _check_deferred(deferred)
  return [checked.get(id(v), v) for v in out]


def _resolve(sparsity, paths, leaves, treedef, chosen, deferred):
  check = functools.partial(check_fraction, deferred=deferred)
  if is_scalar(sparsity):
    return [check(sparsity, p) if c else None for p, c in zip(paths, chosen)]
  if isinstance(sparsity, (jax.Array, np.ndarray)):
    raise ValueError("sparsity must be a number or a 0-d array (or a tree, dict or callable "
                     f"of them), got an array of shape {np.shape(sparsity)}.")
  # A tree of numbers like the params comes before a callable: an Equinox module (e.g. from
  # erk_sparsities on an eqx.Module) is callable, but it is a tree here, never a function.
  s_paths, values, _ = _tree.flatten(sparsity)
  if s_paths == paths and not any(callable(v) for v in values):
    return [check(v, p) if c else None for p, v, c in zip(paths, values, chosen)]
  if callable(sparsity) and not isinstance(sparsity, Mapping):
    return [check(sparsity(p, x), p) if c else None
            for p, x, c in zip(paths, leaves, chosen)]
  if isinstance(sparsity, Mapping) and all(isinstance(k, str) for k in sparsity):
    patterns = [(_compile_pattern(k), k, v) for k, v in sparsity.items()]
    used = set()
    out = []
    for p, c in zip(paths, chosen):
      value = None
      if c:
        value = 0.0
        for rx, k, v in patterns:
          if rx.fullmatch(p):
            value, _ = check(v, p), used.add(k)
            break
      out.append(value)
    unused = [k for _, k, _ in patterns if k not in used]
    if unused:
      raise ValueError(f"sparsity patterns {unused} match no prunable leaf (prunable paths: "
                       f"{[p for p, c in zip(paths, chosen) if c][:8]}).")
    return out
  raise ValueError("sparsity must be a number, a 0-d array, a tree like params, a dict "
                   f"{{regex: sparsity}} or a callable (path, leaf) -> sparsity; got "
                   f"{type(sparsity).__name__} whose structure does not match the params.")


def erk_sparsities(params: Params, sparsity: float | jax.Array, *, where: Where | None = None,
                   power_scale: float = 1.0, stacked=None) -> PyTree:
  """Erdős–Rényi-Kernel per-leaf sparsities whose parameter-weighted mean is ``sparsity``.

  Each prunable leaf's density is proportional to ``(sum of its dims) / (product of its dims)``
  (raised to ``power_scale``), so small layers stay denser. Leaves whose density would exceed 1
  are kept dense and the scale is solved again over the rest, until every density is ≤ 1.

  Args:
    params: a pytree of arrays (only shapes are read; abstract arrays work).
    sparsity: the overall fraction of prunable weights to remove, in [0, 1); a jax array
      (e.g. a schedule's value under ``jit``) works too, and a traced one is checked when the
      program runs (NaN or a value outside [0, 1] raises, as in :func:`jaxprune.topk_mask`).
    where: ``(path, leaf) -> bool`` choosing prunable leaves.
    power_scale: exponent on the ERK ratio (1.0 is ERK; 0.0 is uniform).
    stacked: the layer axis of stacked leaves (as in :func:`jaxprune.topk_mask`): each slice is
      a layer of the slice's shape, so a stacked leaf gets the sparsity of its layers unrolled.

  Returns:
    A tree like ``params`` of Python floats (0.0 on leaves that are not pruned, and on leaves
    without elements); of float32
    scalars when ``sparsity`` is a jax array (the same fixed point, vectorized over the leaves
    and iterated once per prunable leaf, which is enough to reach it).

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"a": jnp.zeros((100, 100)), "b": jnp.zeros((100, 10))}
    >>> s = jp.erk_sparsities(params, 0.9)
    >>> round((s["a"] * 10000 + s["b"] * 1000) / 11000, 6)
    0.9

  References:
    Evci et al., "Rigging the Lottery: Making All Tickets Winners", ICML 2020 (ERK);
    Mocanu et al., Nature Communications 2018 (Erdős–Rényi).
  """
  sparsity = check_fraction(sparsity, "<all>")
  paths, leaves, treedef, chosen = _tree.selected(params, stacking.where_for(where, stacked))
  shapes = [tuple(np.shape(x)) for x in leaves]
  # A leaf without elements (a zero in its shape) has nothing to prune: sparsity 0.0.
  idx = [i for i, c in enumerate(chosen) if c and math.prod(shapes[i]) > 0]
  sizes = {i: math.prod(shapes[i]) for i in idx}
  if stacked is None:
    raw = {i: (sum(shapes[i]) / sizes[i]) ** power_scale for i in idx}
  else:
    axes = stacking.resolve(stacked, paths, leaves, chosen)
    layer = {i: stacking.slice_shape(shapes[i], axes[i]) for i in idx}
    raw = {i: (sum(layer[i]) / math.prod(layer[i])) ** power_scale for i in idx}
  if isinstance(sparsity, jax.Array):
    return _erk_traced(sparsity, idx, sizes, raw, len(leaves), treedef)
  total = sum(sizes.values())
  dense: set[int] = set()
  while True:
    budget = (1.0 - sparsity) * total - sum(sizes[i] for i in dense)
    denom = sum(raw[i] * sizes[i] for i in idx if i not in dense)
    eps = budget / denom if denom > 0 else 0.0
    over = {i for i in idx if i not in dense and eps * raw[i] > 1.0}
    if not over:
      break
    dense |= over
  out = []
  for i, _ in enumerate(leaves):
    if i not in raw:
      out.append(0.0)
    elif i in dense:
      out.append(0.0)
    else:
      out.append(float(min(1.0, max(0.0, 1.0 - eps * raw[i]))))
  return jax.tree.unflatten(treedef, out)


def _erk_traced(sparsity, idx, sizes, raw, num_leaves, treedef):
  """:func:`erk_sparsities`'s fixed point for a jax-array ``sparsity``, vectorized over the
  prunable leaves; the loop runs once per leaf (a static count), which is enough to reach it."""
  n = jnp.asarray([sizes[i] for i in idx], jnp.float32)
  r = jnp.asarray([raw[i] for i in idx], jnp.float32)
  s = jnp.clip(jnp.asarray(sparsity, jnp.float32), 0.0, 1.0)
  total_keep = (1.0 - s) * jnp.float32(sum(sizes.values()))
  dense = jnp.zeros(len(idx), bool)
  eps = jnp.zeros((), jnp.float32)
  for _ in range(len(idx)):
    budget = total_keep - jnp.sum(jnp.where(dense, n, 0.0))
    denom = jnp.sum(jnp.where(dense, 0.0, r * n))
    eps = jnp.where(denom > 0, budget / jnp.where(denom > 0, denom, 1.0), 0.0)
    dense = dense | (eps * r > 1.0)
  per = jnp.where(dense, 0.0, jnp.clip(1.0 - eps * r, 0.0, 1.0))
  out = [jnp.zeros((), jnp.float32)] * num_leaves
  for j, i in enumerate(idx):
    out[i] = per[j]
  return jax.tree.unflatten(treedef, out)


def num_to_prune(sparsity: float | jax.Array, units: int) -> int | jax.Array:
  """``round(sparsity · units)``: a Python int for Python numbers (exact, float64), an int32
  array for jax arrays (computed in float32, clipped to [0, units])."""
  if _is_number(sparsity) or isinstance(sparsity, np.ndarray):
    return int(round(float(sparsity) * units))
  s = jnp.clip(jnp.asarray(sparsity, jnp.float32), 0.0, 1.0)
  return jnp.clip(jnp.round(s * units), 0, units).astype(jnp.int32)
