"""``imp``: iterative magnitude pruning with rewinding (lottery tickets), all rounds in one run.

``num_steps`` is ``rounds + 1`` trainings of ``segment = num_steps // (rounds + 1)`` steps. The
optimizer is ``chain(adam, magnitude_pruning(0.0))`` (a pruning link that only holds masks) and
its learning rate spans one segment. Before step ``r · segment`` (round ``r = 1 ... rounds``) the
weights of smallest magnitude go (``jp.ticket_masks``, to ``1 - (1 - sparsity) ** (r /
rounds)``), the survivors are rewound to their values at ``rewind_step`` (``jp.rewind``) and a
fresh optimizer holds the new masks (``jp.replace_masks``). Checkpoints hold the rewind point.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxprune as jp
from train.recipes.base import Recipe, register


@register("imp")
class IMP(Recipe):
  """Prune, rewind, restart: ``pruning.rounds`` rounds to ``pruning.sparsity``."""

  def __init__(self, exp):
    super().__init__(exp)
    p, n = exp.config.pruning, exp.num_steps
    self.rounds = int(p.rounds)
    if self.rounds < 1:
      raise ValueError(f"pruning.rounds: must be >= 1, got {self.rounds}")
    self.segment = n // (self.rounds + 1)
    if self.segment < 1:
      raise ValueError(f"num_steps: {n} is too few for {self.rounds + 1} IMP trainings")
    self.rewind_step = int(p.rewind_step)
    if not 0 <= self.rewind_step < self.segment:
      raise ValueError(f"pruning.rewind_step: must be in [0, {self.segment}) (one round), "
                       f"got {p.rewind_step}")
    self.rewind_params = None  # the weights rounds rewind to

  def lr_steps(self) -> int:
    return self.segment  # restarts with every round's fresh optimizer

  def optimizer(self, model, base):
    del model
    return optax.chain(base, jp.magnitude_pruning(0.0, update_every=self.segment,
                                                  where=self.exp.where))

  def start(self) -> None:
    self.rewind_params = jax.tree.map(jnp.copy, self.exp.trainer.params())

  def before_step(self, step: int) -> None:
    """Saves the rewind point at ``rewind_step``; starts round ``r`` at ``r · segment``."""
    if step == self.rewind_step and step > 0:
      self.rewind_params = jax.tree.map(jnp.copy, self.exp.trainer.params())
    r, pos = divmod(step, self.segment)
    if pos == 0 and 1 <= r <= self.rounds:
      self._round(r)

  def _round(self, r: int) -> None:
    p, trainer = self.exp.config.pruning, self.exp.trainer
    s_r = 1.0 - (1.0 - float(p.sparsity)) ** (r / self.rounds)
    masks = jp.ticket_masks(trainer.params(), s_r, masks=trainer.masks(), scope=p.scope,
                            where=self.exp.where)
    model = trainer.model()
    nnx.update(model, jp.rewind(masks, self.rewind_params))
    optimizer = nnx.Optimizer(model, trainer.tx, wrt=nnx.Param)  # a fresh optimizer
    pure = jp.replace_masks(nnx.as_pure(optimizer.opt_state), masks)
    nnx.update(optimizer.opt_state, nnx.state(pure))
    trainer.set_state(model, optimizer)

  def extra_state(self) -> dict[str, Any]:
    return {"rewind": self.rewind_params}

  def load_extra_state(self, extra) -> None:
    self.rewind_params = extra["rewind"]
