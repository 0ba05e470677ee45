"""Disparate impact of pruning on unbalanced data, and its mitigation by constrained fine-tuning.

The experiment of issue 5 ("what pruning costs"): MNIST-1D with some classes subsampled in the
train split (the *minority* classes; the test split stays balanced), and three arms that share
one dense start per seed:

1. **dense** — the dense model, trained ``dense_steps`` steps.
2. **pruned** — from the dense model, gradual magnitude pruning (``jp.magnitude_pruning`` with a
   cubic ``jp.polynomial_schedule`` from 0 to the target sparsity over the first 75% of
   ``prune_steps``), then ``finetune_steps`` of plain cross-entropy fine-tuning.
3. **pruned+mitigation** — the *same* pruned model (the state at the end of the pruning phase),
   fine-tuned for the same ``finetune_steps`` with the same optimizer and the same batches,
   under per-group loss constraints: :func:`jaxprune.analysis.constrained_loss` as the loss of
   the primal step and :func:`jaxprune.analysis.dual_ascent_update` on the multipliers after
   every step (Tran et al., 2022; Hashemizadeh et al., 2024).

In both fine-tuning arms the chain ends with ``jp.magnitude_pruning(sparsity)`` whose state is
given the pruning phase's masks (``replace_masks``): the pruned weights are scored NaN (lowest),
so re-computing the masks at the same sparsity gives the same masks, and the transform emits
``-p`` for every pruned weight, which stays exactly 0.

:func:`mitigation_finetune` is the fine-tuning routine both arms use. The main training loop
(``python -m train``) offers the same mitigation as a recipe option, ``config.mitigation``
(a ``mitigate`` phase; ``train/configs/mitigation.py``), built from :class:`Mitigation`,
:func:`mitigation_from_config` and :func:`finetune_optimizer`.

Usage::

    python -m train.fairness --workdir /tmp/fair [--model cnn] [--seeds 0,1,2] \
        [--sparsities 0.5,0.8,0.9] [--dense-steps 2000] [--prune-steps 1000] \
        [--finetune-steps 1000]
    python -m train.analyze --workdir /tmp/fair

The workdir's files (``config.json``, ``test_data.npz``, ``runs.json``, ``runs/*.npz``) are
described in :mod:`train.analyze`.

References:
  Tran, Fioretto, Kim and Naidu, "Pruning has a disparate impact on model accuracy",
  NeurIPS 2022.
  Hashemizadeh, Ramirez, Sukumaran, Farnadi, Lacoste-Julien and Gallego-Posada, "Balancing Act:
  Constraining Disparate Impact in Sparse Models", ICLR 2024.
  Zhu and Gupta, "To prune, or not to prune", 2017 (gradual magnitude pruning).
  Greydanus and Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxprune import _tree, analysis, schedules, transforms
from train import mnist1d_builder, models
from train.input_pipeline import unbalanced_indices

__all__ = [
    "ArrayBatches", "ExperimentConfig", "FinetuneResult", "Mitigation", "finetune_optimizer",
    "group_ids", "load_arrays", "main", "mitigation_finetune", "mitigation_from_config",
    "run_experiment", "train_steps", "unbalanced_indices", "where_excluding",
]

Batch = dict[str, np.ndarray]
DENSE, PRUNED, MITIGATED = "dense", "pruned", "pruned+mitigation"
GROUPINGS = ("classes", "minority")


# ----------------------------------------------------------------------------- data


class Arrays(NamedTuple):
  """A dataset held in memory: ``x_*`` float32 ``(n, *input_shape)``, ``y_*`` int32 ``(n,)``."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


def load_arrays(data_dir: str | os.PathLike | None = None) -> Arrays:
  """MNIST-1D's train and test splits as numpy arrays, in the dataset's order.

  Built locally by :func:`train.mnist1d_builder.prepare` (no download) and read through
  ``builder.as_data_source``.

  Args:
    data_dir: TFDS data directory; ``None``: :func:`train.mnist1d_builder.default_data_dir`.

  Returns:
    An :class:`Arrays` with 4000 train and 1000 test examples of shape ``(40,)``.

  Examples:
    >>> import tempfile
    >>> from train.fairness import load_arrays
    >>> a = load_arrays(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Downloading and preparing dataset ...
    >>> a.x_train.shape, a.y_test.shape, a.num_classes
    ((4000, 40), (1000,), 10)
  """
  builder = mnist1d_builder.prepare(data_dir)
  input_key, label_key = builder.info.supervised_keys

  def read(split):
    source = builder.as_data_source(split)
    rows = [source[i] for i in range(len(source))]
    x = np.stack([np.asarray(r[input_key], np.float32) for r in rows])
    y = np.asarray([r[label_key] for r in rows], np.int32)
    return x, y

  x_train, y_train = read("train")
  x_test, y_test = read("test")
  num_classes = int(builder.info.features[label_key].num_classes)
  return Arrays(x_train, y_train, x_test, y_test, num_classes)


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


