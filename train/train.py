"""The training loop of jaxprune's experiments: :func:`train_and_evaluate`.

One loop runs every recipe of ``train/configs`` (dense, one-shot, GMP, IMP, SET, RigL, 2:4,
channels); ``config.pruning.method`` picks the jaxprune pieces:

=============  ===========================================================================
``dense``      ``optax.adam`` only
``oneshot``    ``chain(adam, magnitude_pruning(one_shot_schedule(s, at_step), ...))``
``gmp``        ``chain(adam, magnitude_pruning(polynomial_schedule(s, ...), ...))``
``imp``        ``chain(adam, magnitude_pruning(0.0))``, and between rounds ``ticket_masks``,
               ``rewind`` and ``replace_masks`` (lottery tickets, all rounds in one run)
``set``        ``set_training(adam, sparsity=s, ...)``
``rigl``       ``rigl(adam, sparsity=s, ...)``
``channels``   ``chain(adam, channel_group_pruning(...))`` (whole coupled channels, from
               ``surgery.channel_groups``), then ``surgery.shrink_module``, then fine-tuning
               the smaller model
=============  ===========================================================================

Pruning applies to the leaves ``where`` selects (:func:`make_where`): jaxprune's default
(floating leaves with ``ndim >= 2``) intersected with the optional regex ``pruning.where``; a
structure that cannot fit a leaf (2:4 on a kernel whose input axis is not a multiple of 4)
leaves it dense, and the report says so.

Parallelism. All local devices form one mesh axis ``"data"``
(:func:`make_mesh`): every batch is sharded along it (``P("data")``), parameters and optimizer
state are replicated (``P()``), and one ``jax.jit`` program does the step; XLA inserts the
gradient all-reduce. The same code runs on 1 CPU, 8 host devices or a TPU slice (with several
processes, each feeds its own rows; see :mod:`train.input_pipeline`).

Determinism and resuming. Everything random comes from ``config.seed``; the batch at step
``t`` is a pure function of ``(seed, t)``. Checkpoints (:mod:`train.checkpointing`, every
``checkpoint_every`` steps and at the end) hold the model state (params, BatchNorm statistics),
the optimizer state (masks included), the step (which is also the data position) and, for IMP,
the weights to rewind to. A run killed at any moment and started again with the same command
continues from its latest checkpoint and ends with bit-identical parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxprune as jp
from jaxprune import _tree, surgery
from train import checkpointing, input_pipeline, models, reporting, runs
from train import mitigation as mitigation_lib

__all__ = [
    "METHODS", "PREDICTIONS", "PREDICTIONS_BEFORE_MITIGATION", "Experiment", "Trainer",
    "build_model", "channel_group_pruning", "make_lr", "make_mesh", "make_where",
    "parse_structure", "save_predictions", "train_and_evaluate", "train_subset",
]

METHODS = ("dense", "oneshot", "gmp", "imp", "set", "rigl", "channels")
"""The values of ``config.pruning.method``."""

Batch = Mapping[str, np.ndarray]


# ----------------------------------------------------------------------------- pieces


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all devices).

  Examples:
    >>> from train import train
    >>> mesh = train.make_mesh()
    >>> mesh.axis_names
    ('data',)
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def parse_structure(spec: str):
  """A jaxprune structure from its config string.

  ``"unstructured"``, ``"channels"`` (whole output channels of each leaf), ``"per_output"``,
  ``"N:M"`` (``jp.n_of_m(N, M)``) or ``"HxW"`` (``jp.blocks((H, W))``).

  Raises:
    ValueError: naming ``pruning.structure``, for anything else.

  Examples:
    >>> from train import train
    >>> train.parse_structure("2:4")
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
    >>> from train import train
    >>> params = {"a": np.ones((1, 8)), "b": np.ones((8, 8)), "bias": np.ones(8)}
    >>> where, skipped = train.make_where(None, params, train.parse_structure("2:4"))
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
    >>> from train import train
    >>> from train.configs import default
    >>> lr = train.make_lr(default.get_config(), 100)
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


def _base_optimizer(config, lr: optax.Schedule) -> optax.GradientTransformation:
  if config.weight_decay > 0:
    return optax.adamw(lr, weight_decay=config.weight_decay)
  return optax.adam(lr)


