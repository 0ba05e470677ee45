"""``oneshot``: one-shot magnitude pruning at ``pruning.at_step``, then training with the masks
fixed: ``chain(adam, magnitude_pruning(one_shot_schedule(sparsity, at_step), ...))``.

With ``pruning.structure = "2:4"`` this is the ``nm24`` config (semi-structured N:M).
"""

import optax

import jaxprune as jp
from train.recipes.base import Recipe, register


@register("oneshot")
class OneShot(Recipe):
  """Dense until ``at_step``; there the smallest weights go, and stay at exactly 0."""
  structured = True

  def __init__(self, exp):
    super().__init__(exp)
    n, at = exp.num_steps, int(exp.config.pruning.at_step)
    if not 0 <= at < n:
      raise ValueError(f"pruning.at_step: must be in [0, num_steps={n}), got {at}")
    self.at_step = at

  def optimizer(self, model, base):
    del model
    at, s = self.at_step, float(self.exp.config.pruning.sparsity)
    return optax.chain(base, self.magnitude_pruning(
        jp.one_shot_schedule(s, at), at if at > 0 else self.exp.num_steps))