# ----------------------------------------------------------------------------- mitigation


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
      >>> from train.fairness import Mitigation
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
    :func:`mitigation_finetune`), or None.

  Examples:
    >>> from train.fairness import mitigation_from_config
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
    >>> from train.fairness import Mitigation, group_ids
    >>> group_ids(jnp.array([0, 3, 1]), Mitigation(groups="minority",
    ...                                            minority_classes=(1, 3))).tolist()
    [0, 1, 1]
  """
  labels = jnp.asarray(labels, jnp.int32)
  if mitigation.groups == "classes":
    return labels
  minority = jnp.asarray(mitigation.minority_classes, jnp.int32)
  return jnp.any(labels[:, None] == minority[None, :], axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- training


def _apply(graphdef, params, rest, x, *, train: bool):
  model = nnx.merge(graphdef, params, rest, copy=True)  # copy: BatchStats mutate under grad
  view = models.train_view(model) if train else models.eval_view(model)
  return view(x), nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))


_RUNNERS: dict = {}
_EVALS: dict = {}


def _runner(graphdef, tx: optax.GradientTransformation, mitigation: Mitigation | None,
            num_groups: int) -> Callable:
  """A jitted ``lax.scan`` over a chunk of stacked batches (one compilation per chunk length).

  Cached on ``(graphdef, tx, mitigation)`` so that several seeds reuse one compilation.
  """
  key = (graphdef, tx, mitigation, num_groups)
  if key not in _RUNNERS:
    if len(_RUNNERS) > 64:
      _RUNNERS.clear()
    _RUNNERS[key] = _make_runner(graphdef, tx, mitigation, num_groups)
  return _RUNNERS[key]


def _make_runner(graphdef, tx, mitigation, num_groups):

  def one_step(carry, batch):
    params, rest, opt_state, lam = carry

    def objective(params, rest):
      logits, new_rest = _apply(graphdef, params, rest, batch["x"], train=True)
      per_example = optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), batch["label"])
      if mitigation is None:
        return jnp.mean(per_example), (new_rest, jnp.zeros_like(lam))
      value, violations = mitigation.lagrangian(per_example, batch["label"], lam, num_groups)
      return value, (new_rest, violations)

    (value, (rest, violations)), grads = jax.value_and_grad(objective, has_aux=True)(params, rest)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    new_lam = lam if mitigation is None else analysis.dual_ascent_update(
        lam, violations, mitigation.dual_lr)
    record = {"loss": value, "violations": violations, "multipliers": lam}
    return (params, rest, opt_state, new_lam), record

  @jax.jit
  def run(params, rest, opt_state, lam, batches):
    return jax.lax.scan(one_step, (params, rest, opt_state, lam), batches)

  return run


def train_steps(graphdef, params, rest, tx: optax.GradientTransformation, opt_state,
                batch_fn: Callable[[int], Batch], *, start_step: int, steps: int,
                mitigation: Mitigation | None = None, multipliers=None,
                num_classes: int | None = None, chunk: int = 50):
  """Runs ``steps`` optimizer steps on batches ``batch_fn(start_step + i)``.

  With ``mitigation`` the loss is :func:`jaxprune.analysis.constrained_loss` over the groups
  of :func:`group_ids` and the multipliers take one :func:`jaxprune.analysis.dual_ascent_update`
  after every step; without it, the mean cross-entropy. Steps run ``chunk`` at a time inside
  one jitted ``lax.scan``.

  Args:
    graphdef, params, rest: ``nnx.split(model, nnx.Param, ...)``.
    tx: the optax transformation; ``opt_state`` its state.
    batch_fn: ``step -> {"x", "label"}`` numpy batch (e.g. ``TrainData.batch``).
    start_step: the first data step.
    steps: number of steps (``>= 0``).
    mitigation: the constraints, or None for plain cross-entropy.
    multipliers: float32 ``(num_groups,)`` initial multipliers (default zeros).
    num_classes: number of classes (default: read from the ``head`` kernel).
    chunk: steps per jitted scan (the largest divisor of ``steps`` not above it is used).

  Returns:
    ``(params, rest, opt_state, multipliers, history)`` where ``history`` maps ``loss``
    ``(steps,)``, ``violations`` and ``multipliers`` ``(steps, num_groups)`` (the multipliers
    *before* each step) to numpy arrays.
  """
  if steps < 0:
    raise ValueError(f"steps: must be >= 0, got {steps}")
  num_groups = 1
  if mitigation is not None:
    num_classes = num_classes or _num_logits(params)
    num_groups = mitigation.num_groups(num_classes)
  lam = (jnp.zeros((num_groups,), jnp.float32) if multipliers is None
         else jnp.asarray(multipliers, jnp.float32))
  if lam.shape != (num_groups,):
    raise ValueError(f"multipliers: must have shape ({num_groups},), got {lam.shape}")
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  run = _runner(graphdef, tx, mitigation, num_groups)
  size = max(d for d in range(1, max(1, min(chunk, steps)) + 1) if steps % d == 0) if steps else 1
  history: dict[str, list[np.ndarray]] = {"loss": [], "violations": [], "multipliers": []}
  for begin in range(0, steps, size):
    batches = [batch_fn(start_step + begin + i) for i in range(size)]
    stacked = {k: np.stack([b[k] for b in batches]) for k in ("x", "label")}
    (params, rest, opt_state, lam), record = run(params, rest, opt_state, lam, stacked)
    for k in history:
      history[k].append(np.asarray(record[k]))
  hist = {k: (np.concatenate(v) if v else np.zeros((0,) if k == "loss" else (0, num_groups),
                                                   np.float32))
          for k, v in history.items()}
  return params, rest, opt_state, lam, hist


def _num_logits(params) -> int:
  """The model's number of outputs: the last axis of the last leaf named ``*kernel``."""
  paths, leaves, _ = _tree.flatten(params)
  kernels = [leaf for p, leaf in zip(paths, leaves) if p.endswith("kernel")]
  if not kernels:
    raise ValueError("params: no leaf named '*kernel' to read the number of classes from; "
                     "pass num_classes")
  head = [leaf for p, leaf in zip(paths, leaves) if p.startswith("head/") and p.endswith("kernel")]
  return int(np.shape(head[0] if head else kernels[-1])[-1])


