"""SET: sparse from the start, drop the smallest weights and regrow at random.

``jp.set_training(adam, sparsity=..., update_every=..., end_step=..., drop_fraction=...,
distribution=...)``. Same schedule as the RigL recipe; only the regrowth rule differs.
"""

from train.configs import rigl


def get_config():
  """90% sparse (ERK) throughout; connectivity updated every 100 steps until 75%."""
  config = rigl.get_config()
  config.pruning.method = "set"
  return config
