"""jaxprune: neural-network pruning for JAX.

Pure functions over parameter pytrees that return masks, optax transforms that keep a model
sparse while it trains, surgery that makes structured-pruned models physically smaller, and
analysis of what pruning costs. See README.md and docs/design.md.
"""
# Layers 7-8 import the core above, so they come last.
from jaxprune import analysis, calibration, stacking, surgery, tree  # noqa: E402
from jaxprune.allocation import erk_sparsities
from jaxprune.analysis import (  # noqa: E402
                             accuracy_vs_sparsity,
                             constrained_loss,
                             disparate_impact,
                             dual_ascent_update,
                             layer_sensitivity,
                             mask_overlap,
                             pairwise_mask_overlap,
                             per_group_metrics,
                             pruning_identified_exemplars,
                             seed_spread,
)
from jaxprune.calibration import Calibration, calibrate, sequential, sparsegpt, wanda  # noqa: E402
from jaxprune.compress import as_compressed, compress, decompress  # noqa: E402
from jaxprune.fixed_masks import keep_masks  # noqa: E402
from jaxprune.group_pruning import group_pruning  # noqa: E402
from jaxprune.masks import apply_masks, lowest_k, prune, sparsity, summary, topk_mask
from jaxprune.rewinding import rewind, ticket_masks
from jaxprune.schedules import (
                             constant_schedule,
                             iterative_schedule,
                             one_shot_schedule,
                             polynomial_schedule,
)
from jaxprune.scores import (
                             activation_scores,
                             magnitude_scores,
                             movement_scores,
                             random_scores,
                             saliency_scores,
)
from jaxprune.sparse_inference import SparseKernel, sparsify_for_inference  # noqa: E402
from jaxprune.sparse_training import (
                             SparseTrainingState,
                             cosine_drop_fraction,
                             reset_inner_state,
                             rigl,
                             set_training,
)
from jaxprune.structure import blocks, channels, n_of_m, per_output, unstructured
from jaxprune.surgery import (  # noqa: E402
                             channel_groups,
                             group_masks,
                             group_scores,
                             module_fn,
                             shrink,
                             shrink_module,
)
from jaxprune.transforms import (
                             PruningState,
                             apply_masks_straight_through,
                             magnitude_pruning,
                             masks_from_state,
                             movement_pruning,
                             pruning,
                             random_pruning,
                             replace_masks,
                             saliency_pruning,
)

__version__ = "0.1.0"

__all__ = [
    # paths and `where` helpers
    "tree", "stacking",
    # scores
    "magnitude_scores", "random_scores", "saliency_scores", "movement_scores",
    "activation_scores",
    # structure
    "unstructured", "n_of_m", "blocks", "channels", "per_output",
    # allocation
    "erk_sparsities",
    # masks
    "topk_mask", "apply_masks", "sparsity", "summary", "prune", "lowest_k",
    # schedules
    "constant_schedule", "one_shot_schedule", "polynomial_schedule", "iterative_schedule",
    # transforms
    "pruning", "magnitude_pruning", "random_pruning", "saliency_pruning", "movement_pruning",
    "apply_masks_straight_through", "masks_from_state", "replace_masks", "PruningState",
    "rigl", "set_training", "SparseTrainingState", "cosine_drop_fraction", "reset_inner_state",
    "rewind", "ticket_masks", "group_pruning", "keep_masks",
    # surgery
    "surgery", "channel_groups", "group_scores", "group_masks", "shrink", "shrink_module",
    "module_fn",
    # calibration
    "calibration", "calibrate", "Calibration", "wanda", "sparsegpt", "sequential",
    # analysis
    "analysis", "per_group_metrics", "disparate_impact", "pruning_identified_exemplars",
    "mask_overlap", "pairwise_mask_overlap", "seed_spread", "layer_sensitivity",
    "accuracy_vs_sparsity", "constrained_loss", "dual_ascent_update",
    # export
    "compress", "decompress", "as_compressed", "sparsify_for_inference", "SparseKernel",
]