class FinetuneResult(NamedTuple):
  """What :func:`mitigation_finetune` returns.

  Attributes:
    params, rest: the fine-tuned ``nnx.Param`` state and the rest (e.g. BatchNorm statistics).
    masks: the masks held by the pruning transform at the end (equal to the masks given).
    multipliers: float32 ``(num_groups,)`` final multipliers (zeros without mitigation).
    history: ``loss`` ``(steps,)``, ``violations`` and ``multipliers`` ``(steps, num_groups)``
      per step, numpy (multipliers as they were *before* the step).
  """
  params: Any
  rest: Any
  masks: Any
  multipliers: jax.Array
  history: dict[str, np.ndarray]


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
    >>> from train.fairness import finetune_optimizer
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


def mitigation_finetune(graphdef, params, rest, masks, batch_fn: Callable[[int], Batch], *,
                        steps: int, sparsity: float | None, mitigation: Mitigation | None,
                        num_classes: int | None = None, learning_rate: float = 1e-3,
                        optimizer: optax.GradientTransformation | None = None,
                        start_step: int = 0, multipliers=None, where: _tree.Where | None = None,
                        chunk: int = 50) -> FinetuneResult:
  """Fine-tunes a pruned model with fixed masks, under per-group loss constraints.

  Solves ``min_θ L(θ)`` subject to ``L_g(θ) − L(θ) ≤ ε`` for every group ``g`` (classes, or
  minority vs majority) by alternating one primal optimizer step on the Lagrangian
  ``L + Σ_g λ_g (L_g − L − ε)`` (:func:`jaxprune.analysis.constrained_loss`) and one projected
  dual ascent step ``λ_g ← max(0, λ_g + η (L_g − L − ε))``
  (:func:`jaxprune.analysis.dual_ascent_update`), both measured on the current batch.

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
    chunk: steps per jitted scan.

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
  if num_classes is None:
    num_classes = _num_logits(params)
  if mitigation is not None:
    mitigation.validate(num_classes)
  # Plain arrays (no nnx.Variable wrappers) for params, rest and masks alike.
  params, rest, masks = nnx.as_pure(params), nnx.as_pure(rest), nnx.as_pure(masks)
  _check_masks(params, masks, sparsity)
  tx = finetune_optimizer(float(learning_rate), int(steps),
                          0.0 if sparsity is None else float(sparsity), optimizer, where)
  opt_state = transforms.replace_masks(tx.init(params), masks)
  params, rest, opt_state, lam, hist = train_steps(
      graphdef, params, rest, tx, opt_state, batch_fn, start_step=start_step, steps=steps,
      mitigation=mitigation, multipliers=multipliers, num_classes=num_classes, chunk=chunk)
  return FinetuneResult(params, rest, transforms.masks_from_state(opt_state), lam, hist)


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


# ----------------------------------------------------------------------------- experiment


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything that defines one run of the experiment (written to ``config.json``).

  Minority classes ``(0, 1, 2)``: fixed before any run, by position rather than by a measured
  property, so that the choice cannot favour the result; three of ten classes give the
  minority about 300 test examples (295 in MNIST-1D), so its pooled accuracy moves in steps of
  about 0.3%. The train subsample is fixed by ``data_seed``; ``seeds`` vary the initialisation
  and the batch order.

  ``keep_dense``: leaves never pruned; by default the CNN's first conv (160 weights: at 90% it
  would keep 16, and in a pilot run the pruned CNN fell to about 42% accuracy), a common
  practice for the first layer. A path the model does not have is ignored.
  ``sparsities``: one pruned (and mitigated) arm per value; several give the accuracy-vs-
  sparsity curves of :mod:`train.analyze`.
  ``mitigate``: False skips the mitigated arm.
  """
  model: str = "cnn"
  model_kwargs: tuple[tuple[str, Any], ...] = ()
  dataset: str = "mnist1d"
  minority_classes: tuple[int, ...] = (0, 1, 2)
  keep_fraction: float = 0.1
  data_seed: int = 0
  seeds: tuple[int, ...] = (0, 1, 2)
  sparsities: tuple[float, ...] = (0.9,)
  keep_dense: tuple[str, ...] = ("convs/0/kernel",)
  batch_size: int = 128
  dense_steps: int = 2000
  dense_lr: float = 1e-2
  prune_steps: int = 1000
  prune_lr: float = 2e-3
  prune_ramp: float = 0.75
  prune_update_every: int = 50
  finetune_steps: int = 1000
  finetune_lr: float = 2e-3
  epsilon: float = 0.05
  dual_lr: float = 0.01
  groups: str = "classes"
  mitigate: bool = True

  def mitigation(self) -> Mitigation:
    return Mitigation(self.epsilon, self.dual_lr, self.groups, tuple(self.minority_classes))

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["model_kwargs"] = dict(self.model_kwargs)
    return d


