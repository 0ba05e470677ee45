"""RigL: sparse from the start, drop the smallest weights and regrow where gradients are large.

``jp.rigl(adam, sparsity=..., update_every=..., end_step=..., drop_fraction=...,
distribution=...)``.
"""

from train.configs import default


def get_config():
  """90% sparse (ERK) throughout; connectivity updated every 100 steps until 75%."""
  config = default.get_config()
  p = config.pruning
  p.method = "rigl"
  p.sparsity = 0.9
  p.update_every = 100
  p.end_step = config.get_ref("num_steps") * 3 // 4
  p.drop_fraction = 0.3
  p.distribution = "erk"
  return config
