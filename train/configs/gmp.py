"""Gradual magnitude pruning (Zhu & Gupta 2017) with a cubic schedule.

``optax.chain(adam, jp.magnitude_pruning(jp.polynomial_schedule(sparsity, begin_step,
end_step, power), update_every=..., structure=..., scope=..., distribution=...))``.
"""

from train.configs import default


def get_config():
  """Prunes from 10% to 67% of training to 90% sparsity (ERK allocation), then fine-tunes."""
  config = default.get_config()
  p = config.pruning
  p.method = "gmp"
  p.sparsity = 0.9
  default.gradual_schedule(config)
  p.structure = "unstructured"
  p.scope = "layerwise"
  # ERK (as RigL uses) keeps the small first conv and the head denser than the wide middle
  # layers; "uniform" prunes every leaf to `sparsity` (CNN at 90%: 64% vs 85% accuracy).
  p.distribution = "erk"
  return config
