"""Layer 7b — calibration: one-shot pruning of a trained model from a few batches.

* :func:`calibrate` traces ``fn(params, batch)`` and accumulates, for every prunable kernel it
  contracts with an input, the Gram matrix ``Σ xᵀx`` of those inputs (a :class:`Calibration`).
* :func:`wanda` prunes by ``|W|·‖X‖`` within each output, without a weight update.
* :func:`sparsegpt` prunes with the optimal-brain-surgeon update of the remaining weights.
* :func:`sequential` runs either block by block, each block calibrated on the outputs of the
  already pruned blocks before it.
* With ``chunk_size``, both evaluate each batch in fixed-size row chunks
  (:mod:`jaxprune.calibration._chunks`): masks and weights are then the same bits on 1 device
  and on any number of data-parallel devices.

Masks keep every jaxprune rule (exact counts, the params' tree, scalar ``True`` for leaves not
pruned, unstructured or N:M along each kernel's input axis), and are computed with
:func:`jaxprune.topk_mask` / :func:`jaxprune.lowest_k`.
"""
from jaxprune.calibration.activation import wanda, wanda_scores
from jaxprune.calibration.blockwise import sequential
from jaxprune.calibration.collect import calibrate
from jaxprune.calibration.obs import inverse_hessian_factor, prune_matrix, sparsegpt
from jaxprune.calibration.stats import Calibration, LeafLayout

__all__ = ["Calibration", "LeafLayout", "calibrate", "wanda", "wanda_scores", "sparsegpt",
           "sequential", "prune_matrix", "inverse_hessian_factor"]
