"""Dense training: no pruning (the baseline every recipe is compared with)."""

from train.configs import default


def get_config():
  """The default config, unchanged: ``pruning.method = "dense"``."""
  return default.get_config()
