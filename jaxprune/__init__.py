"""jaxprune: neural-network pruning for JAX.

Pure functions over parameter pytrees that return masks, optax transforms that keep a model
sparse while it trains, surgery that makes structured-pruned models physically smaller, and
analysis of what pruning costs. See README.md and docs/design.md.
"""
from jaxprune.allocation import erk_sparsities
from jaxprune.masks import apply_masks, lowest_k, prune, sparsity, summary, topk_mask
from jaxprune.scores import (activation_scores, magnitude_scores, movement_scores,
                             random_scores, saliency_scores)
from jaxprune.structure import blocks, channels, n_of_m, per_output, unstructured

__version__ = "0.1.0"

__all__ = [
    # scores
    "magnitude_scores", "random_scores", "saliency_scores", "movement_scores",
    "activation_scores",
    # structure
    "unstructured", "n_of_m", "blocks", "channels", "per_output",
    # allocation
    "erk_sparsities",
    # masks
    "topk_mask", "apply_masks", "sparsity", "summary", "prune", "lowest_k",
]
