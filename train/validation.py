"""Checks of a run before it starts, and of training while it runs.

* :func:`validate_config`: every config value the loop would otherwise trip over later (a
  ``ZeroDivisionError`` for ``log_every=0``, an error naming orbax's arguments for
  ``checkpoint_every=0``, jaxprune's ``end_step (0) must be greater than begin_step (0)`` for
  a GMP run of fewer than 75 steps, a NaN learning rate that trains to ``test_loss=nan``) is
  refused up front, with a message naming the config key and the values allowed.
* :func:`prepare_dataset`: the TFDS dataset ``config.dataset`` is found, and prepared if it is
  not yet; an unknown name, or a download that fails (offline), is an error naming
  ``config.dataset``, and nothing of the failed download is left in ``data_dir``.
* :func:`check_finite_metrics` and :func:`check_finite_params`: a non-finite loss or a
  non-finite parameter (an update that was ``nan``/``inf``) stops the run with
  :class:`TrainingDivergedError`, naming the step and what to try, before the state is
  checkpointed.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from train import models, recipes

__all__ = ["TrainingDivergedError", "check_finite_metrics", "check_finite_params",
           "prepare_dataset", "validate_config"]

GRADUAL = ("gmp", "channels")
"""Methods with a ``polynomial_schedule(sparsity, begin_step, end_step)`` over ``num_steps``."""

_HINT = ("lower config.learning_rate, add config.warmup_steps, or wrap the optimizer in "
         "optax.apply_if_finite (or clip gradients with optax.clip_by_global_norm)")


class TrainingDivergedError(FloatingPointError):
  """The loss or the parameters became ``nan``/``inf``; the run stopped.

  Attributes:
    step: the (0-based) training step whose loss, or (1-based) count of steps after which the
      parameters, were found non-finite; see the message.
  """

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


# ----------------------------------------------------------------------------- the config


def _int(config, key: str, *, minimum: int, why: str = "") -> int:
  value = config
  for part in key.split("."):
    value = value[part]
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{key}: must be an integer >= {minimum}, got {value!r}")
  if value < minimum:
    raise ValueError(f"{key}: must be >= {minimum}{why}, got {value}")
  return int(value)


def _float(config, key: str, *, low: float = 0.0, high: float = math.inf) -> float:
  value = config
  for part in key.split("."):
    value = value[part]
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{key}: must be a number in [{low}, {high}], got {value!r}") from None
  if not math.isfinite(x) or not low <= x <= high:
    raise ValueError(f"{key}: must be a finite number in [{low}, {high}], got {value!r}")
  return x


def _choice(value: Any, key: str, allowed: Sequence[str]) -> str:
  if value not in allowed:
    raise ValueError(f"{key}: expected one of {list(allowed)}, got {value!r}")
  return value


def _schedule_steps(config: ml_collections.ConfigDict, n: int) -> None:
  """``0 <= begin_step < end_step < num_steps``, ``end_step`` a multiple of ``update_every``."""
  p = config.pruning
  every = _int(config, "pruning.update_every", minimum=1)
  begin = _int(config, "pruning.begin_step", minimum=0)
  end = _int(config, "pruning.end_step", minimum=0)
  default = (f" By default (train/configs/default.py, gradual_schedule) begin_step and "
             f"end_step are 10% and 67% of num_steps rounded down to multiples of "
             f"pruning.update_every={every}, which needs num_steps >= {_min_steps(every)}; "
             "raise num_steps or lower pruning.update_every, or set pruning.begin_step and "
             "pruning.end_step.")
  if not begin < end:
    raise ValueError(f"pruning.end_step: must be greater than pruning.begin_step ({begin}), "
                     f"got {end} (num_steps={n}).{default}")
  if end >= n:
    raise ValueError(f"pruning.end_step: must be less than num_steps ({n}) for the masks to "
                     f"be updated at end_step and reach pruning.sparsity={p.sparsity}, got "
                     f"{end}.{default}")
  if end % every:
    raise ValueError(f"pruning.end_step: must be a multiple of pruning.update_every ({every}) "
                     "for the masks to be updated at end_step and reach pruning.sparsity="
                     f"{p.sparsity} (the last update would be at step {end // every * every}), "
                     f"got {end}")


def _n_of_m_sparsity(p: ml_collections.ConfigDict, method: str) -> None:
  """An ``"N:M"`` structure gives the sparsity ``1 - N/M`` only, and in one step."""
  match = re.fullmatch(r"\s*(\d+):(\d+)\s*", str(p.get("structure", "unstructured")))
  if not match or method == "dense":
    return
  n, m = int(match.group(1)), int(match.group(2))
  if m <= 0 or n > m:
    return  # experiment.parse_structure names the bad structure
  if abs(float(p.sparsity) - (1 - n / m)) > 1e-6:
    raise ValueError(f"pruning.sparsity: the structure {n}:{m} gives sparsity {1 - n / m:g} only, "
                     f"got {p.sparsity}; set pruning.sparsity={1 - n / m:g}.")
  if method in GRADUAL:
    raise ValueError(f"pruning.method: {method!r} ramps the sparsity through values the structure "
                     f"{n}:{m} cannot give; use pruning.method='oneshot' for N:M.")


def _min_steps(every: int) -> int:
  """The fewest ``num_steps`` for which the default gradual schedule is not empty."""
  n = 1
  while not (n // 10 // every * every < n * 2 // 3 // every * every < n):
    n += 1
  return n


def validate_config(config: ml_collections.ConfigDict, *,
                    methods: Sequence[str] | None = None) -> None:
  """Refuses a config the loop cannot run correctly; each error names the key.

  Checked: ``model`` (one of :data:`train.models.MODELS`), ``dataset`` (a name),
  ``num_steps``, ``batch_size``, ``eval_batch_size``, ``log_every``, ``eval_every``,
  ``checkpoint_every``, ``keep_checkpoints`` (integers >= 1), ``seed`` and ``warmup_steps``
  (>= 0), ``learning_rate`` and ``weight_decay`` (finite, >= 0), ``lr_schedule``,
  ``pruning.method`` (one of ``methods``), ``pruning.sparsity`` (finite, in [0, 1]); for
  ``gmp`` and ``channels`` the schedule: ``0 <= begin_step < end_step < num_steps`` with
  ``end_step`` a multiple of ``update_every >= 1`` (so the masks reach ``sparsity``); for
  ``set`` and ``rigl`` ``update_every >= 1``; for ``oneshot`` ``0 <= at_step < num_steps``;
  for ``channels`` ``finetune_steps >= 0``; with ``mitigation.enabled``, ``mitigation.steps
  >= 1`` and a finite ``mitigation.learning_rate > 0``. (:class:`train.train.Experiment`
  checks the rest: ``pruning.structure``, ``pruning.where``, IMP's rounds.)

  Args:
    config: an experiment config (``train/configs/*.py``).
    methods: the allowed ``pruning.method`` values (default: the registered recipes,
      :func:`train.recipes.names`).

  Raises:
    ValueError: naming the first bad key and the values allowed.

  Examples:
    >>> from train import validation
    >>> from train.configs import gmp
    >>> config = gmp.get_config()
    >>> validation.validate_config(config)
    >>> config.log_every = 0
    >>> validation.validate_config(config)
    Traceback (most recent call last):
    ...
    ValueError: log_every: must be >= 1, got 0
  """
  if methods is None:
    methods = recipes.names()
  _choice(config.model, "model", sorted(models.MODELS))
  if not isinstance(config.dataset, str) or not config.dataset:
    raise ValueError(f"dataset: must be a TFDS dataset name, got {config.dataset!r}")
  n = _int(config, "num_steps", minimum=1)
  for key in ("batch_size", "eval_batch_size", "log_every", "eval_every", "checkpoint_every"):
    if key in config:
      _int(config, key, minimum=1)
  if config.get("keep_checkpoints") is not None:
    _int(config, "keep_checkpoints", minimum=1, why=" (or None: keep all)")
  _int(config, "seed", minimum=0)
  _int(config, "warmup_steps", minimum=0)
  _float(config, "learning_rate")
  _float(config, "weight_decay")
  _choice(config.lr_schedule, "lr_schedule", ("cosine", "constant"))
  p = config.pruning
  method = _choice(p.method, "pruning.method", tuple(methods))
  _float(config, "pruning.sparsity", high=1.0)
  if method in GRADUAL:
    _schedule_steps(config, n)
  _n_of_m_sparsity(p, method)
  if method in ("set", "rigl"):
    _int(config, "pruning.update_every", minimum=1)
  if method == "oneshot":
    at = _int(config, "pruning.at_step", minimum=0)
    if at >= n:
      raise ValueError(f"pruning.at_step: must be in [0, num_steps={n}), got {at}")
  if method == "channels":
    _int(config, "pruning.finetune_steps", minimum=0)
  m = config.get("mitigation")
  if m is not None and m.get("enabled", False):
    _int(config, "mitigation.steps", minimum=1, why=" when mitigation.enabled")
    if not _float(config, "mitigation.learning_rate") > 0:
      raise ValueError(f"mitigation.learning_rate: must be > 0, got {m.learning_rate}")


# ----------------------------------------------------------------------------- the dataset


def _entries(data_dir: str, name: str) -> set[str]:
  """Paths under ``data_dir`` a download of ``name`` may create: top-level entries, and
  everything below ``downloads/`` and ``<name>/``."""
  out = set()
  if not os.path.isdir(data_dir):
    return out
  for entry in os.listdir(data_dir):
    out.add(os.path.join(data_dir, entry))
  for sub in ("downloads", name):
    for root, dirs, files in os.walk(os.path.join(data_dir, sub)):
      out.update(os.path.join(root, x) for x in dirs + files)
  return out


def _remove_new(data_dir: str, name: str, before: set[str], existed: bool) -> None:
  """Removes what appeared among :func:`_entries` since ``before`` (all of ``data_dir`` if it
  did not exist)."""
  if not existed:
    shutil.rmtree(data_dir, ignore_errors=True)
    return
  removed: list[str] = []
  for path in sorted(_entries(data_dir, name) - before, key=lambda x: x.count(os.sep)):
    if any(path.startswith(r + os.sep) for r in removed) or not os.path.lexists(path):
      continue
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      os.remove(path)
    removed.append(path)


def prepare_dataset(config: ml_collections.ConfigDict) -> None:
  """Makes sure the TFDS dataset ``config.dataset`` is prepared in ``config.data_dir``.

  An unknown name fails at once. A dataset not yet prepared is prepared as
  :func:`train.input_pipeline.get_datasets` would (``array_record``; ``mnist1d`` is generated
  locally, others are downloaded); if that fails (e.g. no network), every file the attempt
  created in the data directory is removed and the error names ``config.dataset``.

  Args:
    config: with ``dataset`` and ``data_dir`` (None: ``$JAXPRUNE_DATA_DIR`` or TFDS's default).

  Raises:
    ValueError: ``dataset`` is not a registered TFDS dataset.
    RuntimeError: ``dataset`` is not prepared and preparing it failed.

  Examples:
    >>> import tempfile
    >>> from train import validation
    >>> from train.configs import default
    >>> config = default.get_config()
    >>> config.dataset, config.data_dir = "mnist_1d", tempfile.mkdtemp()
    >>> validation.prepare_dataset(config)
    Traceback (most recent call last):
    ...
    ValueError: dataset: 'mnist_1d' is not a TFDS dataset; did you mean ['mnist1d', ...]?
  """
  import tensorflow_datasets as tfds

  from train import mnist1d_builder
  name = config.dataset
  data_dir = os.fspath(config.data_dir) if config.get("data_dir") else \
      mnist1d_builder.default_data_dir()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    close = difflib.get_close_matches(str(name).split(":")[0].split("/")[0],
                                      tfds.list_builders(with_community_datasets=False), n=3)
    hint = f"; did you mean {close}?" if close else " (see tfds.list_builders())"
    raise ValueError(f"dataset: {name!r} is not a TFDS dataset{hint}") from None
  if builder.is_prepared():
    return
  existed = os.path.isdir(data_dir)
  before = _entries(data_dir, builder.name)
  try:
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except Exception as e:  # noqa: BLE001 -- network, disk, or the builder's own errors
    _remove_new(data_dir, builder.name, before, existed)
    text = " ".join(str(e).split())[:300]
    raise RuntimeError(
        f"dataset: {name!r} is not prepared in data_dir={data_dir!r} and preparing it failed "
        f"({type(e).__name__}: {text}); what the attempt wrote was removed. Without network, "
        f"prepare it on a machine with access (tfds build {builder.name} --data_dir=DIR "
        "--file_format=array_record) and set config.data_dir to that directory.") from e


# ----------------------------------------------------------------------------- while training


def check_finite_metrics(logs: Sequence[dict[str, Any]], last_step: int, *,
                         phase: str | None = None) -> None:
  """Stops the run if a logged loss is not finite.

  Args:
    logs: the metrics of consecutive steps (host values), the last one of step
      ``last_step - 1`` (0-based), i.e. the loop's ``done == last_step``.
    last_step: steps done after the last of ``logs``.
    phase: the phase's name, for the message (optional: steps count on across phases).

  Raises:
    TrainingDivergedError: naming the first step whose loss is ``nan``/``inf`` and its
      learning rate.

  Examples:
    >>> from train import validation
    >>> try:
    ...   validation.check_finite_metrics([{"loss": 2.3}, {"loss": float("inf")}], 10)
    ... except validation.TrainingDivergedError as e:
    ...   print(e.step, "|", str(e)[:45])
    9 | training diverged: the loss of step 9 is inf.
  """
  for i, m in enumerate(logs):
    loss = float(np.asarray(m["loss"]))
    if not math.isfinite(loss):
      step = last_step - len(logs) + i
      lr = m.get("learning_rate")
      at = f" (learning rate {float(np.asarray(lr)):.3g})" if lr is not None else ""
      raise TrainingDivergedError(
          f"training diverged{_in(phase)}: the loss of step {step} is {loss}{at}. "
          f"Stopped before anything after it was checkpointed; {_HINT}.", step)


def _in(phase: str | None) -> str:
  return "" if phase is None else f" in phase {phase!r}"


@jax.jit
def _finite_leaves(params):
  return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                      else jnp.array(True), params)


def check_finite_params(params: Any, steps_done: int, *, phase: str | None = None) -> None:
  """Stops the run if a parameter is ``nan``/``inf`` (a non-finite update).

  Args:
    params: the parameter tree (e.g. ``Trainer.params()``).
    steps_done: the number of optimizer steps that made them.
    phase: the phase's name, for the message (optional).

  Raises:
    TrainingDivergedError: naming the leaves that are not finite.

  Examples:
    >>> import jax.numpy as jnp
    >>> from train import validation
    >>> validation.check_finite_params({"w": jnp.ones(3)}, 5)
    >>> try:
    ...   validation.check_finite_params({"w": jnp.array([1.0, jnp.nan])}, 5)
    ... except validation.TrainingDivergedError as e:
    ...   print(str(e)[:70])
    training diverged: after step 5 these parameters are not finite: ['w']
  """
  flags = jax.device_get(_finite_leaves(params))
  bad = [jax.tree_util.keystr(k, simple=True, separator="/")
         for k, ok in jax.tree_util.tree_flatten_with_path(flags)[0] if not bool(ok)]
  if bad:
    raise TrainingDivergedError(
        f"training diverged{_in(phase)}: after step {steps_done} these parameters are "
        f"not finite: {bad[:5]}{' ...' if len(bad) > 5 else ''} (an update was nan or inf). "
        f"Stopped before they were checkpointed; {_HINT}.", steps_done)
