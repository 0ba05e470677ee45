"""Layer 8 — analysis: what pruning cost, overall, per class or group, per layer and per seed.

Pure functions on predictions, logits, labels and masks (jax, numpy); plots use matplotlib,
imported only when a plot function is called.

- :func:`per_group_metrics`, :func:`disparate_impact` — per-class / per-group accuracy, recall,
  precision, loss and their change (Tran et al., 2022).
- :func:`pruning_identified_exemplars`, :func:`plot_exemplar_gallery` — examples whose modal
  prediction changes between dense and pruned populations (Hooker et al., 2019).
- :func:`seed_spread`, :func:`mask_overlap`, :func:`pairwise_mask_overlap` — seed sensitivity.
- :func:`layer_sensitivity`, :func:`plot_layer_sensitivity` — one layer pruned at a time.
- :func:`accuracy_vs_sparsity`, :func:`plot_accuracy_vs_sparsity` — mean ± std curves.
- :func:`constrained_loss`, :func:`dual_ascent_update` — fine-tuning under per-group loss
  constraints, to mitigate disparate impact.
"""
from jaxprune.analysis.constrained import constrained_loss, dual_ascent_update
from jaxprune.analysis.curves import (
    Curve,
    SparsityCurves,
    accuracy_vs_sparsity,
    plot_accuracy_vs_sparsity,
)
from jaxprune.analysis.exemplars import (
    Exemplars,
    modal_prediction,
    plot_exemplar_gallery,
    pruning_identified_exemplars,
)
from jaxprune.analysis.groups import (
    DisparateImpact,
    GroupMetrics,
    disparate_impact,
    per_group_metrics,
)
from jaxprune.analysis.seeds import (
    MaskOverlap,
    SeedSpread,
    mask_overlap,
    pairwise_mask_overlap,
    seed_spread,
)
from jaxprune.analysis.sensitivity import (
    LayerSensitivity,
    layer_sensitivity,
    plot_layer_sensitivity,
)

__all__ = [
    "per_group_metrics", "disparate_impact", "GroupMetrics", "DisparateImpact",
    "pruning_identified_exemplars", "modal_prediction", "plot_exemplar_gallery", "Exemplars",
    "mask_overlap", "pairwise_mask_overlap", "seed_spread", "MaskOverlap", "SeedSpread",
    "layer_sensitivity", "plot_layer_sensitivity", "LayerSensitivity",
    "accuracy_vs_sparsity", "plot_accuracy_vs_sparsity", "SparsityCurves", "Curve",
    "constrained_loss", "dual_ascent_update",
]
