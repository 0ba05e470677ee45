"""The training engine of jaxprune's experiments: :class:`Trainer` and :func:`make_mesh`.

A :class:`Trainer` holds a model and its optimizer as replicated state on a mesh and runs the
jitted train and eval steps; :meth:`Trainer.run` is the one training loop every part of
``train/`` uses (the recipes' phases of :func:`train.train.train_and_evaluate`, the dense
model of :mod:`train.oneshot`).

Parallelism. All local devices form one mesh axis ``"data"`` (:func:`make_mesh`): every batch
is sharded along it (``P("data")``), parameters and optimizer state are replicated (``P()``),
and one ``jax.jit`` program does the step; XLA inserts the gradient all-reduce. The same code
runs on 1 CPU, 8 host devices or a TPU slice (with several processes, each feeds its own rows;
see :mod:`train.input_pipeline`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxprune as jp
from train import input_pipeline, models
from train import mitigation as mitigation_lib

__all__ = ["Batch", "Trainer", "make_mesh"]

Batch = Mapping[str, np.ndarray]


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all devices).

  Examples:
    >>> from train import trainer
    >>> mesh = trainer.make_mesh()
    >>> mesh.axis_names
    ('data',)
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


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
    >>> from train import models, trainer
    >>> model = models.create_model("mlp", input_shape=(40,), num_classes=10,
    ...                             rngs=nnx.Rngs(0), hidden=(16,))
    >>> t = trainer.Trainer(model, optax.adam(1e-2), mesh=trainer.make_mesh())
    >>> batch = {"x": np.ones((8, 40), np.float32), "label": np.zeros(8, np.int32)}
    >>> sorted(t.train_step(batch))
    ['accuracy', 'learning_rate', 'loss', 'sparsity']
    >>> done = []  # the training loop: steps 1 and 2, on a batch that is a function of the step
    >>> t.run(lambda step: {**batch, "x": np.full((8, 40), step, np.float32)}, 1, 3,
    ...       after_step=lambda step, metrics: done.append(step))
    >>> done, int(t.optimizer().step[...])
    ([2, 3], 3)
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

  def run(self, batches: Callable[[int], Batch], begin: int, end: int, *,
          before_step: Callable[[int], None] | None = None,
          after_step: Callable[[int, dict[str, jax.Array]], None] | None = None) -> None:
    """The training loop: optimizer steps ``begin, ..., end - 1``, step ``t`` on ``batches(t)``.

    Args:
      batches: ``step -> batch`` (numpy, this process's rows), e.g.
        :meth:`train.input_pipeline.TrainData.batch`: a pure function of the step, so a loop
        resumed at ``begin`` sees exactly the batches of an uninterrupted one.
      begin: the first step.
      end: the step to stop before.
      before_step: ``before_step(t)`` runs before step ``t`` (work due between steps, e.g. a
        recipe's pruning rounds; it may replace this trainer's state).
      after_step: ``after_step(t + 1, metrics)`` runs after it, with the step's device
        metrics (not fetched: logging, evaluation and checkpoints decide when to wait).

    See the class's example.
    """
    for t in range(begin, end):
      if before_step is not None:
        before_step(t)
      metrics = self.train_step(batches(t))
      if after_step is not None:
        after_step(t + 1, metrics)

  def predict(self, test: input_pipeline.EvalData) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, labels)`` of every test example, in the split's order (eval mode).

    Raises:
      ValueError: with several processes (each holds a slice of the split; not gathered).

    Examples:
      >>> import tempfile, optax
      >>> from flax import nnx
      >>> from train import input_pipeline, models, trainer
      >>> ds = input_pipeline.get_datasets("mnist1d", batch_size=8, seed=0, eval_batch_size=300,
      ...                                  data_dir=tempfile.mkdtemp())  # doctest: +ELLIPSIS
      Downloading and preparing dataset ...
      >>> model = models.create_model("mlp", input_shape=(40,), num_classes=10,
      ...                             rngs=nnx.Rngs(0), hidden=(16,))
      >>> t = trainer.Trainer(model, optax.adam(1e-2), mesh=trainer.make_mesh())
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


