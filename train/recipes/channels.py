"""``channels``: prune whole coupled channels while training, shrink, fine-tune the small model.

1. ``train``: ``chain(adam, jp.group_pruning(groups, polynomial_schedule(...)))`` over the
   channel groups ``jaxprune.surgery.channel_groups`` finds in the model (a conv's output
   channels with the next conv's input rows, an MLP's hidden units, attention heads).
2. ``finetune``: ``jaxprune.surgery.shrink_module`` turns the masked model into a physically
   smaller one, trained dense (a fresh optimizer and learning-rate schedule) for
   ``pruning.finetune_steps`` more steps.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune as jp
from jaxprune import _tree, surgery
from train import models
from train.recipes.base import Phase, Recipe, register
from train.trainer import Trainer


def _prunable_size(params, where) -> int:
  paths, leaves, _ = _tree.flatten(params)
  return sum(int(np.size(x)) for path, x in zip(paths, leaves, strict=True) if where(path, x))


@register("channels")
class Channels(Recipe):
  """Channel groups pruned by L2 norm on a cubic schedule, then shrink and fine-tune."""
  sparsity_label = "weights removed (of the prunable ones)"

  def __init__(self, exp):
    super().__init__(exp)
    self.finetune_steps = int(exp.config.pruning.finetune_steps)
    if self.finetune_steps < 0:
      raise ValueError(f"pruning.finetune_steps: must be >= 0, got {self.finetune_steps}")
    self.shrink_info: dict[str, Any] = {}

  def optimizer(self, model, base):
    exp, p = self.exp, self.exp.config.pruning
    fn, state = surgery.module_fn(models.eval_view(model))
    groups = surgery.channel_groups(fn, state, exp.example, where=exp.where)
    if not any(g.prunable for g in groups):
      raise ValueError("pruning.method: 'channels' needs a prunable channel group, and this "
                       "model has none (see jaxprune.surgery.channel_groups for the reasons).")
    exp.notes.append("channel groups pruned: " + ", ".join(
        f"`{g.name}` ({g.size})" for g in groups if g.prunable))
    schedule = jp.polynomial_schedule(float(p.sparsity), begin_step=int(p.begin_step),
                                      end_step=int(p.end_step), power=p.power)
    return optax.chain(base, jp.group_pruning(groups, schedule, update_every=int(p.update_every),
                                              scope=p.scope))

  def phases(self) -> list[Phase]:
    return [*super().phases(), Phase("finetune", self.finetune_steps, self.start_finetune)]

  def start_finetune(self, test) -> dict[str, dict[str, Any]]:
    """Shrinks the channel-pruned model and makes the fine-tuning trainer."""
    exp = self.exp
    big = exp.trainer.model()
    before = exp.trainer.evaluate(test)
    small = surgery.shrink_module(models.eval_view(big), exp.trainer.masks(), exp.example)
    small = models.train_view(small)
    big_params, small_params = exp.pure_params(big), exp.pure_params(small)
    removed = 1.0 - _prunable_size(small_params, exp.where) / exp.initial_prunable
    tx, lr = exp.base_optimizer_for(self.finetune_steps)
    exp.trainer = Trainer(small, tx, mesh=exp.mesh, lr=lr,
                          sparsity_fn=lambda params: jnp.full((), removed, jnp.float32))
    after = exp.trainer.evaluate(test)
    count = lambda t: sum(int(np.size(x)) for x in jax.tree.leaves(t))
    self.shrink_info = {
        "params_before": count(big_params),
        "nonzero_before": int(sum(np.count_nonzero(np.asarray(x))
                                  for x in jax.tree.leaves(big_params))),
        "params_after": count(small_params),
        "accuracy_masked": before["test_accuracy"],
        "accuracy_shrunk": after["test_accuracy"],
        "loss_shrunk": after["test_loss"],
        "removed_fraction": removed,
    }
    return {"shrink/": {"test_accuracy": after["test_accuracy"],
                        "test_loss": after["test_loss"],
                        "params": self.shrink_info["params_after"], "phase": "finetune"}}

  def final_metrics(self) -> dict[str, Any]:
    return dict(self.shrink_info)

  def report_tables(self, final, outputs) -> list[dict[str, Any]]:
    del outputs
    if not self.shrink_info:
      return []
    i = self.shrink_info
    return [{"header": ["model", "parameters", "test accuracy"], "rows": [
        ["masked (before shrink)", f"{i['params_before']:,} ({i['nonzero_before']:,} nonzero)",
         f"{i['accuracy_masked']:.4f}"],
        ["shrunk", f"{i['params_after']:,}", f"{i['accuracy_shrunk']:.4f}"],
        ["shrunk + fine-tuned", f"{final['params']:,}", f"{final['test_accuracy']:.4f}"],
    ]}]
