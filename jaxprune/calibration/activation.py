"""Wanda: pruning by weight magnitude times input-feature norm, compared within each output.

References:
  Sun, Liu, Bair and Kolter, "A Simple and Effective Pruning Approach for Large Language
  Models" (Wanda), ICLR 2024 (arXiv 2023).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprune import _tree
from jaxprune import masks as masks_lib
from jaxprune import structure as structure_lib
from jaxprune.calibration import _select
from jaxprune.calibration.stats import Calibration


def wanda_scores(params, cal: Calibration, *, where: _tree.Where | None = None):
  """Wanda's scores ``|W_ij| · ‖X_j‖₂`` for every calibrated leaf (other leaves unchanged).

  ``‖X_j‖₂`` is the square root of the Gram diagonal of the input feature that weight ``W_ij``
  is contracted with, on whatever axes the calibration found the leaf contracted on.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.array([[1., -1.], [2., 2.]])}       # (in=2, out=2)
    >>> x = jnp.array([[3., 0.], [0., 0.5]])                    # feature norms 3 and 0.5
    >>> cal = jp.calibrate(lambda p, x: x @ p["w"], params, [x])
    >>> jp.calibration.wanda_scores(params, cal)["w"]
    Array([[3., 3.],
           [1., 1.]], dtype=float32)
  """
  paths, leaves, treedef, todo = _select.calibrated_leaves(params, cal, 0.0, where, "wanda")
  out = list(leaves)
  for i, (lay, _) in todo.items():
    mats = jnp.abs(lay.to_matrix(leaves[i]).astype(jnp.float32))
    out[i] = lay.from_matrix(mats * cal.input_norms(paths[i])[:, :, None])
  return jax.tree.unflatten(treedef, out)


def wanda(params, cal: Calibration, sparsity, *, structure=None,
          where: _tree.Where | None = None):
  """Wanda: masks from ``|W| · ‖X‖`` without a weight update.

  Every calibrated kernel is viewed as its ``(n_in, n_out)`` matrix (its contraction axes
  first, see :class:`jaxprune.calibration.LeafLayout`; a stacked leaf as one matrix per layer
  slice), scored with :func:`wanda_scores` and masked with :func:`jaxprune.topk_mask`, so the
  counts are exact and ties go by index.

  Args:
    params: a pytree of arrays (the one calibrated).
    cal: statistics from :func:`jaxprune.calibrate`.
    sparsity: fraction to remove, as in :func:`jaxprune.topk_mask` (may be traced).
    structure: on the ``(n_in, n_out)`` matrix of each layer. Default
      :func:`jaxprune.per_output` (the paper's comparison group: every output loses exactly
      ``round(s · n_in)`` inputs); :func:`jaxprune.unstructured` compares over the whole layer;
      :func:`jaxprune.n_of_m` keeps ``n`` of every ``m`` consecutive inputs (axis -2).
    where: ``(path, leaf) -> bool`` choosing leaves; default: the prunable leaves that have
      statistics in ``cal``.

  Returns:
    ``(params, masks)``: ``apply_masks(params, masks)`` and the masks (the params' tree, scalar
    ``True`` for leaves that are not pruned).

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 4)), "b": jnp.zeros(4)}
    >>> fn = lambda p, x: x @ p["w"] + p["b"][None, :]
    >>> cal = jp.calibrate(fn, params, [jax.random.normal(jax.random.key(1), (16, 8))])
    >>> pruned, masks = jp.wanda(params, cal, 0.5)
    >>> masks["w"].sum(axis=0).tolist()                  # each output keeps 4 of its 8 inputs
    [4, 4, 4, 4]

  References:
    Sun, Liu, Bair and Kolter, "A Simple and Effective Pruning Approach for Large Language
    Models" (Wanda), ICLR 2024 (arXiv 2023).
  """
  st = structure_lib.per_output() if structure is None else structure
  paths, leaves, treedef, todo = _select.calibrated_leaves(params, cal, sparsity, where, "wanda")
  masks = [jnp.ones((), bool)] * len(leaves)
  for i, (lay, s) in todo.items():
    _select.check_structure(st, paths[i], lay, "wanda")
    scores = jnp.abs(lay.to_matrix(leaves[i]).astype(jnp.float32))
    scores = scores * cal.input_norms(paths[i])[:, :, None]
    names = _select.slice_names(paths[i], lay)
    keep = masks_lib.topk_mask({n: scores[j] for j, n in enumerate(names)}, s, structure=st,
                               layout="flax")  # every slice is an (n_in, n_out) matrix here
    masks[i] = lay.from_matrix(jnp.stack([keep[n] for n in names]))
  masks = jax.tree.unflatten(treedef, masks)
  return masks_lib.apply_masks(params, masks), masks
