"""The mitigation of pruning's disparate impact: fine-tuning a pruned model with its masks
fixed, under per-group loss constraints ``L_g − L ≤ ε`` solved by dual ascent.

What the main loop's ``mitigate`` phase (``config.mitigation``; ``train/configs/mitigation.py``;
:meth:`train.train.Experiment.start_mitigation`) and :func:`train.fairness.mitigation_finetune`
are built from:

* :class:`Mitigation` — the constraints, and their Lagrangian
  (:func:`jaxprune.analysis.constrained_loss`) over the groups of :func:`group_ids`; the
  multipliers take one projected dual ascent step after every primal step
  (:func:`jaxprune.analysis.dual_ascent_update`, in :class:`train.train.Trainer`);
* :func:`mitigation_from_config` — the :class:`Mitigation` a config describes;
* :func:`finetune_optimizer` and :func:`hold_masks` — the optimizer that keeps given masks and
  pruned weights at exactly 0, and putting the masks into a trainer's optimizer state;
* :func:`mitigation_arms` and :func:`mitigation_table` — the before / control / after
  comparison of the report (:mod:`train.analyze`).

References:
  Tran, Fioretto, Kim and Naidu, "Pruning has a disparate impact on model accuracy",
  NeurIPS 2022.
  Hashemizadeh, Ramirez, Sukumaran, Farnadi, Lacoste-Julien and Gallego-Posada, "Balancing Act:
  Constraining Disparate Impact in Sparse Models", ICLR 2024.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxprune import _tree, analysis, transforms
from train.runs import CONTROL_SUFFIX, MITIGATION_SUFFIX
from train.summary import SUMMARY_COLUMNS, markdown_table, mean_std

__all__ = ["GROUPINGS", "MITIGATED", "PRUNED", "Mitigation", "finetune_optimizer", "group_ids",
           "hold_masks", "mitigation_arms", "mitigation_from_config", "mitigation_table"]

GROUPINGS = ("classes", "minority")
"""The values of ``mitigation.groups``."""
PRUNED, MITIGATED = "pruned", "pruned+mitigation"
"""The arms of :mod:`benchmarks.fairness`: plain and constrained fine-tuning of one pruned model."""


class Mitigation(NamedTuple):
  """Per-group loss constraints ``L_g − L ≤ ε``, solved by dual ascent while fine-tuning.

  Attributes:
    epsilon: allowed excess of a group's mean loss over the overall mean loss (``>= 0``).
    dual_lr: step size ``η > 0`` of the projected dual ascent ``λ ← max(0, λ + η·violation)``.
    groups: ``"classes"`` (one constraint per class) or ``"minority"`` (two groups: group 1 =
      the ``minority_classes``, group 0 = the rest).
    minority_classes: the classes of group 1 when ``groups == "minority"``.
  """
  epsilon: float = 0.05
  dual_lr: float = 0.01
  groups: str = "classes"
  minority_classes: tuple[int, ...] = ()

  def validate(self, num_classes: int) -> Mitigation:
    """Checks the fields (``ValueError`` naming ``mitigation.<field>``); returns ``self``."""
    if not self.epsilon >= 0:
      raise ValueError(f"mitigation.epsilon: must be >= 0, got {self.epsilon}")
    if not self.dual_lr > 0:
      raise ValueError(f"mitigation.dual_lr: must be > 0, got {self.dual_lr}")
    if self.groups not in GROUPINGS:
      raise ValueError(f"mitigation.groups: must be one of {GROUPINGS}, got {self.groups!r}")
    if self.groups == "minority":
      if not self.minority_classes:
        raise ValueError("mitigation.minority_classes: needed when groups='minority'")
      bad = [c for c in self.minority_classes if not 0 <= int(c) < num_classes]
      if bad:
        raise ValueError(f"mitigation.minority_classes: {bad} not in [0, {num_classes})")
    return self

  def num_groups(self, num_classes: int) -> int:
    """Number of constraints: ``num_classes`` or 2."""
    return num_classes if self.groups == "classes" else 2

  def lagrangian(self, per_example_loss, labels, multipliers,
                 num_groups: int) -> tuple[jax.Array, jax.Array]:
    """:func:`jaxprune.analysis.constrained_loss` over the groups of :func:`group_ids`.

    Returns ``(lagrangian, violations)``; jit-able (``self`` and ``num_groups`` static).

    Examples:
      >>> import jax.numpy as jnp
      >>> from train.mitigation import Mitigation
      >>> value, v = Mitigation(epsilon=0.5).lagrangian(
      ...     jnp.array([1., 1., 4.]), jnp.array([0, 0, 1]), jnp.array([0., 1.]), 2)
      >>> float(value), v.tolist()
      (3.5, [-1.5, 1.5])
    """
    return analysis.constrained_loss(per_example_loss, group_ids(labels, self), multipliers,
                                     num_groups=num_groups, epsilon=self.epsilon)


def mitigation_from_config(config: Mapping | Any) -> Mitigation | None:
  """The :class:`Mitigation` described by ``config.mitigation`` (a ConfigDict or a dict).

  Fields read: ``epsilon``, ``dual_lr``, ``groups`` (default ``"classes"``) and, for
  ``groups="minority"``, ``minority_classes``. No ``mitigation`` field, ``None``, or
  ``mitigation.enabled == False`` mean no mitigation.

  The main loop reads it for its ``mitigate`` phase (``config.mitigation``; see
  :meth:`train.train.Experiment.start_mitigation` and ``train/configs/mitigation.py``).

  Args:
    config: anything with an optional ``mitigation`` entry (attribute or key).

  Returns:
    A :class:`Mitigation` (checked against the number of classes by
    :meth:`Mitigation.validate`), or None.

  Examples:
    >>> from train.mitigation import mitigation_from_config
    >>> mitigation_from_config({"mitigation": {"epsilon": 0.1, "dual_lr": 0.05}})
    Mitigation(epsilon=0.1, dual_lr=0.05, groups='classes', minority_classes=())
    >>> mitigation_from_config({}) is None
    True
  """
  get = (lambda o, k, d=None: o.get(k, d)) if isinstance(config, Mapping) or hasattr(
      config, "get") else (lambda o, k, d=None: getattr(o, k, d))
  m = get(config, "mitigation")
  if m is None or not get(m, "enabled", True):
    return None
  if get(m, "epsilon") is None or get(m, "dual_lr") is None:
    raise ValueError("config.mitigation: needs `epsilon` and `dual_lr`")
  return Mitigation(epsilon=float(get(m, "epsilon")), dual_lr=float(get(m, "dual_lr")),
                    groups=str(get(m, "groups", "classes")),
                    minority_classes=tuple(int(c) for c in get(m, "minority_classes", ()) or ()))


def group_ids(labels, mitigation: Mitigation) -> jax.Array:
  """The constraint group of each example: its class, or 1 for minority classes and 0 else.

  Jit-able (``mitigation`` is static).

  Examples:
    >>> import jax.numpy as jnp
    >>> from train.mitigation import Mitigation, group_ids
    >>> group_ids(jnp.array([0, 3, 1]), Mitigation(groups="minority",
    ...                                            minority_classes=(1, 3))).tolist()
    [0, 1, 1]
  """
  labels = jnp.asarray(labels, jnp.int32)
  if mitigation.groups == "classes":
    return labels
  minority = jnp.asarray(mitigation.minority_classes, jnp.int32)
  return jnp.any(labels[:, None] == minority[None, :], axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def finetune_optimizer(learning_rate: float, steps: int, sparsity: float = 0.0,
                       optimizer: optax.GradientTransformation | None = None,
                       where: _tree.Where | None = None) -> optax.GradientTransformation:
  """The optimizer of a fine-tuning that keeps given masks: ``chain(inner, magnitude_pruning)``.

  ``inner`` is ``optimizer`` or Adam with a cosine decay from ``learning_rate`` over ``steps``.
  Put the masks into the state with ``jp.replace_masks(tx.init(params), masks)``: the pruning
  link recomputes masks at ``sparsity`` (pruned weights score NaN, so the same masks come back
  at the sparsity they were made at; ``0.0`` keeps any masks as given), ANDs them with the held
  ones, and sends every pruned weight to exactly 0. Cached: equal arguments give the same
  object (so jitted steps are reused).

  Examples:
    >>> import jax.numpy as jnp, optax, jaxprune as jp
    >>> from train.mitigation import finetune_optimizer
    >>> tx = finetune_optimizer(0.1, steps=10)
    >>> params = {"w": jnp.ones((2, 2))}
    >>> state = jp.replace_masks(tx.init(params), {"w": jnp.eye(2, dtype=bool)})
    >>> updates, _ = tx.update(params, state, params)
    >>> (optax.apply_updates(params, updates)["w"] == 0).tolist()
    [[False, True], [True, False]]
  """
  inner = optimizer if optimizer is not None else optax.adam(
      optax.cosine_decay_schedule(learning_rate, max(steps, 1)))
  # Last link: keeps the given masks (pruned weights score NaN, so recomputing at the same
  # sparsity returns the same masks) and lands every pruned weight on exactly 0.
  return optax.chain(inner, transforms.magnitude_pruning(sparsity, update_every=max(steps, 1),
                                                         where=where))


def hold_masks(trainer, masks) -> None:
  """Puts ``masks`` into the pruning state of ``trainer``'s optimizer (``jp.replace_masks``).

  ``trainer`` is a :class:`train.train.Trainer` whose optimizer ends with a pruning link (e.g.
  :func:`finetune_optimizer`); its model and the rest of its state are kept.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> from flax import nnx
    >>> from train import mitigation, models, train
    >>> model = models.create_model("mlp", input_shape=(4,), num_classes=2, rngs=nnx.Rngs(0),
    ...                             hidden=(8,))
    >>> t = train.Trainer(model, mitigation.finetune_optimizer(0.1, steps=5),
    ...                   mesh=train.make_mesh())
    >>> masks = jax.tree.map(lambda m: jnp.zeros(m.shape, bool), t.masks())
    >>> mitigation.hold_masks(t, masks)
    >>> float(jp.sparsity(t.masks()))
    1.0
  """
  optimizer = trainer.optimizer()
  pure = transforms.replace_masks(nnx.as_pure(optimizer.opt_state), masks)
  nnx.update(optimizer.opt_state, nnx.state(pure))
  trainer.set_state(trainer.model(), optimizer)


def mitigation_arms(rows: Sequence[dict], method: str,
                    sparsity: float) -> tuple[dict | None, dict | None, dict | None]:
  """``(pruned, control, mitigated)`` summary rows of a ``<base>+mitigation`` method.

  ``pruned`` is ``<base>`` (the pruned model the mitigation started from, or in
  :mod:`benchmarks.fairness` the plainly fine-tuned one), ``control`` is ``<base>+finetune`` (the
  same fine-tuning without constraints) if present, else None.

  Examples:
    >>> from train.mitigation import mitigation_arms
    >>> rows = [{"method": m, "sparsity": 0.9} for m in ("gmp", "gmp+mitigation")]
    >>> [r and r["method"] for r in mitigation_arms(rows, "gmp+mitigation", 0.9)]
    ['gmp', None, 'gmp+mitigation']
  """
  base = method[:-len(MITIGATION_SUFFIX)] if method.endswith(MITIGATION_SUFFIX) else method
  by = {(r["method"], r["sparsity"]): r for r in rows}
  return (by.get((base, sparsity)), by.get((base + CONTROL_SUFFIX, sparsity)),
          by.get((method, sparsity)))


def mitigation_table(rows: Sequence[dict], sparsity: float,
                     method: str = MITIGATED) -> str | None:
  """Every summary metric at ``sparsity``: dense, pruned (before), the unconstrained control
  (if any) and ``method`` (after), and the change the mitigation made (after minus control,
  or minus before when there is no control).

  Examples:
    >>> from train.mitigation import mitigation_table
    >>> rows = [{"method": "gmp", "sparsity": 0.9, "accuracy_mean": 0.7, "accuracy_std": 0.0},
    ...         {"method": "gmp+mitigation", "sparsity": 0.9, "accuracy_mean": 0.75,
    ...          "accuracy_std": 0.01}]
    >>> print(mitigation_table(rows, 0.9, "gmp+mitigation"))
    | metric | dense | gmp (before) | gmp+mitigation (after) | after − before |
    |---|---|---|---|---|
    | accuracy | — | 0.700 ± 0.000 | 0.750 ± 0.010 | +0.050 |
  """
  before, control, after = mitigation_arms(rows, method, sparsity)
  if before is None or after is None:
    return None
  baseline = control if control is not None else before
  dense = rows[0] if rows and rows[0]["sparsity"] == 0.0 else {}
  body = []
  for key, header, change in SUMMARY_COLUMNS:
    if f"{key}_mean" not in before or f"{key}_mean" not in after:
      continue
    delta = after[f"{key}_mean"] - baseline[f"{key}_mean"]
    cells = [header, mean_std(dense, key) if dense and not change else "—",
             mean_std(before, key, signed=change)]
    cells += [mean_std(control, key, signed=change)] if control is not None else []
    body.append(cells + [mean_std(after, key, signed=change), f"{delta:+.3f}"])
  for key, header in (("pies", "PIEs vs dense population"),
                      ("pies_minority", "PIEs in minority classes")):
    if key in before and key in after and key in baseline:
      cells = [header, "—", str(before[key])]
      cells += [str(control[key])] if control is not None else []
      body.append(cells + [str(after[key]), f"{after[key] - baseline[key]:+d}"])
  header = ["metric", "dense", f"{before['method']} (before)"]
  header += [f"{control['method']} (control)"] if control is not None else []
  header += [f"{after['method']} (after)",
             "after − control" if control is not None else "after − before"]
  return markdown_table(header, body)
