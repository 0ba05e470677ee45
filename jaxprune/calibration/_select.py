"""Which leaves a calibrated pruning method prunes, and with what sparsity (shared by Wanda and
SparseGPT)."""
from __future__ import annotations

import jax
import numpy as np

from jaxprune import _tree, allocation
from jaxprune import structure as structure_lib
from jaxprune.calibration.stats import Calibration, LeafLayout, check_calibrated


def calibrated_leaves(params, cal: Calibration, sparsity, where, method: str):
  """Returns ``(paths, leaves, treedef, todo)`` with ``todo = {index: (layout, sparsity)}``.

  With the default ``where``, the prunable leaves that have statistics in ``cal`` are pruned and
  the others (embeddings, leaves no kernel contraction reads) are left as they are. A leaf that
  an explicit ``where`` selects but ``cal`` has no statistics for is an error naming it.
  """
  if not isinstance(cal, Calibration):
    raise TypeError(f"{method}: `cal` must be a jaxprune Calibration (from jp.calibrate), got "
                    f"{type(cal).__name__}.")
  explicit = where is not None
  paths, leaves, treedef, chosen = _tree.selected(params, where)
  if not explicit:
    chosen = [c and p in cal for p, c in zip(paths, chosen)]
    if not any(chosen):
      raise ValueError(f"{method}: no prunable leaf of params has calibration statistics "
                       f"(calibrated: {list(cal.paths)[:8]}; params: {paths[:8]}).")
  for p, x, c in zip(paths, leaves, chosen):
    if not c:
      continue
    if p not in cal:
      raise ValueError(f"{method}: `where` selects leaf '{p}', but the calibration has no "
                       f"statistics for it (calibrated: {list(cal.paths)[:8]}). Only kernels "
                       "that a dot_general or convolution of the calibrated function reads "
                       "can be pruned with calibration data.")
    lay = check_calibrated(cal, p)
    if tuple(np.shape(x)) != lay.shape:
      raise ValueError(f"{method}: leaf '{p}' has shape {tuple(np.shape(x))}, but it was "
                       f"calibrated with shape {lay.shape}.")
  per_leaf = allocation.per_leaf_sparsities(sparsity, paths, leaves, treedef, chosen)
  todo: dict[int, tuple[LeafLayout, object]] = {
      i: (cal.layout(paths[i]), per_leaf[i]) for i, c in enumerate(chosen) if c}
  return paths, leaves, treedef, todo


def check_structure(st, path: str, layout: LeafLayout, method: str) -> None:
  """N:M must tile each kernel's inputs; says so in the leaf's own terms."""
  if isinstance(st, structure_lib.NOfM) and st.axis in (-2, 0) and layout.n_in % st.m:
    raise ValueError(f"{method}: n_of_m({st.n}, {st.m}) runs along the inputs of each kernel; "
                     f"leaf '{path}' of shape {layout.shape} has {layout.n_in} inputs (axes "
                     f"{layout.in_axes}), not a multiple of {st.m}.")
  for name in slice_names(path, layout):
    st.validate(name, (layout.n_in, layout.n_out))


def slice_names(path: str, layout: LeafLayout) -> list[str]:
  """Names of a leaf's layer slices in masks' error messages: ``path`` or ``path[l]``."""
  if layout.stack_axis is None:
    return [path]
  return [f"{path}[{i}]" for i in range(layout.num_layers)]


def unflatten(treedef, leaves):
  return jax.tree.unflatten(treedef, leaves)
