"""``gmp``: gradual magnitude pruning (Zhu & Gupta 2017).

``chain(adam, magnitude_pruning(polynomial_schedule(sparsity, begin_step, end_step, power),
update_every, structure, scope, distribution, where))``.
"""

import optax

import jaxprune as jp
from train.recipes.base import Recipe, register


@register("gmp")
class GMP(Recipe):
  """Masks every ``pruning.update_every`` steps, sparsity on a polynomial schedule."""
  structured = True

  def optimizer(self, model, base):
    del model
    p = self.exp.config.pruning
    schedule = jp.polynomial_schedule(float(p.sparsity), begin_step=int(p.begin_step),
                                      end_step=int(p.end_step), power=p.power)
    return optax.chain(base, self.magnitude_pruning(schedule, int(p.update_every)))