def build_model(config: ml_collections.ConfigDict, info: input_pipeline.Metadata) -> nnx.Module:
  """``models.create_model(config.model, ...)`` with ``config.model_kwargs[config.model]``.

  Initialized from ``config.seed``; in train mode.

  Examples:
    >>> from train import train, input_pipeline
    >>> from train.configs import default
    >>> info = input_pipeline.Metadata("mnist1d", (40,), 10, 4000, 1000, "x", "label")
    >>> type(train.build_model(default.get_config(), info)).__name__
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


def _pure_params(model: nnx.Module):
  return nnx.as_pure(nnx.state(model, nnx.Param))


# ----------------------------------------------------------------------------- channel groups


def channel_group_pruning(groups, sparsity, *, update_every: int, scope: str = "layerwise",
                          where=None) -> optax.GradientTransformationExtraArgs:
  """Gradual pruning of whole coupled channels; a chain link that goes last (like
  ``jp.magnitude_pruning``).

  Every ``update_every`` steps the masks are recomputed with
  ``surgery.group_masks(groups, params, s_t)``: in every prunable channel group (a conv's output
  channels together with the next conv's input rows, an MLP's hidden units with the next
  layer's rows, attention heads across q/k/v/out) the channels of smallest L2 norm are removed
  from all member kernels at once, and pruned weights land on exactly 0 (``where(mask, u,
  -p)``). Earlier-pruned channels therefore score 0 and stay pruned; masks only shrink. Masks
  made this way are what :func:`jaxprune.surgery.shrink` needs to remove channels physically
  (per-leaf ``jp.channels()`` masks prune a conv's outputs but not the next conv's inputs, which
  ``shrink`` refuses).

  Args:
    groups: from ``surgery.channel_groups`` on the full model state; only their members that
      masks apply to (kernels) are used, so the transform works on the ``nnx.Param`` tree.
    sparsity: the fraction of channels removed from every group: a number or a schedule.
    update_every: steps between mask updates.
    scope: ``"layerwise"`` (each group loses ``round(s · size)`` channels) or ``"global"``.
    where: the leaves masks apply to (as used to trace ``groups``; default: jaxprune's).

  Returns:
    An optax transformation whose state is a ``jp.PruningState`` (so
    ``jp.masks_from_state`` finds its masks).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jaxprune import surgery
    >>> from train import train
    >>> params = {"w1": jnp.arange(1., 13.).reshape(3, 4), "w2": jnp.ones((4, 2))}
    >>> fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
    >>> groups = surgery.channel_groups(fn, params, jnp.ones((1, 3)))
    >>> tx = optax.chain(optax.sgd(0.0), train.channel_group_pruning(groups, 0.5,
    ...                                                             update_every=1))
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w2"][:, 0]
    Array([0., 0., 1., 1.], dtype=float32)
  """
  sched = sparsity if callable(sparsity) else (lambda count: jnp.float32(sparsity))
  where = where or _tree.default_where
  kernels = tuple(
      dataclasses.replace(g, members=tuple(m for m in g.members if m.masked))
      for g in groups if g.prunable)
  if not kernels:
    raise ValueError("pruning.method: 'channels' needs a prunable channel group, and this "
                     "model has none (see jaxprune.surgery.channel_groups for the reasons).")

  def chosen(tree):
    paths, leaves, _ = _tree.flatten(tree)
    return [bool(where(p, x)) for p, x in zip(paths, leaves, strict=True)]

  def init_fn(params):
    treedef = jax.tree.structure(params)
    masks = [jnp.ones(jnp.shape(x), bool) if c else jnp.ones((), bool)
             for x, c in zip(jax.tree.leaves(params), chosen(params), strict=True)]
    return jp.PruningState(jnp.zeros([], jnp.int32), jax.tree.unflatten(treedef, masks),
                                   optax.EmptyState(), optax.EmptyState())

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)

    def recompute(masks):
      new = surgery.group_masks(kernels, params, sched(state.count), scope=scope)
      return jax.tree.map(lambda n, m: jnp.broadcast_to(n, jnp.shape(m)) & m, new, masks)

    is_update = state.count % jnp.asarray(update_every, jnp.int32) == 0
    masks = jax.lax.cond(is_update, recompute, lambda m: m, state.masks)
    treedef = jax.tree.structure(updates)
    out = [jnp.where(m, u, -p) if c else u for u, m, p, c in zip(
        jax.tree.leaves(updates), treedef.flatten_up_to(masks), treedef.flatten_up_to(params),
        chosen(params), strict=True)]
    return (jax.tree.unflatten(treedef, out),
            state._replace(count=optax.safe_increment(state.count), masks=masks))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- trainer


def _replicate(tree, mesh):
  return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P()))


@functools.partial(jax.jit, static_argnames=("model_def", "mesh", "constraint"))
def _gradients(model_state, batch, multipliers, *, model_def, mesh, constraint):
  """Forward (train mode) and backward on the sharded batch: new model state (BatchNorm
  statistics), gradients (all-reduced, replicated), new multipliers and metrics.

  ``constraint``: None (mean cross-entropy; ``multipliers`` is None and comes back None) or
  ``(mitigation, num_groups)``: the gradient is that of the Lagrangian of the per-group loss
  constraints (:meth:`train.mitigation.Mitigation.lagrangian`, measured on this batch) and the
  multipliers take one projected dual ascent step
  (:func:`jaxprune.analysis.dual_ascent_update`) with the same violations.

  A module-level jit keyed by the model's graphdef: every recipe (and every phase) that trains
  the same architecture reuses one compiled program.
  """
  model = nnx.merge(model_def, model_state)

  def loss_fn(model):
    logits = model(batch["x"])
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    loss = per_example.mean()
    if constraint is None:
      return loss, (logits, loss, None)
    mitigation, num_groups = constraint
    value, violations = mitigation.lagrangian(per_example, batch["label"], multipliers,
                                              num_groups)
    return value, (logits, loss, violations)

  (_, (logits, loss, violations)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
  metrics = {"loss": loss, "accuracy": accuracy}
  if constraint is not None:
    metrics.update(max_violation=jnp.max(violations), max_multiplier=jnp.max(multipliers),
                   violations=violations)
    multipliers = jp.analysis.dual_ascent_update(multipliers, violations, constraint[0].dual_lr)
  return _replicate((nnx.state(model), grads, multipliers, metrics), mesh)


@functools.partial(jax.jit, static_argnames=("model_def", "opt_def", "mesh", "sparsity_fn", "lr"))
def _apply(model_state, opt_state, grads, *, model_def, opt_def, mesh, sparsity_fn, lr):
  """``optimizer.update(model, grads)`` (the pruning transforms run here), plus metrics."""
  model = nnx.merge(model_def, model_state)
  optimizer = nnx.merge(opt_def, opt_state)
  rate = jnp.asarray(lr(optimizer.step[...]), jnp.float32)
  optimizer.update(model, grads)
  sparsity = sparsity_fn(nnx.as_pure(nnx.state(model, nnx.Param)))
  metrics = {"sparsity": sparsity, "learning_rate": rate}
  return _replicate((nnx.state(model), nnx.state(optimizer), metrics), mesh)


@functools.partial(jax.jit, static_argnames=("model_def", "mesh"))
def _eval_logits(model_state, batch, *, model_def, mesh):
  """Logits of one (padded) eval batch, eval mode, replicated."""
  model = models.eval_view(nnx.merge(model_def, model_state))
  return _replicate(model(batch["x"]).astype(jnp.float32), mesh)


@functools.partial(jax.jit, static_argnames=("model_def", "mesh"))
def _eval_sums(model_state, batch, *, model_def, mesh):
  """Correct predictions, summed loss and example count of one (padded) eval batch."""
  model = models.eval_view(nnx.merge(model_def, model_state))
  logits = model(batch["x"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  mask = batch["mask"]
  correct = (jnp.argmax(logits, -1) == batch["label"]) & mask
  return _replicate({"correct": jnp.sum(correct, dtype=jnp.int32),
                     "loss": jnp.sum(jnp.where(mask, loss, 0.0)),
                     "count": jnp.sum(mask, dtype=jnp.int32)}, mesh)


def _default_sparsity(params):
  return jp.sparsity(params)


def _zero_lr(count):
  del count
  return jnp.zeros([], jnp.float32)


class Trainer:
  """A model and its optimizer as replicated state on a mesh, with jitted train/eval steps.

  ``state = {"model": nnx.state(model), "opt": nnx.state(optimizer)}`` lives on the mesh
  (replicated). :meth:`train_step` shards the batch along ``"data"`` and runs two compiled
  programs: forward and backward (train mode; BatchNorm statistics updated; the gradient
  all-reduce is inserted by XLA), then ``optimizer.update``. The first is keyed by the model's
  graphdef only, so recipes that train the same architecture compile it once.

  Args:
    model: an NNX model in train mode.
    tx: the optax transformation.
    mesh: from :func:`make_mesh`.
    sparsity_fn: ``params -> float32 scalar`` logged as ``sparsity`` (jit-able).
    lr: the learning-rate schedule (logged).
    mitigation: train under per-group loss constraints (:class:`train.mitigation.Mitigation`):
      the state then holds the Lagrange multipliers (``state["multipliers"]``, float32
      ``(num_groups,)``, starting at 0), every step descends the Lagrangian and takes one
      dual ascent step, ``max_violation`` / ``max_multiplier`` are logged and the step's
      metrics hold the per-group ``violations``.
    num_classes: the number of classes (needed with ``mitigation``).

  Examples:
    >>> import numpy as np, optax
    >>> from flax import nnx
    >>> from train import models, train
    >>> model = models.create_model("mlp", input_shape=(40,), num_classes=10,
    ...                             rngs=nnx.Rngs(0), hidden=(16,))
    >>> t = train.Trainer(model, optax.adam(1e-2), mesh=train.make_mesh())
    >>> batch = {"x": np.ones((8, 40), np.float32), "label": np.zeros(8, np.int32)}
    >>> sorted(t.train_step(batch))
    ['accuracy', 'learning_rate', 'loss', 'sparsity']
  """

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, *,
               mesh: jax.sharding.Mesh, sparsity_fn: Callable | None = None,
               lr: optax.Schedule | None = None,
               mitigation: mitigation_lib.Mitigation | None = None,
               num_classes: int | None = None):
    self.mesh = mesh
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharding = NamedSharding(mesh, P("data"))
    self.tx = tx
    self.sparsity = sparsity_fn or _default_sparsity
    self._lr = lr or _zero_lr
    self.model_def, model_state = nnx.split(model)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    self.opt_def, opt_state = nnx.split(optimizer)
    state = {"model": model_state, "opt": opt_state}
    self.constraint = None
    if mitigation is not None:
      if num_classes is None:
        raise ValueError("num_classes: needed with mitigation")
      mitigation.validate(num_classes)
      self.constraint = (mitigation, mitigation.num_groups(num_classes))
      state["multipliers"] = jnp.zeros((self.constraint[1],), jnp.float32)
    self.state = jax.device_put(state, self.replicated)

  # -- state access
  def model(self) -> nnx.Module:
    """The model, merged from the current state (a new object; train mode)."""
    return nnx.merge(self.model_def, self.state["model"])

  def optimizer(self) -> nnx.Optimizer:
    """The optimizer, merged from the current state (a new object)."""
    return nnx.merge(self.opt_def, self.state["opt"])

  def params(self):
    """The current parameters as a pure ``nnx.State`` of arrays."""
    return nnx.as_pure(nnx.state(self.model(), nnx.Param))

  def set_state(self, model: nnx.Module, optimizer: nnx.Optimizer | None = None) -> None:
    """Replaces the state with ``model``'s and ``optimizer``'s (replicated on the mesh)."""
    state = {**self.state, "model": nnx.state(model),
             "opt": nnx.state(optimizer) if optimizer is not None else self.state["opt"]}
    self.state = jax.device_put(state, self.replicated)

  def masks(self):
    """The keep-masks held in the optimizer state (``jp.masks_from_state``)."""
    return jp.masks_from_state(self.optimizer().opt_state)

  # -- steps
  def shard(self, batch: Batch) -> dict[str, jax.Array]:
    """Host batch (this process's rows) -> global arrays sharded along ``"data"``."""
    n = self.mesh.devices.size // jax.process_count()
    out = {}
    for k, v in batch.items():
      if v.shape[0] % n:
        raise ValueError(f"batch_size: {v.shape[0]} rows per process do not divide over {n} "
                         "local devices")
      out[k] = jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
    return out

  def train_step(self, batch: Batch) -> dict[str, jax.Array]:
    """One optimizer step on ``batch`` (numpy, this process's rows); returns device metrics."""
    model_state, grads, multipliers, metrics = _gradients(
        self.state["model"], self.shard(batch), self.state.get("multipliers"),
        model_def=self.model_def, mesh=self.mesh, constraint=self.constraint)
    model_state, opt_state, more = _apply(
        model_state, self.state["opt"], grads, model_def=self.model_def, opt_def=self.opt_def,
        mesh=self.mesh, sparsity_fn=self.sparsity, lr=self._lr)
    self.state = {"model": model_state, "opt": opt_state}
    if multipliers is not None:
      self.state["multipliers"] = multipliers
    return {**metrics, **more}

  def predict(self, test: input_pipeline.EvalData) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, labels)`` of every test example, in the split's order (eval mode).

    Raises:
      ValueError: with several processes (each holds a slice of the split; not gathered).

    Examples:
      >>> import tempfile, optax
      >>> from flax import nnx
      >>> from train import input_pipeline, models, train
      >>> ds = input_pipeline.get_datasets("mnist1d", batch_size=8, seed=0, eval_batch_size=300,
      ...                                  data_dir=tempfile.mkdtemp())  # doctest: +ELLIPSIS
      Downloading and preparing dataset ...
      >>> model = models.create_model("mlp", input_shape=(40,), num_classes=10,
      ...                             rngs=nnx.Rngs(0), hidden=(16,))
      >>> t = train.Trainer(model, optax.adam(1e-2), mesh=train.make_mesh())
      >>> logits, labels = t.predict(ds.test)  # 4 padded batches of 300, 1000 real rows
      >>> logits.shape, labels.shape
      ((1000, 10), (1000,))
    """
    if jax.process_count() > 1:
      raise ValueError("predict: the test logits are only gathered in a single-process run")
    logits, labels = [], []
    for b in test:
      out = np.asarray(_eval_logits(self.state["model"], self.shard(b),
                                    model_def=self.model_def, mesh=self.mesh))
      logits.append(out[b["mask"]])
      labels.append(b["label"][b["mask"]])
    return np.concatenate(logits), np.concatenate(labels)

  def evaluate(self, test: input_pipeline.EvalData) -> dict[str, float]:
    """``{"test_accuracy", "test_loss"}`` over the whole test split (eval mode)."""
    sums = [_eval_sums(self.state["model"], self.shard(b), model_def=self.model_def,
                       mesh=self.mesh) for b in test]
    sums = jax.device_get(sums)
    count = sum(int(s["count"]) for s in sums)
    return {"test_accuracy": sum(int(s["correct"]) for s in sums) / count,
            "test_loss": sum(float(s["loss"]) for s in sums) / count}


# ----------------------------------------------------------------------------- recipes


class Experiment:
  """One recipe: its model, optimizer and the work between steps; driven by the loop.

  The run is a sequence of phases; every recipe has phase ``"train"`` (steps ``[0,
  num_steps)``), ``channels`` adds ``"finetune"`` (``[num_steps, num_steps +
  finetune_steps)``) on the shrunk model. Each phase has its own :class:`Trainer` and checkpoint
  directory. :meth:`before_step` does what happens between steps (IMP's rewinding rounds).

  Args:
    config: the experiment config.
    info: the dataset's metadata.
    mesh: from :func:`make_mesh`.

  Examples:
    >>> import numpy as np
    >>> from train import train, input_pipeline
    >>> from train.configs import gmp
    >>> config = gmp.get_config()
    >>> config.model, config.model_kwargs.mlp.hidden = "mlp", (16,)
    >>> info = input_pipeline.Metadata("mnist1d", (40,), 10, 4000, 1000, "x", "label")
    >>> exp = train.Experiment(config, info, mesh=train.make_mesh())
    >>> exp.phases
    [('train', 0, 3000)]
  """

  def __init__(self, config: ml_collections.ConfigDict, info: input_pipeline.Metadata, *,
               mesh: jax.sharding.Mesh):
    self.config = config
    self.info = info
    self.mesh = mesh
    p = config.pruning
    self.method = p.method
    if self.method not in METHODS:
      raise ValueError(f"pruning.method: expected one of {METHODS}, got {self.method!r}")
    self.num_steps = int(config.num_steps)
    if self.num_steps < 1:
      raise ValueError(f"num_steps: must be >= 1, got {self.num_steps}")
    self.example = jnp.zeros((2, *info.input_shape), jnp.float32)
    self.notes: list[str] = []
    self.phases: list[tuple[str, int, int]] = [("train", 0, self.num_steps)]
    self.rewind_params = None  # IMP: the weights rounds rewind to
    self.shrink_info: dict[str, Any] = {}

    model = build_model(config, info)
    params = _pure_params(model)
    self.structure = parse_structure(p.get("structure", "unstructured")) \
        if self.method in ("oneshot", "gmp") else None
    self.structure_skipped: dict[str, str] = {}
    if self.method == "dense":
      self.where = _tree.default_where
    else:
      self.where, self.structure_skipped = make_where(p.get("where"), params, self.structure)
      self.notes += [f"`{k}` stays dense: {v}" for k, v in self.structure_skipped.items()]
    self.initial_prunable = sum(int(np.size(x)) for path, x in
                                zip(*_tree.flatten(params)[:2], strict=True)
                                if self.where(path, x))
    tx = self._make_tx(model)
    self.trainer = Trainer(model, tx, mesh=mesh, lr=self.lr, sparsity_fn=self._sparsity)
    if self.method in ("set", "rigl"):  # start from the sparse point, not the dense init
      self._apply_masks(self.trainer.masks())
    if self.method == "imp":
      self.rewind_params = jax.tree.map(jnp.copy, self.trainer.params())
    if self.method == "channels":
      finetune = int(p.finetune_steps)
      if finetune < 0:
        raise ValueError(f"pruning.finetune_steps: must be >= 0, got {finetune}")
      self.phases.append(("finetune", self.num_steps, self.num_steps + finetune))
    self.mitigation, self.mitigation_steps = self._mitigation_config()
    self.before_mitigation: dict[str, Any] = {}
    if self.mitigation_steps:
      end = self.phases[-1][2]
      self.phases.append(("mitigate", end, end + self.mitigation_steps))

  def _mitigation_config(self) -> tuple[mitigation_lib.Mitigation | None, int]:
    """``(constraints or None, steps)`` of the ``mitigate`` phase; steps 0: no such phase."""
    m = self.config.get("mitigation")
    if m is None or not m.get("enabled", False):
      return None, 0
    steps = int(m.get("steps", 0))
    if steps < 1:
      raise ValueError(f"mitigation.steps: must be >= 1 when mitigation.enabled, got {steps}")
    if not float(m.get("learning_rate", 0.0)) > 0:
      raise ValueError(f"mitigation.learning_rate: must be > 0, got {m.get('learning_rate')}")
    constraint = None
    if m.get("constrained", True):
      constraint = mitigation_lib.mitigation_from_config(self.config).validate(
          self.info.num_classes)
    return constraint, steps

  @property
  def mitigation_method(self) -> str:
    """The name :mod:`train.analyze` gives the run after the ``mitigate`` phase."""
    return self.method + ("+mitigation" if self.mitigation is not None else "+finetune")

  @property
  def total_steps(self) -> int:
    """Steps over all phases."""
    return self.phases[-1][2]

  def _sparsity(self, params):
    return jp.sparsity(params, where=self.where)

  # -- optimizers
  def _make_tx(self, model) -> optax.GradientTransformation:
    config, p, n = self.config, self.config.pruning, self.num_steps
    s = float(p.sparsity)
    if not 0.0 <= s <= 1.0:
      raise ValueError(f"pruning.sparsity: must be in [0, 1], got {s}")
    if self.method == "imp":
      rounds = int(p.rounds)
      if rounds < 1:
        raise ValueError(f"pruning.rounds: must be >= 1, got {rounds}")
      self._segment = n // (rounds + 1)
      if self._segment < 1:
        raise ValueError(f"num_steps: {n} is too few for {rounds + 1} IMP trainings")
      if not 0 <= int(p.rewind_step) < self._segment:
        raise ValueError(f"pruning.rewind_step: must be in [0, {self._segment}) (one round), "
                         f"got {p.rewind_step}")
      self.lr = make_lr(config, self._segment)  # restarts with every round's fresh optimizer
    else:
      self.lr = make_lr(config, n)
    base = _base_optimizer(config, self.lr)
    w = self.where
    if self.method == "dense":
      return base
    if self.method == "oneshot":
      at = int(p.at_step)
      if not 0 <= at < n:
        raise ValueError(f"pruning.at_step: must be in [0, num_steps={n}), got {at}")
      return optax.chain(base, jp.magnitude_pruning(
          jp.one_shot_schedule(s, at), update_every=at if at > 0 else n,
          structure=self.structure, scope=p.scope, distribution=p.distribution, where=w))
    if self.method == "gmp":
      sched = jp.polynomial_schedule(s, begin_step=int(p.begin_step),
                                            end_step=int(p.end_step), power=p.power)
      return optax.chain(base, jp.magnitude_pruning(
          sched, update_every=int(p.update_every), structure=self.structure, scope=p.scope,
          distribution=p.distribution, where=w))
    if self.method == "imp":
      return optax.chain(base, jp.magnitude_pruning(0.0, update_every=self._segment,
                                                            where=w))
    if self.method in ("set", "rigl"):
      factory = jp.rigl if self.method == "rigl" else jp.set_training
      return factory(base, sparsity=s, update_every=int(p.update_every),
                     end_step=int(p.end_step), drop_fraction=float(p.drop_fraction),
                     distribution=p.distribution, where=w, key=int(config.seed))
    # channels
    fn, state = surgery.module_fn(models.eval_view(model))
    groups = surgery.channel_groups(fn, state, self.example, where=w)
    self.groups = groups
    self.notes.append("channel groups pruned: " + ", ".join(
        f"`{g.name}` ({g.size})" for g in groups if g.prunable))
    sched = jp.polynomial_schedule(s, begin_step=int(p.begin_step),
                                          end_step=int(p.end_step), power=p.power)
    return optax.chain(base, channel_group_pruning(groups, sched,
                                                   update_every=int(p.update_every),
                                                   scope=p.scope, where=w))

  def _apply_masks(self, masks) -> None:
    model = self.trainer.model()
    nnx.update(model, jp.apply_masks(_pure_params(model), masks))
    self.trainer.set_state(model)

  # -- between steps
  def before_step(self, step: int) -> None:
    """Work due before the optimizer step ``step`` (IMP: save rewind point, start a round)."""
    if self.method != "imp":
      return
    p = self.config.pruning
    if step == int(p.rewind_step) and step > 0:
      self.rewind_params = jax.tree.map(jnp.copy, self.trainer.params())
    rounds = int(p.rounds)
    r, pos = divmod(step, self._segment)
    if pos == 0 and 1 <= r <= rounds:
      self._imp_round(r, rounds)

  def _imp_round(self, r: int, rounds: int) -> None:
    p = self.config.pruning
    s_r = 1.0 - (1.0 - float(p.sparsity)) ** (r / rounds)
    masks = jp.ticket_masks(self.trainer.params(), s_r, masks=self.trainer.masks(),
                                   scope=p.scope, where=self.where)
    model = self.trainer.model()
    nnx.update(model, jp.rewind(masks, self.rewind_params))
    optimizer = nnx.Optimizer(model, self.trainer.tx, wrt=nnx.Param)  # a fresh optimizer
    pure = jp.replace_masks(nnx.as_pure(optimizer.opt_state), masks)
    nnx.update(optimizer.opt_state, nnx.state(pure))
    self.trainer.set_state(model, optimizer)

  def extra_state(self) -> dict[str, Any]:
    """What checkpoints hold besides model, optimizer and step (IMP: the rewind weights)."""
    return {"rewind": self.rewind_params} if self.method == "imp" else {}

  def load_extra_state(self, extra: Mapping[str, Any]) -> None:
    if self.method == "imp":
      self.rewind_params = extra["rewind"]

  # -- channels: shrink and fine-tune
  def start_finetune(self, test: input_pipeline.EvalData) -> None:
    """Shrinks the channel-pruned model and makes the fine-tuning trainer (phase 2)."""
    masks = self.trainer.masks()
    big = self.trainer.model()
    before = self.trainer.evaluate(test)
    small = surgery.shrink_module(models.eval_view(big), masks, self.example)
    small = models.train_view(small)
    big_params = _pure_params(big)
    small_params = _pure_params(small)
    count = lambda t: sum(int(np.size(x)) for x in jax.tree.leaves(t))
    prunable_now = sum(int(np.size(x)) for path, x in zip(*_tree.flatten(small_params)[:2],
                                                          strict=True) if self.where(path, x))
    removed = 1.0 - prunable_now / self.initial_prunable
    steps = self.phases[-1][2] - self.phases[-1][1]
    lr = make_lr(self.config, steps)
    self.trainer = Trainer(small, _base_optimizer(self.config, lr), mesh=self.mesh, lr=lr,
                           sparsity_fn=lambda params: jnp.full((), removed, jnp.float32))
    after = self.trainer.evaluate(test)
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


  # -- mitigation: fine-tune the pruned model under per-group loss constraints
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

  def start_mitigation(self, test: input_pipeline.EvalData) -> None:
    """Keeps the pruned model's outputs and makes the trainer of the ``mitigate`` phase.

    The phase fine-tunes with the masks fixed (:func:`train.mitigation.finetune_optimizer`:
    Adam with a cosine decay from ``mitigation.learning_rate``, then a pruning link holding
    the current masks) under the per-group constraints of ``config.mitigation``, or with plain
    cross-entropy when ``mitigation.constrained`` is False (the control arm).
    """
    if jax.process_count() == 1:  # test logits are gathered in single-process runs only
      self.before_mitigation = self.outputs(test)
    masks = self.current_masks()
    m, steps = self.config.mitigation, self.mitigation_steps
    lr = optax.cosine_decay_schedule(float(m.learning_rate), steps)
    if masks is None:
      tx = optax.adam(lr)
    else:
      tx = mitigation_lib.finetune_optimizer(float(m.learning_rate), steps, 0.0, None, self.where)
    model = self.trainer.model()
    sparsity_fn = self.trainer.sparsity
    self.trainer = Trainer(model, tx, mesh=self.mesh, lr=lr, sparsity_fn=sparsity_fn,
                           mitigation=self.mitigation, num_classes=self.info.num_classes)
    if masks is not None:
      mitigation_lib.hold_masks(self.trainer, masks)


# ----------------------------------------------------------------------------- the loop


def _final_counts(params) -> tuple[int, int]:
  leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
  return sum(x.size for x in leaves), sum(int(np.count_nonzero(x)) for x in leaves)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (and prunes) as ``config`` says, resuming from ``workdir`` if it has checkpoints.

  Writes into ``workdir``: ``checkpoints/`` (and ``checkpoints_finetune/`` for ``channels``),
  ``metrics.jsonl``, ``tensorboard/``, ``report.md``, ``curves.png``, ``sparsity.png``,
  ``params.npz`` (the final model state, by path) and ``config.json``.

  Args:
    config: an experiment config (``train/configs/*.py``).
    workdir: output directory; created if missing.

  Returns:
    The final metrics: ``step``, ``test_accuracy``, ``test_loss``, ``sparsity``, ``params``,
    ``nonzero_params``, ``wall_time_s`` (and, for ``channels``, the shrink numbers).

  Examples:
    >>> import tempfile
    >>> from train import train
    >>> from train.configs import gmp
    >>> config = gmp.get_config()
    >>> config.num_steps, config.progress, config.pruning.update_every = 20, False, 1
    >>> config.model, config.model_kwargs.mlp.hidden = "mlp", (16,)
    >>> config.data_dir = tempfile.mkdtemp()
    >>> final = train.train_and_evaluate(config, tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Downloading and preparing dataset ...
    >>> final["step"], round(final["sparsity"], 3)
    (20, 0.9)
  """
  t_start = time.time()
  is_main = jax.process_index() == 0  # the one process that writes files other than checkpoints
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    runs.write_config(workdir, config)
  subset = train_subset(config)
  data = input_pipeline.get_datasets(
      config.dataset, batch_size=config.batch_size, seed=config.seed,
      eval_batch_size=config.eval_batch_size, data_dir=config.data_dir,
      train_indices=subset)
  mesh = make_mesh()
  exp = Experiment(config, data.info, mesh=mesh)
  if subset is not None:
    imb = config.imbalance
    exp.notes.append(f"training split unbalanced on purpose: classes {list(imb.classes)} keep "
                     f"{imb.keep_fraction} of their examples ({data.info.num_train} examples "
                     "left); the test split is whole")
  ckpt_dirs = [os.path.join(os.path.abspath(workdir), "checkpoints" + ("" if i == 0 else
                                                                        f"_{name}"))
               for i, (name, _, _) in enumerate(exp.phases)]

  # Where to resume: the latest step over all phases' checkpoints.
  latest = []
  for d in ckpt_dirs:
    with checkpointing.Checkpoints(d) as c:
      latest.append(c.latest_step())
  resume_step = max([s for s in latest if s is not None], default=0)
  elapsed_before = 0.0
  final_eval: dict[str, float] = {}

  from tqdm import tqdm
  bar = tqdm(total=exp.total_steps, initial=resume_step, disable=not config.progress,
             desc=f"{exp.method} {config.model}", dynamic_ncols=True, mininterval=1.0)
  with reporting.MetricsWriter(workdir, resume_step=resume_step, enabled=is_main) as writer:
    for phase, ((name, begin, end), ckpt_dir) in enumerate(zip(exp.phases, ckpt_dirs,
                                                               strict=True)):
      if name == "mitigate":
        exp.start_mitigation(data.test)
      if name == "finetune":
        exp.start_finetune(data.test)
        if latest[phase] is None:
          writer.write(begin, {"test_accuracy": exp.shrink_info["accuracy_shrunk"],
                               "test_loss": exp.shrink_info["loss_shrunk"],
                               "params": exp.shrink_info["params_after"], "phase": name},
                       prefix="shrink/")
      with checkpointing.Checkpoints(ckpt_dir, every=config.checkpoint_every,
                                     keep=config.keep_checkpoints) as ckpts:
        start = begin
        if latest[phase] is not None:
          abstract = {**exp.trainer.state, "step": 0, "elapsed": 0.0,
                      "extra": exp.extra_state()}
          restored = ckpts.restore(abstract)
          exp.trainer.state = {k: restored[k] for k in exp.trainer.state}
          exp.load_extra_state(restored["extra"])
          start = int(restored["step"])
          elapsed_before = float(restored["elapsed"])
        pending = []
        for t in range(start, end):
          exp.before_step(t)
          pending.append(exp.trainer.train_step(data.train.batch(t)))
          done = t + 1
          if done % config.log_every == 0 or done == end:
            logs = jax.device_get(pending)
            pending = []
            mean = {k: float(np.mean([m[k] for m in logs])) for k in logs[0]
                    if np.ndim(logs[0][k]) == 0}  # scalars (not per-group violations)
            writer.write(done, mean, prefix="train/")
            bar.set_postfix(loss=f"{mean['loss']:.3f}", acc=f"{mean['accuracy']:.3f}",
                            sparsity=f"{mean['sparsity']:.3f}", refresh=False)
          if done % config.eval_every == 0 or done == end:
            final_eval = exp.trainer.evaluate(data.test)
            writer.write(done, {**final_eval, "sparsity": float(jax.device_get(
                exp.trainer.sparsity(exp.trainer.params())))}, prefix="eval/")
          bar.update(1)
          if done % config.checkpoint_every == 0 or done == end:
            elapsed = elapsed_before + time.time() - t_start
            ckpts.save(done, {**exp.trainer.state, "step": done, "elapsed": elapsed,
                              "extra": exp.extra_state()}, force=done == end)
        if start == end:  # nothing left to do in this phase (resumed after it ended)
          final_eval = exp.trainer.evaluate(data.test)
    bar.close()

    params = exp.trainer.params()
    total, nonzero = _final_counts(params)
    sparsity = float(jax.device_get(exp.trainer.sparsity(params)))
    final = {"step": exp.total_steps, **final_eval, "sparsity": sparsity, "params": total,
             "nonzero_params": nonzero,
             "wall_time_s": elapsed_before + time.time() - t_start,
             **exp.shrink_info, "final": True}
    writer.write(exp.total_steps, final, prefix="final/")

  if is_main:
    runs.save_params(workdir, nnx.state(exp.trainer.model()))
    outputs = None
    if jax.process_count() == 1:
      outputs = exp.outputs(data.test)
      save_predictions(os.path.join(workdir, PREDICTIONS), outputs)
      if exp.before_mitigation:
        save_predictions(os.path.join(workdir, PREDICTIONS_BEFORE_MITIGATION),
                         exp.before_mitigation)
    else:
      exp.notes.append(f"{PREDICTIONS} not written: test logits are gathered only in "
                       "single-process runs")
    _write_outputs(config, workdir, exp, final, params, outputs)
  return final


PREDICTIONS = runs.PREDICTIONS
"""The file of a run's final test logits, masks and model state, read by :mod:`train.analyze`."""
PREDICTIONS_BEFORE_MITIGATION = runs.PREDICTIONS_BEFORE_MITIGATION
"""The same at the start of the ``mitigate`` phase (the pruned model), when there is one."""


def save_predictions(path: str, outputs: Mapping[str, Any]) -> None:
  """Writes :meth:`Experiment.outputs` as a run file (:func:`train.runs.save_run_file`).

  Examples:
    >>> import os, tempfile, numpy as np
    >>> from train import train
    >>> path = os.path.join(tempfile.mkdtemp(), train.PREDICTIONS)
    >>> train.save_predictions(path, {
    ...     "logits": np.zeros((2, 3)), "labels": np.array([0, 2]),
    ...     "params": {"w": np.ones((3, 3))}, "rest": {}, "masks": {"w": np.eye(3, dtype=bool)},
    ...     "multipliers": None})
    >>> sorted(np.load(path).files)
    ['label', 'logits', 'masks/w', 'params/w']
  """
  runs.save_run_file(path, logits=outputs["logits"], labels=outputs["labels"],
                     params=outputs["params"], rest=outputs["rest"], masks=outputs["masks"],
                     multipliers=outputs["multipliers"])


def train_subset(config: ml_collections.ConfigDict) -> Callable | None:
  """The rows to train on when ``config.imbalance.classes`` is set, else None.

  Each class in ``imbalance.classes`` keeps ``imbalance.keep_fraction`` of its training
  examples, chosen by ``imbalance.seed`` (:func:`train.input_pipeline.unbalanced_indices`);
  the choice does not depend on ``config.seed``, so every seed trains on the same subset.

  Examples:
    >>> import numpy as np
    >>> from train import train
    >>> from train.configs import mitigation
    >>> config = mitigation.get_config()
    >>> labels = np.repeat(np.arange(10), 100)
    >>> np.bincount(labels[train.train_subset(config)(labels)]).tolist()
    [10, 10, 10, 100, 100, 100, 100, 100, 100, 100]
  """
  imb = config.get("imbalance")
  if imb is None or not imb.get("classes"):
    return None
  return functools.partial(input_pipeline.unbalanced_indices,
                           minority_classes=tuple(int(c) for c in imb.classes),
                           keep_fraction=float(imb.keep_fraction), seed=int(imb.get("seed", 0)))


def _write_outputs(config, workdir, exp: Experiment, final, params, outputs) -> None:
  title = f"{exp.method}: {config.model} on {config.dataset}"
  rows = reporting.layer_rows(params, exp.where)
  metrics = reporting.read_metrics(workdir)
  reporting.plot_curves(metrics, os.path.join(workdir, "curves.png"), title=title)
  reporting.plot_layer_sparsity(rows, os.path.join(workdir, "sparsity.png"), title=title)
  extra = []
  if exp.shrink_info:
    i = exp.shrink_info
    extra.append({"header": ["model", "parameters", "test accuracy"], "rows": [
        ["masked (before shrink)", f"{i['params_before']:,} ({i['nonzero_before']:,} nonzero)",
         f"{i['accuracy_masked']:.4f}"],
        ["shrunk", f"{i['params_after']:,}", f"{i['accuracy_shrunk']:.4f}"],
        ["shrunk + fine-tuned", f"{final['params']:,}", f"{final['test_accuracy']:.4f}"],
    ]})
  if exp.before_mitigation and outputs is not None:
    extra.append(_mitigation_table(config, exp, outputs))
  reporting.write_report(os.path.join(workdir, "report.md"), title=title, final=final,
                         rows=rows, config_text=str(config), notes=exp.notes, extra=extra,
                         sparsity_label="weights removed (of the prunable ones)"
                         if exp.shrink_info else "sparsity (prunable weights)")


def _mitigation_table(config, exp: Experiment, outputs) -> dict[str, Any]:
  """Before / after the ``mitigate`` phase: accuracy overall, of the worst class and of the
  unbalanced classes (``config.imbalance.classes``), and the largest multiplier."""
  imb = config.get("imbalance")
  minority = [int(c) for c in imb.classes] if imb is not None and imb.get("classes") else []
  header = ["model", "test accuracy", "worst-class accuracy"]
  header += ["accuracy of classes " + ",".join(map(str, minority))] if minority else []
  header += ["largest multiplier λ"]
  rows = []
  for name, out in (("pruned (before)", exp.before_mitigation),
                    (exp.mitigation_method + " (after)", outputs)):
    logits, labels, lam = out["logits"], out["labels"], out["multipliers"]
    pred = np.argmax(logits, -1)
    per_class = jp.analysis.per_group_metrics(logits, labels,
                                              num_groups=exp.info.num_classes).accuracy
    row = [name, f"{np.mean(pred == labels):.4f}", f"{np.nanmin(np.asarray(per_class)):.4f}"]
    if minority:
      sel = np.isin(labels, minority)
      row.append(f"{np.mean(pred[sel] == labels[sel]):.4f}")
    row.append("—" if lam is None else f"{float(np.max(lam)):.3f}")
    rows.append(row)
  return {"header": header, "rows": rows}
