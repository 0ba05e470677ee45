"""Constrained fine-tuning of a pruned model as a function, on the runner's :class:`Trainer`.

:func:`mitigation_finetune` fine-tunes any pruned NNX model with its masks frozen, under the
per-group loss constraints of a :class:`train.mitigation.Mitigation` (or, with
``mitigation=None``, with plain cross-entropy: the fair baseline). Every step is one
:meth:`train.train.Trainer.train_step`, the step of the main loop (``python -m train``), whose
``mitigate`` phase is the same fine-tuning as a recipe option. :func:`finetune_trainer` and
:func:`run_steps` are its two halves, for callers that want the trainer itself (e.g. to
evaluate with :meth:`~train.train.Trainer.predict`); :class:`ArrayBatches` gives batches from
in-memory arrays.

The experiment that uses it (MNIST-1D made unbalanced on purpose; dense, pruned and pruned +
mitigation arms over seeds) is :mod:`benchmarks.fairness`. The pieces of the mitigation
(:class:`~train.mitigation.Mitigation`, :func:`~train.mitigation.mitigation_from_config`,
:func:`~train.mitigation.group_ids`, :func:`~train.mitigation.finetune_optimizer`) live in
:mod:`train.mitigation` and are importable from here too.

References:
  Tran, Fioretto, Kim and Naidu, "Pruning has a disparate impact on model accuracy",
  NeurIPS 2022.
  Hashemizadeh, Ramirez, Sukumaran, Farnadi, Lacoste-Julien and Gallego-Posada, "Balancing Act:
  Constraining Disparate Impact in Sparse Models", ICLR 2024.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxprune import _tree
from train import models
from train.input_pipeline import unbalanced_indices
from train.mitigation import (
    GROUPINGS,
    Mitigation,
    finetune_optimizer,
    group_ids,
    hold_masks,
    mitigation_from_config,
)
from train.runs import where_excluding
from train.trainer import Trainer, make_mesh

__all__ = [
    "GROUPINGS", "ArrayBatches", "FinetuneResult", "Mitigation", "finetune_optimizer",
    "finetune_trainer", "group_ids", "mitigation_finetune", "mitigation_from_config",
    "run_steps", "unbalanced_indices", "where_excluding",
]

Batch = dict[str, np.ndarray]


class ArrayBatches:
  """Training batches from in-memory arrays; batch ``t`` is a pure function of ``(seed, t)``.

  The same rule as :class:`train.input_pipeline.TrainData`: epoch ``e = t // steps_per_epoch``
  uses ``np.random.default_rng([seed, e]).permutation(n)``; step ``t`` takes the
  ``t % steps_per_epoch``-th run of ``batch_size`` indices from it; the last ``n % batch_size``
  examples of each epoch are dropped.

  Examples:
    >>> import numpy as np
    >>> from train.fairness import ArrayBatches
    >>> b = ArrayBatches(np.zeros((10, 3), np.float32), np.arange(10), batch_size=4, seed=0)
    >>> b.steps_per_epoch, b.batch(5)["x"].shape
    (2, (4, 3))
  """

  def __init__(self, x: np.ndarray, y: np.ndarray, *, batch_size: int, seed: int):
    if not 1 <= batch_size <= len(y):
      raise ValueError(f"batch_size: must be in [1, {len(y)}], got {batch_size}")
    self.x, self.y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    self.batch_size, self.seed = int(batch_size), int(seed)
    self.steps_per_epoch = len(self.y) // self.batch_size

  @functools.lru_cache(maxsize=2)  # noqa: B019 - two epochs in flight at most; tiny
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.y))

  def batch(self, step: int) -> Batch:
    """``{"x", "label"}`` of the batch at ``step`` (``>= 0``)."""
    if step < 0:
      raise ValueError(f"step: must be >= 0, got {step}")
    epoch, pos = divmod(int(step), self.steps_per_epoch)
    idx = self._permutation(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]
    return {"x": self.x[idx], "label": self.y[idx]}


def run_steps(trainer: Trainer, batch_fn: Callable[[int], Batch], *, start_step: int,
              steps: int, chunk: int = 50) -> dict[str, np.ndarray]:
  """Runs ``steps`` :meth:`Trainer.train_step` calls on batches ``batch_fn(start_step + i)``.

  Metrics stay on the device and are fetched ``chunk`` steps at a time.

  Args:
    trainer: the :class:`train.train.Trainer` (its state advances in place).
    batch_fn: ``step -> {"x", "label"}`` numpy batch (e.g. ``TrainData.batch``).
    start_step: the data step of the first batch.
    steps: number of steps (``>= 0``).
    chunk: steps between fetches of the metrics (``>= 1``).

  Returns:
    The history, numpy: ``loss`` ``(steps,)`` (mean cross-entropy of each batch), and
    ``violations`` and ``multipliers`` ``(steps, num_groups)`` (the constraint violations of
    each step, and the multipliers as they were *before* it; one column of zeros for a
    trainer without constraints).

  Examples:
    >>> import numpy as np, optax
    >>> from flax import nnx
    >>> from train import fairness, models, train
    >>> model = models.create_model("mlp", input_shape=(4,), num_classes=3,
    ...                             rngs=nnx.Rngs(0), hidden=(8,))
    >>> t = train.Trainer(model, optax.adam(1e-2), mesh=train.make_mesh())
    >>> data = fairness.ArrayBatches(np.ones((16, 4)), np.arange(16) % 3, batch_size=8, seed=0)
    >>> h = fairness.run_steps(t, data.batch, start_step=0, steps=3)
    >>> h["loss"].shape, h["violations"].shape
    ((3,), (3, 1))
  """
  if steps < 0:
    raise ValueError(f"steps: must be >= 0, got {steps}")
  if chunk < 1:
    raise ValueError(f"chunk: must be >= 1, got {chunk}")
  constrained = "multipliers" in trainer.state
  none = jnp.zeros((1,), jnp.float32)
  history: dict[str, list[np.ndarray]] = {"loss": [], "violations": [], "multipliers": []}
  pending = []
  for i in range(steps):
    before = trainer.state["multipliers"] if constrained else none
    metrics = trainer.train_step(batch_fn(start_step + i))
    pending.append((metrics["loss"], metrics["violations"] if constrained else none, before))
    if len(pending) == chunk or i == steps - 1:
      for loss, violations, lam in jax.device_get(pending):
        history["loss"].append(loss)
        history["violations"].append(violations)
        history["multipliers"].append(lam)
      pending = []
  width = trainer.state["multipliers"].shape[0] if constrained else 1
  return {k: (np.stack(v).astype(np.float32) if v else
              np.zeros((0,) if k == "loss" else (0, width), np.float32))
          for k, v in history.items()}


def _num_logits(params) -> int:
  """The model's number of outputs: the last axis of the last leaf named ``*kernel``."""
  paths, leaves, _ = _tree.flatten(params)
  kernels = [leaf for p, leaf in zip(paths, leaves) if p.endswith("kernel")]
  if not kernels:
    raise ValueError("params: no leaf named '*kernel' to read the number of classes from; "
                     "pass num_classes")
  head = [leaf for p, leaf in zip(paths, leaves) if p.startswith("head/") and p.endswith("kernel")]
  return int(np.shape(head[0] if head else kernels[-1])[-1])


