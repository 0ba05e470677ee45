"""``rigl``: sparse from the start; every ``update_every`` steps until ``end_step`` the smallest
weights are dropped and as many regrown where the gradient is largest (Evci et al., 2020):
``jp.rigl(adam, sparsity, update_every, end_step, drop_fraction, distribution, where)``.
"""

import jaxprune as jp
from train.recipes.base import Recipe, register


@register("rigl")
class RigL(Recipe):
  """Sparse training with a fixed number of weights; :attr:`factory` picks the regrowth."""
  factory = staticmethod(jp.rigl)

  def optimizer(self, model, base):
    del model
    config = self.exp.config
    p = config.pruning
    return self.factory(base, sparsity=float(p.sparsity), update_every=int(p.update_every),
                        end_step=int(p.end_step), drop_fraction=float(p.drop_fraction),
                        distribution=p.distribution, where=self.exp.where, key=int(config.seed))

  def start(self) -> None:
    self.exp.apply_masks(self.exp.trainer.masks())  # start from the sparse point, not dense