@functools.lru_cache(maxsize=16)
def _adam(kind: str, lr: float, steps: int):
  if kind == "cosine":
    return optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1)))
  return optax.adam(lr)


@functools.lru_cache(maxsize=16)
def _gmp_tx(lr: float, sparsity: float, steps: int, ramp: float, update_every: int,
            where: _tree.Where | None):
  # The ramp ends on a mask-update step, so the final sparsity is reached inside the phase.
  end = max(update_every, int(ramp * steps) // update_every * update_every)
  if end >= steps:
    raise ValueError(f"prune_steps: {steps} steps leave no mask update after the ramp ends "
                     f"at step {end} (prune_update_every={update_every}); use more steps")
  schedule = schedules.polynomial_schedule(sparsity, begin_step=0, end_step=end)
  return optax.chain(_adam("constant", lr, steps),
                     transforms.magnitude_pruning(schedule, update_every=update_every,
                                                  where=where))


@functools.lru_cache(maxsize=16)
def where_excluding(paths: tuple[str, ...]) -> _tree.Where | None:
  """The default prunable-leaf rule minus the leaves at ``paths`` (None when ``paths`` is empty).

  Cached, so equal ``paths`` give the same function (and jitted steps are reused).

  Examples:
    >>> import jax.numpy as jnp
    >>> from train.fairness import where_excluding
    >>> where = where_excluding(("convs/0/kernel",))
    >>> where("convs/0/kernel", jnp.ones((5, 1, 32))), where("head/kernel", jnp.ones((4, 2)))
    (False, True)
  """
  if not paths:
    return None
  skip = frozenset(paths)
  return lambda path, leaf: path not in skip and _tree.default_where(path, leaf)


def _eval_fn(graphdef):
  """The jitted eval-mode logits of ``graphdef``'s model, one per (hashable) graphdef."""
  if graphdef not in _EVALS:
    @jax.jit
    def logits(params, rest, x):
      return _apply(graphdef, params, rest, x, train=False)[0]
    _EVALS[graphdef] = logits
  return _EVALS[graphdef]


def save_run(workdir: str, *, method: str, sparsity: float, seed: int, logits, params, rest,
             masks=None, multipliers=None, train_class_loss=None,
             extra: Mapping | None = None) -> dict:
  """Writes ``runs/<method>_s<sparsity>_seed<seed>.npz`` in the format :mod:`train.analyze` reads.

  Returns the index record (also appended to ``runs.json``).
  """
  from train import analyze  # the format's owner (it imports this module lazily)

  os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
  name = f"{method.replace('+', '-')}_s{sparsity:g}_seed{seed}.npz"
  analyze.save_run_file(os.path.join(workdir, "runs", name), logits=logits, params=params,
                        rest=rest, masks=masks, multipliers=multipliers,
                        train_class_loss=train_class_loss)
  record = {"method": method, "sparsity": float(sparsity), "seed": int(seed),
            "file": f"runs/{name}", **dict(extra or {})}
  index_path = os.path.join(workdir, "runs.json")
  index = []
  if os.path.exists(index_path):
    with open(index_path) as f:
      index = json.load(f)
  index = [r for r in index if r["file"] != record["file"]] + [record]
  with open(index_path, "w") as f:
    json.dump(index, f, indent=1)
  return record


def run_experiment(workdir: str, config: ExperimentConfig = ExperimentConfig(), *,
                   data: Arrays | None = None, log: Callable[[str], None] = print) -> list[dict]:
  """Runs every arm for every seed and sparsity; writes the workdir that ``train.analyze`` reads.

  Per seed: one dense model (``dense_steps``); per sparsity: gradual magnitude pruning from it
  (``prune_steps``), then ``finetune_steps`` of plain fine-tuning (**pruned**) and, from the
  same pruned state with the same batches, ``finetune_steps`` of constrained fine-tuning
  (**pruned+mitigation**). Data steps continue across phases (dense ``[0, D)``, pruning
  ``[D, D+P)``, both fine-tunings ``[D+P, D+P+F)``).

  Args:
    workdir: output directory (created).
    config: an :class:`ExperimentConfig`.
    data: the dataset (default :func:`load_arrays`, MNIST-1D); the train split is subsampled
      with :func:`unbalanced_indices`, the test split is used whole.
    log: progress printer.

  Returns:
    The ``runs.json`` records (method, sparsity, seed, file, accuracy, seconds).
  """
  os.makedirs(workdir, exist_ok=True)
  if os.path.exists(os.path.join(workdir, "runs.json")):
    os.remove(os.path.join(workdir, "runs.json"))
  data = data if data is not None else load_arrays()
  mitigation = config.mitigation().validate(data.num_classes)
  keep = unbalanced_indices(data.y_train, config.minority_classes, config.keep_fraction,
                            config.data_seed)
  x_train, y_train = data.x_train[keep], data.y_train[keep]
  meta = config.to_json()
  meta.update(num_classes=data.num_classes, input_shape=list(data.x_train.shape[1:]),
              train_class_counts=np.bincount(y_train, minlength=data.num_classes).tolist(),
              test_class_counts=np.bincount(data.y_test, minlength=data.num_classes).tolist(),
              methods=[DENSE, PRUNED] + ([MITIGATED] if config.mitigate else []))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(meta, f, indent=1)
  np.savez_compressed(os.path.join(workdir, "test_data.npz"), x=data.x_test, label=data.y_test)
  log(f"train class counts {meta['train_class_counts']} (minority {config.minority_classes} "
      f"kept at {config.keep_fraction}); test {len(data.y_test)} examples")

  eval_x = np.concatenate([data.x_test, x_train])
  where = where_excluding(tuple(config.keep_dense))
  records = []
  for seed in config.seeds:
    batches = ArrayBatches(x_train, y_train, batch_size=config.batch_size, seed=seed)
    model = models.create_model(config.model, input_shape=data.x_train.shape[1:],
                                num_classes=data.num_classes, rngs=nnx.Rngs(seed),
                                **dict(config.model_kwargs))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    evaluate = _eval_fn(graphdef)

    def finish(method, sparsity, params, rest, masks=None, multipliers=None, seconds=0.0,
               seed=seed, evaluate=evaluate):
      both = np.asarray(evaluate(params, rest, eval_x))       # test then train, one call
      logits, train_logits = both[:len(data.y_test)], both[len(data.y_test):]
      acc = float(np.mean(np.argmax(logits, -1) == data.y_test))
      train_metrics = analysis.per_group_metrics(train_logits, y_train,
                                                 num_groups=data.num_classes)
      rec = save_run(workdir, method=method, sparsity=sparsity, seed=seed, logits=logits,
                     params=params, rest=rest, masks=masks, multipliers=multipliers,
                     train_class_loss=train_metrics.loss,
                     extra={"accuracy": acc, "train_loss": float(train_metrics.overall_loss),
                            "seconds": round(seconds, 2)})
      records.append(rec)
      log(f"seed {seed} {method:>18} s={sparsity:g}: test accuracy {acc:.4f} "
          f"({seconds:.0f} s)")

    t0 = time.perf_counter()
    tx = _adam("cosine", config.dense_lr, config.dense_steps)
    params, rest, _, _, _ = train_steps(graphdef, params, rest, tx, tx.init(params), batches.batch,
                                        start_step=0, steps=config.dense_steps)
    finish(DENSE, 0.0, params, rest, seconds=time.perf_counter() - t0)
    dense_params, dense_rest = params, rest

    for s in config.sparsities:
      t0 = time.perf_counter()
      tx = _gmp_tx(config.prune_lr, float(s), config.prune_steps, config.prune_ramp,
                   config.prune_update_every, where)
      p, r, opt_state, _, _ = train_steps(graphdef, dense_params, dense_rest, tx,
                                          tx.init(dense_params), batches.batch,
                                          start_step=config.dense_steps,
                                          steps=config.prune_steps)
      masks = transforms.masks_from_state(opt_state)  # pruned weights of p are exactly 0
      prune_seconds = time.perf_counter() - t0
      start = config.dense_steps + config.prune_steps
      arms = [(PRUNED, None)] + ([(MITIGATED, mitigation)] if config.mitigate else [])
      for method, mit in arms:
        t0 = time.perf_counter()
        out = mitigation_finetune(graphdef, p, r, masks, batches.batch,
                                  steps=config.finetune_steps, sparsity=float(s), mitigation=mit,
                                  num_classes=data.num_classes, learning_rate=config.finetune_lr,
                                  start_step=start, where=where)
        finish(method, float(s), out.params, out.rest, masks=out.masks,
               multipliers=out.multipliers if mit is not None else None,
               seconds=prune_seconds + time.perf_counter() - t0)
  return records


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(",") if v.strip())