def _check_masks(params, masks, sparsity: float | None) -> None:
  paths, leaves, _ = _tree.flatten(params)
  _, mask_leaves, _ = _tree.flatten(masks)
  if len(mask_leaves) != len(leaves):
    raise ValueError(f"masks: {len(mask_leaves)} leaves but params have {len(leaves)}")
  for path, p, m in zip(paths, leaves, mask_leaves):
    if np.ndim(m) == 0:
      continue
    m = np.asarray(m, bool)
    if np.any(np.asarray(p)[~m] != 0):
      raise ValueError(f"params/{path}: pruned weights are not 0; apply the masks first")
    expected = None if sparsity is None else round(sparsity * m.size)
    if expected is not None and int((~m).sum()) != expected:
      raise ValueError(f"masks/{path}: {int((~m).sum())} pruned of {m.size}, but sparsity "
                       f"{sparsity} removes {expected}; pass the sparsity the masks were made at")


def finetune_trainer(graphdef, params, rest, masks, *, steps: int, sparsity: float | None,
                     mitigation: Mitigation | None, num_classes: int | None = None,
                     learning_rate: float = 1e-3,
                     optimizer: optax.GradientTransformation | None = None, multipliers=None,
                     where: _tree.Where | None = None,
                     mesh: jax.sharding.Mesh | None = None) -> Trainer:
  """The :class:`train.train.Trainer` of :func:`mitigation_finetune`, before its first step.

  Checks the inputs as :func:`mitigation_finetune` documents, builds the model (train mode),
  the optimizer (:func:`train.mitigation.finetune_optimizer`) with ``masks`` held in its
  pruning state (:func:`train.mitigation.hold_masks`) and, with ``mitigation``, the initial
  multipliers. The arguments are :func:`mitigation_finetune`'s; ``mesh`` defaults to
  :func:`train.train.make_mesh` (all devices).

  Examples:
    >>> import numpy as np, jaxprune as jp
    >>> from flax import nnx
    >>> from train import fairness, models
    >>> model = models.create_model("mlp", input_shape=(4,), num_classes=3,
    ...                             rngs=nnx.Rngs(0), hidden=(8,))
    >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    >>> params, masks = jp.prune(params, 0.5)
    >>> t = fairness.finetune_trainer(graphdef, params, rest, masks, steps=4, sparsity=0.5,
    ...                               mitigation=fairness.Mitigation(0.0, 0.1))
    >>> t.state["multipliers"].shape, float(jp.sparsity(t.masks()))
    ((3,), 0.5)
  """
  if num_classes is None:
    num_classes = _num_logits(params)
  if mitigation is not None:
    mitigation.validate(num_classes)
  # Plain arrays (no nnx.Variable wrappers) for params, rest and masks alike.
  params, rest, masks = nnx.as_pure(params), nnx.as_pure(rest), nnx.as_pure(masks)
  _check_masks(params, masks, sparsity)
  tx = finetune_optimizer(float(learning_rate), int(steps),
                          0.0 if sparsity is None else float(sparsity), optimizer, where)
  model = models.train_view(nnx.merge(graphdef, params, rest, copy=True))
  trainer = Trainer(model, tx, mesh=mesh or make_mesh(), mitigation=mitigation,
                    num_classes=num_classes)
  hold_masks(trainer, masks)
  if mitigation is not None and multipliers is not None:
    lam = jnp.asarray(multipliers, jnp.float32)
    if lam.shape != trainer.state["multipliers"].shape:
      raise ValueError(f"multipliers: must have shape {trainer.state['multipliers'].shape}, "
                       f"got {lam.shape}")
    trainer.state["multipliers"] = jax.device_put(lam, trainer.replicated)
  return trainer


