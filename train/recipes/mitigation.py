"""The ``mitigate`` phase, which ``config.mitigation.enabled`` adds after any method's phases.

The pruned model is fine-tuned for ``mitigation.steps`` with its masks fixed
(:func:`train.mitigation.finetune_optimizer`: Adam with a cosine decay from
``mitigation.learning_rate``, then a pruning link holding the current masks) under per-group
loss constraints solved by dual ascent (:class:`train.mitigation.Mitigation`, Tran et al. 2022),
or with plain cross-entropy when ``mitigation.constrained`` is False (the control arm). The
outputs of the pruned model at the phase's start go to ``predictions_before_mitigation.npz``
and the report compares both.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

import jaxprune as jp
from train import mitigation as mitigation_lib
from train import runs
from train.recipes.base import Phase, Recipe
from train.trainer import Trainer

PREDICTIONS_BEFORE = runs.PREDICTIONS_BEFORE_MITIGATION
"""The file of the outputs at the start of the ``mitigate`` phase (the pruned model)."""


class Mitigate(Recipe):
  """The ``mitigate`` phase of ``steps`` steps under ``constraint`` (None: plain fine-tuning).

  Build it with :meth:`from_config`. Sets ``exp.mitigation`` to ``constraint``.
  """

  def __init__(self, exp, constraint: mitigation_lib.Mitigation | None, steps: int):
    super().__init__(exp)
    self.constraint = constraint
    self.steps = steps
    self.before: dict[str, Any] = {}  # the outputs at the phase's start
    exp.mitigation = constraint

  @classmethod
  def from_config(cls, exp) -> Mitigate | None:
    """The phase ``exp.config.mitigation`` asks for, or None (``mitigation.enabled`` False).

    Raises:
      ValueError: naming the ``mitigation.*`` key of a bad value.
    """
    m = exp.config.get("mitigation")
    if m is None or not m.get("enabled", False):
      return None
    steps = int(m.get("steps", 0))
    if steps < 1:
      raise ValueError(f"mitigation.steps: must be >= 1 when mitigation.enabled, got {steps}")
    if not float(m.get("learning_rate", 0.0)) > 0:
      raise ValueError(f"mitigation.learning_rate: must be > 0, got {m.get('learning_rate')}")
    constraint = None
    if m.get("constrained", True):
      constraint = mitigation_lib.mitigation_from_config(exp.config).validate(exp.info.num_classes)
    return cls(exp, constraint, steps)

  @property
  def method_name(self) -> str:
    """The name :mod:`train.analyze` gives the run after the phase."""
    return self.exp.method + ("+mitigation" if self.constraint is not None else "+finetune")

  def phases(self) -> list[Phase]:
    return [Phase("mitigate", self.steps, self.start_phase)]

  def start_phase(self, test) -> dict:
    """Keeps the pruned model's outputs and makes the phase's trainer."""
    exp = self.exp
    if jax.process_count() == 1:  # test logits are gathered in single-process runs only
      self.before = exp.outputs(test)
    masks = exp.current_masks()
    m = exp.config.mitigation
    lr = optax.cosine_decay_schedule(float(m.learning_rate), self.steps)
    if masks is None:
      tx = optax.adam(lr)
    else:
      tx = mitigation_lib.finetune_optimizer(float(m.learning_rate), self.steps, 0.0, None,
                                             exp.where)
    model = exp.trainer.model()
    exp.trainer = Trainer(model, tx, mesh=exp.mesh, lr=lr, sparsity_fn=exp.trainer.sparsity,
                          mitigation=self.constraint, num_classes=exp.info.num_classes)
    if masks is not None:
      mitigation_lib.hold_masks(exp.trainer, masks)
    return {}

  def extra_outputs(self) -> dict[str, dict[str, Any]]:
    return {PREDICTIONS_BEFORE: self.before} if self.before else {}

  def report_tables(self, final, outputs) -> list[dict[str, Any]]:
    """Before / after the phase: accuracy overall, of the worst class and of the unbalanced
    classes (``config.imbalance.classes``), and the largest multiplier."""
    del final
    if not self.before or outputs is None:
      return []
    imb = self.exp.config.get("imbalance")
    minority = [int(c) for c in imb.classes] if imb is not None and imb.get("classes") else []
    header = ["model", "test accuracy", "worst-class accuracy"]
    header += ["accuracy of classes " + ",".join(map(str, minority))] if minority else []
    header += ["largest multiplier λ"]
    rows = []
    for name, out in (("pruned (before)", self.before), (self.method_name + " (after)", outputs)):
      logits, labels, lam = out["logits"], out["labels"], out["multipliers"]
      pred = np.argmax(logits, -1)
      per_class = jp.analysis.per_group_metrics(logits, labels,
                                                num_groups=self.exp.info.num_classes).accuracy
      row = [name, f"{np.mean(pred == labels):.4f}", f"{np.nanmin(np.asarray(per_class)):.4f}"]
      if minority:
        sel = np.isin(labels, minority)
        row.append(f"{np.mean(pred[sel] == labels[sel]):.4f}")
      row.append("—" if lam is None else f"{float(np.max(lam)):.3f}")
      rows.append(row)
    return [{"header": header, "rows": rows}]
