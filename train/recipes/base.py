"""What a recipe is: :class:`Recipe` (its optimizer, phases, work between steps and records),
:class:`Phase`, and the registry (:func:`register`, :func:`get`) that maps
``config.pruning.method`` to one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import optax

import jaxprune as jp

if TYPE_CHECKING:
  from flax import nnx

  from train import input_pipeline
  from train.experiment import Experiment

__all__ = ["Phase", "Recipe", "get", "names", "register"]

Records = Mapping[str, Mapping[str, Any]]
"""``{prefix: metrics}`` to write into ``metrics.jsonl`` (e.g. ``{"shrink/": {...}}``)."""


@dataclasses.dataclass(frozen=True)
class Phase:
  """A stretch of training with its own :class:`train.trainer.Trainer` and checkpoints.

  Phases run one after the other; the steps count on across them (a phase after one of
  ``n`` steps begins at step ``n``).

  Attributes:
    name: ``"train"`` for the first phase; the checkpoints of later ones go to
      ``checkpoints_<name>``.
    steps: its number of optimizer steps (>= 0).
    start: ``start(test) -> records``, or None (the first phase: the experiment's trainer).
      Called when the phase begins, and again when a run resumes inside or after it, before
      its checkpoint is restored: it makes the phase's trainer (``exp.trainer``). The records
      it returns are written at the phase's first step, once (not when resuming).
  """
  name: str
  steps: int
  start: Callable[[input_pipeline.EvalData], Records] | None = None


class Recipe:
  """One ``config.pruning.method``, or a part any method may add (the ``mitigate`` phase).

  The base class is dense training in one ``train`` phase; a recipe overrides what differs.
  The experiment calls, in this order: the constructor (validates the recipe's config keys,
  raising ``ValueError`` naming them), :meth:`lr_steps` and :meth:`optimizer` (the first
  trainer's optimizer), :meth:`start` (once that trainer exists) and :meth:`phases`; then the
  loop calls :meth:`before_step` before every step of every phase, and checkpoints hold
  :meth:`extra_state`. What a run records comes from :meth:`final_metrics`,
  :meth:`report_tables` and :meth:`extra_outputs`.

  Attributes:
    name: the registered method name (set by :func:`register`).
    structured: reads ``pruning.structure`` (the experiment's ``structure``; leaves it cannot
      fit stay dense).
    prunes: prunes the leaves ``pruning.where`` selects; False (dense): nothing is selected
      by the config, and ``where`` is jaxprune's default (for reports only).
    sparsity_label: the report's name for the final sparsity.
    exp: the :class:`train.experiment.Experiment` the recipe belongs to.
  """
  name: str = ""
  structured: bool = False
  prunes: bool = True
  sparsity_label: str = "sparsity (prunable weights)"

  def __init__(self, exp: Experiment):
    self.exp = exp

  # -- the optimizer and the phases
  def lr_steps(self) -> int:
    """The steps the learning-rate schedule spans (the optimizer restarts every so many)."""
    return self.exp.num_steps

  def optimizer(self, model: nnx.Module,
                base: optax.GradientTransformation) -> optax.GradientTransformation:
    """The first phase's optimizer, given the model and the base optimizer (Adam or AdamW)."""
    del model
    return base

  def start(self) -> None:
    """Work once the first trainer exists (``exp.trainer``), before any step."""

  def phases(self) -> list[Phase]:
    """The recipe's phases, in order (the first one of a method is named ``"train"``)."""
    return [Phase("train", self.exp.num_steps)]

  # -- between steps, and in checkpoints
  def before_step(self, step: int) -> None:
    """Work due before optimizer step ``step`` (of any phase)."""

  def extra_state(self) -> dict[str, Any]:
    """What checkpoints hold for this recipe besides model, optimizer and step."""
    return {}

  def load_extra_state(self, extra: Mapping[str, Any]) -> None:
    """Takes back :meth:`extra_state` from a restored checkpoint."""

  # -- what the run records
  def final_metrics(self) -> dict[str, Any]:
    """Numbers added to the run's final metrics (and to what ``train_and_evaluate`` returns)."""
    return {}

  def report_tables(self, final: Mapping[str, Any],
                    outputs: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Extra tables of ``report.md``: ``{"header": [...], "rows": [[...], ...]}`` each.

    ``outputs``: the final :meth:`train.experiment.Experiment.outputs` (None with several
    processes).
    """
    del final, outputs
    return []

  def extra_outputs(self) -> dict[str, Mapping[str, Any]]:
    """``{file name: outputs}`` written next to ``predictions.npz`` in the same format."""
    return {}

  # -- shared by the magnitude recipes
  def magnitude_pruning(self, sparsity, update_every: int) -> optax.GradientTransformation:
    """``jp.magnitude_pruning`` with the config's structure, scope, distribution and where."""
    p = self.exp.config.pruning
    return jp.magnitude_pruning(sparsity, update_every=update_every,
                                structure=self.exp.structure, scope=p.scope,
                                distribution=p.distribution, where=self.exp.where)


_REGISTRY: dict[str, type[Recipe]] = {}


def register(name: str) -> Callable[[type[Recipe]], type[Recipe]]:
  """Class decorator: registers a :class:`Recipe` as ``config.pruning.method = name``.

  Examples:
    >>> from train import recipes
    >>> @recipes.register("my_dense")
    ... class MyDense(recipes.Recipe):
    ...   pass
    >>> recipes.get("my_dense") is MyDense, MyDense.name
    (True, 'my_dense')
    >>> recipes.unregister("my_dense")
  """
  def decorate(cls: type[Recipe]) -> type[Recipe]:
    if name in _REGISTRY:
      raise ValueError(f"recipe {name!r} is already registered ({_REGISTRY[name].__name__})")
    cls.name = name
    _REGISTRY[name] = cls
    return cls
  return decorate


def unregister(name: str) -> None:
  """Removes a recipe from the registry (for tests and notebooks)."""
  _REGISTRY.pop(name)


def get(name: str) -> type[Recipe]:
  """The recipe registered as ``name``.

  Raises:
    ValueError: naming ``pruning.method``, if there is none.
  """
  if name not in _REGISTRY:
    raise ValueError(f"pruning.method: expected one of {names()}, got {name!r}")
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  """The registered method names, in registration order."""
  return tuple(_REGISTRY)
