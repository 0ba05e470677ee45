"""``set``: as :mod:`train.recipes.rigl`, but connections regrow at random (Mocanu et al.,
2018): ``jp.set_training(adam, ...)``."""

import jaxprune as jp
from train.recipes.base import register
from train.recipes.rigl import RigL


@register("set")
class SET(RigL):
  """Sparse Evolutionary Training: drop the smallest weights, regrow at random."""
  factory = staticmethod(jp.set_training)