class FinetuneResult(NamedTuple):
  """What :func:`mitigation_finetune` returns.

  Attributes:
    params, rest: the fine-tuned ``nnx.Param`` state and the rest (e.g. BatchNorm statistics).
    masks: the masks held by the pruning transform at the end (equal to the masks given).
    multipliers: float32 ``(num_groups,)`` final multipliers (``[0.]`` without mitigation).
    history: :func:`run_steps`' ``loss`` ``(steps,)``, ``violations`` and ``multipliers``
      ``(steps, num_groups)`` per step, numpy (multipliers as they were *before* the step).
  """
  params: Any
  rest: Any
  masks: Any
  multipliers: jax.Array
  history: dict[str, np.ndarray]


def mitigation_finetune(graphdef, params, rest, masks, batch_fn: Callable[[int], Batch], *,
                        steps: int, sparsity: float | None, mitigation: Mitigation | None,
                        num_classes: int | None = None, learning_rate: float = 1e-3,
                        optimizer: optax.GradientTransformation | None = None,
                        start_step: int = 0, multipliers=None, where: _tree.Where | None = None,
                        chunk: int = 50, mesh: jax.sharding.Mesh | None = None) -> FinetuneResult:
  """Fine-tunes a pruned model with fixed masks, under per-group loss constraints.

  Solves ``min_θ L(θ)`` subject to ``L_g(θ) − L(θ) ≤ ε`` for every group ``g`` (classes, or
  minority vs majority) by alternating one primal optimizer step on the Lagrangian
  ``L + Σ_g λ_g (L_g − L − ε)`` (:func:`jaxprune.analysis.constrained_loss`) and one projected
  dual ascent step ``λ_g ← max(0, λ_g + η (L_g − L − ε))``
  (:func:`jaxprune.analysis.dual_ascent_update`), both measured on the current batch: the
  constrained step of :class:`train.train.Trainer`, the main loop's.

  The optimizer is ``optax.chain(optimizer, jp.magnitude_pruning(sparsity))`` with ``masks``
  put into the pruning state (``replace_masks``): recomputing masks at the same sparsity, with
  the already pruned weights scored NaN, gives the same masks, and the transform emits ``-p``
  for pruned weights, so they stay exactly 0. ``sparsity`` must be the layerwise sparsity the
  masks were made at (a ``ValueError`` is raised if a prunable leaf's pruned count differs).
  With ``sparsity=None`` (masks of any kind: global, ERK, N:M) the link is
  ``jp.magnitude_pruning(0.0)``: its recomputed masks keep everything and are AND-ed with the
  held ``masks``, which therefore stay exactly as given.

  With ``mitigation=None`` this is plain cross-entropy fine-tuning with everything else equal,
  the fair baseline of the mitigated arm.

  Args:
    graphdef, params, rest: the pruned model, ``nnx.split(model, nnx.Param, ...)``; ``params``
      must already be zero where ``masks`` is False.
    masks: the keep-masks (``jp.masks_from_state(opt_state)`` of the pruning run).
    batch_fn: ``step -> {"x", "label"}`` numpy batch, e.g. ``TrainData.batch``.
    steps: fine-tuning steps.
    sparsity: the layerwise sparsity of ``masks``, or None to freeze any masks as given.
    mitigation: a :class:`Mitigation` (e.g. from :func:`mitigation_from_config`) or None.
    num_classes: number of classes (default: the last axis of the ``head`` kernel).
    learning_rate: peak of the cosine-decayed Adam used when ``optimizer`` is None.
    optimizer: optional optax optimizer replacing that Adam (learning rate included).
    start_step: data step of the first batch.
    multipliers: initial ``λ`` (default zeros).
    where: ``(path, leaf) -> bool`` choosing the prunable leaves, as in the pruning run
      (default: floating leaves with ``ndim >= 2``).
    chunk: steps between fetches of the recorded history from the device.
    mesh: the devices to train on (default: :func:`train.train.make_mesh`, all of them).

  Returns:
    A :class:`FinetuneResult`.

  Raises:
    ValueError: bad mitigation fields, pruned weights that are not 0, or masks whose pruned
      counts are not ``round(sparsity · n)``.

  Examples:
    >>> import numpy as np, jaxprune as jp
    >>> from flax import nnx
    >>> from train import models
    >>> from train.fairness import ArrayBatches, Mitigation, mitigation_finetune
    >>> model = models.create_model("mlp", input_shape=(4,), num_classes=3,
    ...                             rngs=nnx.Rngs(0), hidden=(8,))
    >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    >>> params, masks = jp.prune(params, 0.5)
    >>> rng = np.random.default_rng(0)
    >>> data = ArrayBatches(rng.normal(size=(32, 4)), rng.integers(0, 3, 32), batch_size=8,
    ...                     seed=0)
    >>> r = mitigation_finetune(graphdef, params, rest, masks, data.batch, steps=4,
    ...                         sparsity=0.5, mitigation=Mitigation(epsilon=0.0, dual_lr=0.1))
    >>> r.history["multipliers"].shape, float(jp.sparsity(r.params))
    ((4, 3), 0.5)

  References:
    Tran et al., "Pruning has a disparate impact on model accuracy", NeurIPS 2022.
    Hashemizadeh et al., "Balancing Act: Constraining Disparate Impact in Sparse Models",
    ICLR 2024.
  """
  trainer = finetune_trainer(graphdef, params, rest, masks, steps=steps, sparsity=sparsity,
                             mitigation=mitigation, num_classes=num_classes,
                             learning_rate=learning_rate, optimizer=optimizer,
                             multipliers=multipliers, where=where, mesh=mesh)
  history = run_steps(trainer, batch_fn, start_step=start_step, steps=steps, chunk=chunk)
  _, params, rest = nnx.split(trainer.model(), nnx.Param, ...)
  lam = trainer.state.get("multipliers", jnp.zeros((1,), jnp.float32))
  return FinetuneResult(nnx.as_pure(params), nnx.as_pure(rest), trainer.masks(), lam, history)
