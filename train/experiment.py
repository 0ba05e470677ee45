"""Setting up one experiment: the model, ``where``, the learning rate, the recipe and its phases.

:class:`Experiment` builds what ``config`` asks for: the model (:func:`build_model`), the
leaves the recipe prunes (:func:`make_where`, with :func:`parse_structure`), the first
:class:`train.trainer.Trainer` with the recipe's optimizer (:mod:`train.recipes`, looked up by
``config.pruning.method``), and the run's phases. ``train.train.train_and_evaluate`` then runs
those phases in its one loop.

Pruning applies to the leaves ``where`` selects: jaxprune's default (floating leaves with
``ndim >= 2``) intersected with the optional regex ``pruning.where``; a structure that cannot
fit a leaf (2:4 on a kernel whose input axis is not a multiple of 4) leaves it dense, and the
report says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import jaxprune as jp
from jaxprune import _tree
from train import input_pipeline, models, recipes
from train.trainer import Trainer

__all__ = ["Experiment", "base_optimizer", "build_model", "make_lr", "make_where",
           "parse_structure"]

def parse_structure(spec: str):
  """A jaxprune structure from its config string.

  ``"unstructured"``, ``"channels"`` (whole output channels of each leaf), ``"per_output"``,
  ``"N:M"`` (``jp.n_of_m(N, M)``) or ``"HxW"`` (``jp.blocks((H, W))``).

  Raises:
    ValueError: naming ``pruning.structure``, for anything else.

  Examples:
    >>> from train import experiment
    >>> experiment.parse_structure("2:4")
    NOfM(n=2, m=4, axis=-2)
  """
  spec = str(spec).strip()
  if spec == "unstructured":
    return jp.unstructured()
  if spec == "channels":
    return jp.channels()
  if spec == "per_output":
    return jp.per_output()
  if m := re.fullmatch(r"(\d+):(\d+)", spec):
    return jp.n_of_m(int(m.group(1)), int(m.group(2)))
  if m := re.fullmatch(r"(\d+)x(\d+)", spec):
    return jp.blocks((int(m.group(1)), int(m.group(2))))
  raise ValueError(f"pruning.structure: expected 'unstructured', 'channels', 'per_output', "
                   f"'N:M' or 'HxW', got {spec!r}")


def make_where(regex: str | None, params, structure=None) -> tuple[Callable, dict[str, str]]:
  """The ``where`` a recipe prunes, and the leaves its structure had to leave dense.

  A leaf is pruned when jaxprune's default selects it (floating, ``ndim >= 2``), ``regex``
  (if given) is found in its path, and ``structure`` fits its shape.

  Args:
    regex: ``config.pruning.where`` (``None`` or ``""``: no extra condition).
    params: the parameter tree (shapes are read to check the structure).
    structure: a jaxprune structure, or None.

  Returns:
    ``(where, skipped)``: the predicate, and ``{path: reason}`` for leaves left dense because
    the structure does not fit them.

  Raises:
    ValueError: naming ``pruning.where``, if nothing is selected or the regex is invalid.

  Examples:
    >>> import numpy as np
    >>> from train import experiment
    >>> params = {"a": np.ones((1, 8)), "b": np.ones((8, 8)), "bias": np.ones(8)}
    >>> where, skipped = experiment.make_where(None, params, experiment.parse_structure("2:4"))
    >>> where("b", params["b"]), where("a", params["a"]), sorted(skipped)
    (True, False, ['a'])
  """
  try:
    pattern = re.compile(regex) if regex else None
  except re.error as e:
    raise ValueError(f"pruning.where: invalid regular expression {regex!r}: {e}") from e

  def base(path, leaf):
    return _tree.default_where(path, leaf) and (pattern is None or bool(pattern.search(path)))

  paths, leaves, _ = _tree.flatten(params)
  skipped = {}
  if structure is not None:
    for path, leaf in zip(paths, leaves, strict=True):
      if base(path, leaf):
        try:
          structure.validate(path, tuple(np.shape(leaf)))
        except ValueError as e:
          skipped[path] = str(e)

  def where(path, leaf):
    return base(path, leaf) and path not in skipped

  if not any(where(p, x) for p, x in zip(paths, leaves, strict=True)):
    raise ValueError(f"pruning.where: no leaf is prunable (regex {regex!r}, structure "
                     f"{structure}); leaves: {paths[:10]}")
  return where, skipped


def make_lr(config: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
  """The learning-rate schedule of one training phase of ``steps`` steps.

  ``lr_schedule="constant"``: ``learning_rate`` throughout; ``"cosine"``: linear warmup over
  ``warmup_steps``, then cosine decay to 0 at ``steps``.

  Examples:
    >>> from train import experiment
    >>> from train.configs import default
    >>> lr = experiment.make_lr(default.get_config(), 100)
    >>> round(float(lr(0)), 6), float(lr(50)) < 0.01, float(lr(100))
    (0.01, True, 0.0)
  """
  lr, warmup = float(config.learning_rate), int(config.warmup_steps)
  if config.lr_schedule == "constant":
    return optax.constant_schedule(lr)
  if config.lr_schedule == "cosine":
    if warmup > 0:
      return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
    return optax.cosine_decay_schedule(lr, max(steps, 1))
  raise ValueError(f"lr_schedule: expected 'cosine' or 'constant', got {config.lr_schedule!r}")


def base_optimizer(config: ml_collections.ConfigDict,
                   lr: optax.Schedule) -> optax.GradientTransformation:
  """``optax.adam(lr)``, or ``optax.adamw`` when ``config.weight_decay > 0``."""
  if config.weight_decay > 0:
    return optax.adamw(lr, weight_decay=config.weight_decay)
  return optax.adam(lr)


def build_model(config: ml_collections.ConfigDict, info: input_pipeline.Metadata) -> nnx.Module:
  """``models.create_model(config.model, ...)`` with ``config.model_kwargs[config.model]``.

  Initialized from ``config.seed``; in train mode.

  Examples:
    >>> from train import experiment, input_pipeline
    >>> from train.configs import default
    >>> info = input_pipeline.Metadata("mnist1d", (40,), 10, 4000, 1000, "x", "label")
    >>> type(experiment.build_model(default.get_config(), info)).__name__
    'CNN'
  """
  if config.model not in models.MODELS:
    raise ValueError(f"model: expected one of {sorted(models.MODELS)}, got {config.model!r}")
  kwargs = config.model_kwargs[config.model].to_dict() if config.model in config.model_kwargs \
      else {}
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  rngs = nnx.Rngs(params=jax.random.key(config.seed))
  return models.create_model(config.model, input_shape=info.input_shape,
                             num_classes=info.num_classes, rngs=rngs, **kwargs)


class Experiment:
  """One run of a recipe: its model, first trainer, phases, and the work between steps.

  The run is a sequence of phases (:class:`train.recipes.Phase`): every method trains in
  ``"train"`` (steps ``[0, num_steps)``); ``channels`` adds ``"finetune"`` on the shrunk model
  and ``mitigation.enabled`` adds ``"mitigate"``. Each phase has its own trainer (``trainer``
  is the current one; a phase's start replaces it) and checkpoint directory. The recipe of
  ``config.pruning.method`` and the add-on parts (``parts``) say what happens between steps
  (:meth:`before_step`: IMP's rounds) and what the run records.

  Args:
    config: the experiment config.
    info: the dataset's metadata.
    mesh: from :func:`train.trainer.make_mesh`.

  Attributes:
    recipe: the method's :class:`train.recipes.Recipe`; ``parts``: it and the add-ons.
    trainer: the current phase's :class:`train.trainer.Trainer`.
    phases: ``[(name, begin step, end step), ...]``; ``schedule``: the phases themselves.
    where: the leaves pruned; ``structure``, ``structure_skipped``: the recipe's structure
      (None if it has none) and the leaves it cannot fit, ``{path: reason}``.
    mitigation: the constraints of the ``mitigate`` phase (None: no phase, or plain
      fine-tuning).
    notes: lines for the report.

  Examples:
    >>> from train import experiment, input_pipeline, trainer
    >>> from train.configs import gmp
    >>> config = gmp.get_config()
    >>> config.model, config.model_kwargs.mlp.hidden = "mlp", (16,)
    >>> info = input_pipeline.Metadata("mnist1d", (40,), 10, 4000, 1000, "x", "label")
    >>> exp = experiment.Experiment(config, info, mesh=trainer.make_mesh())
    >>> exp.phases, type(exp.recipe).__name__
    ([('train', 0, 3000)], 'GMP')
  """

  def __init__(self, config: ml_collections.ConfigDict, info: input_pipeline.Metadata, *,
               mesh: jax.sharding.Mesh):
    self.config = config
    self.info = info
    self.mesh = mesh
    p = config.pruning
    self.method = p.method
    recipe_cls = recipes.get(self.method)
    self.num_steps = int(config.num_steps)
    if self.num_steps < 1:
      raise ValueError(f"num_steps: must be >= 1, got {self.num_steps}")
    s = float(p.sparsity)
    if not 0.0 <= s <= 1.0:
      raise ValueError(f"pruning.sparsity: must be in [0, 1], got {s}")
    self.example = jnp.zeros((2, *info.input_shape), jnp.float32)
    self.notes: list[str] = []
    self.mitigation = None

    model = build_model(config, info)
    params = self.pure_params(model)
    self.structure = parse_structure(p.get("structure", "unstructured")) \
        if recipe_cls.structured else None
    self.structure_skipped: dict[str, str] = {}
    if recipe_cls.prunes:
      self.where, self.structure_skipped = make_where(p.get("where"), params, self.structure)
      self.notes += [f"`{k}` stays dense: {v}" for k, v in self.structure_skipped.items()]
    else:
      self.where = _tree.default_where
    paths, leaves, _ = _tree.flatten(params)
    self.initial_prunable = sum(int(np.size(x)) for path, x in zip(paths, leaves, strict=True)
                                if self.where(path, x))
    self.recipe = recipe_cls(self)
    base, self.lr = self.base_optimizer_for(self.recipe.lr_steps())
    self.trainer = Trainer(model, self.recipe.optimizer(model, base), mesh=mesh, lr=self.lr,
                           sparsity_fn=self._sparsity)
    self.recipe.start()
    self.parts: list[recipes.Recipe] = [self.recipe, *recipes.addons(self)]
    self.schedule = [phase for part in self.parts for phase in part.phases()]
    self.phases: list[tuple[str, int, int]] = []
    begin = 0
    for phase in self.schedule:
      self.phases.append((phase.name, begin, begin + phase.steps))
      begin += phase.steps

  @property
  def total_steps(self) -> int:
    """Steps over all phases."""
    return self.phases[-1][2]

  def _sparsity(self, params):
    return jp.sparsity(params, where=self.where)

  # -- building blocks for the recipes
  @staticmethod
  def pure_params(model: nnx.Module):
    """``model``'s parameters as a pure ``nnx.State`` of arrays."""
    return nnx.as_pure(nnx.state(model, nnx.Param))

  def base_optimizer_for(self, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(base optimizer, learning-rate schedule)`` of a phase of ``steps`` steps."""
    lr = make_lr(self.config, steps)
    return base_optimizer(self.config, lr), lr

  def apply_masks(self, masks) -> None:
    """Zeroes the current model's pruned weights (``jp.apply_masks``)."""
    model = self.trainer.model()
    nnx.update(model, jp.apply_masks(self.pure_params(model), masks))
    self.trainer.set_state(model)

  # -- driven by the loop
  def start_phase(self, name: str, test: input_pipeline.EvalData) -> dict[str, Any]:
    """Starts phase ``name`` (makes its trainer); returns its records (``{prefix: metrics}``)."""
    phase = next(ph for ph in self.schedule if ph.name == name)
    return dict(phase.start(test)) if phase.start is not None else {}

  def start_finetune(self, test: input_pipeline.EvalData) -> dict[str, Any]:
    """``start_phase("finetune", test)`` (kept for compatibility)."""
    return self.start_phase("finetune", test)

  def start_mitigation(self, test: input_pipeline.EvalData) -> dict[str, Any]:
    """``start_phase("mitigate", test)`` (kept for compatibility)."""
    return self.start_phase("mitigate", test)

  def before_step(self, step: int) -> None:
    """Work due before the optimizer step ``step`` (IMP: save rewind point, start a round)."""
    for part in self.parts:
      part.before_step(step)

  def extra_state(self) -> dict[str, Any]:
    """What checkpoints hold besides model, optimizer and step (IMP: the rewind weights)."""
    return {k: v for part in self.parts for k, v in part.extra_state().items()}

  def load_extra_state(self, extra: Mapping[str, Any]) -> None:
    for part in self.parts:
      part.load_extra_state(extra)

  # -- what the run records
  def final_metrics(self) -> dict[str, Any]:
    """The parts' numbers for the final metrics (channels: the shrink numbers)."""
    return {k: v for part in self.parts for k, v in part.final_metrics().items()}

  @property
  def shrink_info(self) -> dict[str, Any]:
    """:meth:`final_metrics` (its name when only the channels recipe had any)."""
    return self.final_metrics()

  def report_tables(self, final: Mapping[str, Any], outputs) -> list[dict[str, Any]]:
    return [t for part in self.parts for t in part.report_tables(final, outputs)]

  def extra_outputs(self) -> dict[str, Mapping[str, Any]]:
    return {k: v for part in self.parts for k, v in part.extra_outputs().items()}

  def current_masks(self):
    """The keep-masks in the optimizer state, or None when it holds no pruning state (dense
    recipe, or the channels recipe's shrunk model)."""
    try:
      return self.trainer.masks()
    except ValueError:
      return None

  def outputs(self, test: input_pipeline.EvalData) -> dict[str, Any]:
    """What :mod:`train.analyze` reads of the current model: test logits and labels, params,
    the rest of the model state (BatchNorm statistics), masks (or None) and multipliers."""
    logits, labels = self.trainer.predict(test)
    _, params, rest = nnx.split(self.trainer.model(), nnx.Param, ...)
    multipliers = self.trainer.state.get("multipliers")
    return {"logits": logits, "labels": labels, "params": nnx.as_pure(params),
            "rest": nnx.as_pure(rest), "masks": self.current_masks(),
            "multipliers": None if multipliers is None else np.asarray(multipliers)}