def main(argv: Sequence[str] | None = None) -> list[dict]:
  """``python -m train.fairness --workdir DIR [...]``; see the module docstring."""
  d = ExperimentConfig()
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--model", default=d.model, choices=sorted(models.MODELS))
  p.add_argument("--seeds", type=_ints, default=d.seeds)
  p.add_argument("--sparsities", type=_floats, default=d.sparsities)
  p.add_argument("--minority-classes", type=_ints, default=d.minority_classes)
  p.add_argument("--keep-fraction", type=float, default=d.keep_fraction)
  p.add_argument("--keep-dense", type=lambda t: tuple(x for x in t.split(",") if x),
                 default=d.keep_dense, help="comma-separated paths never pruned ('' for none)")
  p.add_argument("--dense-steps", type=int, default=d.dense_steps)
  p.add_argument("--prune-steps", type=int, default=d.prune_steps)
  p.add_argument("--finetune-steps", type=int, default=d.finetune_steps)
  p.add_argument("--epsilon", type=float, default=d.epsilon)
  p.add_argument("--dual-lr", type=float, default=d.dual_lr)
  p.add_argument("--groups", default=d.groups, choices=GROUPINGS)
  p.add_argument("--no-mitigation", action="store_true")
  p.add_argument("--analyze", action="store_true", help="run train.analyze afterwards")
  args = p.parse_args(argv)
  config = ExperimentConfig(
      model=args.model, seeds=args.seeds, sparsities=args.sparsities,
      minority_classes=args.minority_classes, keep_fraction=args.keep_fraction,
      keep_dense=args.keep_dense,
      dense_steps=args.dense_steps, prune_steps=args.prune_steps,
      finetune_steps=args.finetune_steps, epsilon=args.epsilon, dual_lr=args.dual_lr,
      groups=args.groups, mitigate=not args.no_mitigation)
  records = run_experiment(args.workdir, config)
  if args.analyze:
    from train import analyze
    print(f"wrote {analyze.analyze(args.workdir)}")
  return records


if __name__ == "__main__":
  main()
