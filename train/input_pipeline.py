"""tensorflow-datasets splits as deterministic numpy batches, split per JAX process.

One code path for every dataset: ``tfds.builder(name, data_dir=...)``, prepared in the
``array_record`` format and read with ``builder.as_data_source()`` (random access, no
TensorFlow). ``"mnist1d"`` is the local builder in :mod:`train.mnist1d_builder` (generated,
never downloaded); any TFDS image dataset (``mnist``, ``fashion_mnist``, ``cifar10``) works the
same way, its ``uint8`` images scaled to ``float32`` in ``[0, 1]``.

Determinism and resuming
------------------------
Training batches are a pure function of ``(seed, step)``:

* epoch ``e = step // steps_per_epoch`` uses the permutation
  ``np.random.default_rng([seed, e]).permutation(num_train)``;
* step ``t`` takes the ``t % steps_per_epoch``-th run of ``batch_size`` indices from it, and the
  last ``num_train % batch_size`` indices of each epoch are dropped.

Nothing else is kept between steps, so a run resumed at step ``t`` (the checkpoint stores the
step; see :mod:`train.checkpointing`) calls ``train.iterator(start_step=t)`` and sees exactly the
batches an uninterrupted run would have seen. No data-iterator state needs checkpointing.

Several processes
-----------------
``batch_size`` is the *global* batch. Every process computes the same global batch for step
``t`` and keeps its own contiguous slice of ``batch_size // process_count`` rows (process ``p``
gets rows ``[p * b, (p + 1) * b)``), so the global batch does not depend on the number of
processes. The test split is divided with ``tfds.split_for_jax_process``; every process
yields the same number of fixed-shape eval batches, padded at the end, with a boolean ``mask``
marking the real examples (so a jitted eval step never recompiles and ``psum`` over processes
counts each example once).

Batches are dicts ``{"x": float32 (b, *input_shape), "label": int32 (b,)}``; eval batches add
``"mask": bool (b,)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import tensorflow_datasets as tfds

from train import mnist1d_builder  # noqa: F401  (registers the "mnist1d" builder)

__all__ = ["Datasets", "EvalData", "Metadata", "TrainData", "get_datasets", "unbalanced_indices"]

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Metadata:
  """What a model and a training loop need to know about a dataset.

  Attributes:
    name: TFDS name, e.g. ``"mnist1d"``.
    input_shape: shape of one example's input, without the batch axis, e.g. ``(40,)`` or
      ``(28, 28, 1)``.
    num_classes: number of labels.
    num_train: examples in the whole train split (all processes).
    num_test: examples in the whole test split (all processes).
    input_key: feature that holds the input (the builder's first supervised key).
    label_key: feature that holds the label (the builder's second supervised key).
  """

  name: str
  input_shape: tuple[int, ...]
  num_classes: int
  num_train: int
  num_test: int
  input_key: str
  label_key: str


def _to_float(x: np.ndarray, path: str) -> np.ndarray:
  """``uint8`` -> ``float32 / 255``; floating -> ``float32``; anything else is an error."""
  if x.dtype == np.uint8:
    return x.astype(np.float32) / np.float32(255.0)
  if np.issubdtype(x.dtype, np.floating):
    return x.astype(np.float32, copy=False)
  raise ValueError(f"{path}: inputs must be uint8 images or floats, got dtype {x.dtype}")


def unbalanced_indices(labels, minority_classes: Sequence[int], keep_fraction: float,
                       seed: int) -> np.ndarray:
  """Indices of a subsample in which the minority classes keep only a fraction of their examples.

  Every example of a class not in ``minority_classes`` is kept. A minority class with ``n_c``
  examples keeps exactly ``round(keep_fraction · n_c)`` of them (Python's ``round``), chosen
  uniformly without replacement by ``np.random.default_rng([seed, c])``, so each class's choice
  does not depend on the other classes.

  Args:
    labels: integer labels ``(num_examples,)`` of the split to subsample (e.g. train).
    minority_classes: the classes to subsample; each must occur in ``labels``.
    keep_fraction: fraction of each minority class kept, in [0, 1].
    seed: seed of the choice (``>= 0``).

  Returns:
    Sorted int64 indices into ``labels``.

  Raises:
    ValueError: ``labels`` not a 1-D integer array, ``keep_fraction`` outside [0, 1], a
      negative seed, or a minority class that does not occur (or occurs twice in the list).

  Examples:
    >>> import numpy as np
    >>> from train.input_pipeline import unbalanced_indices
    >>> labels = np.array([0] * 10 + [1] * 10 + [2] * 5)
    >>> idx = unbalanced_indices(labels, [1, 2], 0.2, seed=0)
    >>> np.bincount(labels[idx]).tolist()
    [10, 2, 1]
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels: must be a 1-D integer array, got shape {labels.shape}, dtype "
                     f"{labels.dtype}")
  if not 0.0 <= float(keep_fraction) <= 1.0:
    raise ValueError(f"keep_fraction: must be in [0, 1], got {keep_fraction}")
  if int(seed) < 0:
    raise ValueError(f"seed: must be >= 0, got {seed}")
  minority = [int(c) for c in minority_classes]
  if len(set(minority)) != len(minority):
    raise ValueError(f"minority_classes: repeated class in {minority}")
  keep = np.ones(labels.shape, bool)
  for c in minority:
    members = np.flatnonzero(labels == c)
    if members.size == 0:
      raise ValueError(f"minority_classes: class {c} does not occur in labels")
    k = round(float(keep_fraction) * members.size)
    chosen = np.random.default_rng([int(seed), c]).choice(members, size=k, replace=False)
    keep[members] = False
    keep[chosen] = True
  return np.flatnonzero(keep).astype(np.int64)


class _Reader:
  """Reads rows of one data source as ``(x, label)`` numpy arrays, optionally cached."""

  def __init__(self, source: Sequence[dict[str, Any]], meta: Metadata, *, in_memory: bool,
               path: str):
    self._source = source
    self._meta = meta
    self._path = path
    self.size = len(source)
    self._cache = self._read_rows(range(self.size)) if in_memory else None

  def _read_rows(self, indices) -> tuple[np.ndarray, np.ndarray]:
    rows = [self._source[int(i)] for i in indices]
    if not rows:
      return (np.zeros((0, *self._meta.input_shape), np.float32), np.zeros((0,), np.int32))
    x = np.stack([np.asarray(r[self._meta.input_key]) for r in rows])
    y = np.asarray([r[self._meta.label_key] for r in rows], np.int32)
    return _to_float(x, f"{self._path}/{self._meta.input_key}"), y

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if self._cache is not None:
      x, y = self._cache
      return x[indices], y[indices]
    return self._read_rows(indices)


class _Subset:
  """The rows ``indices`` of another reader, renumbered ``0 .. len(indices) - 1``."""

  def __init__(self, reader: _Reader, indices: np.ndarray):
    self._reader = reader
    self._indices = np.asarray(indices, np.int64)
    self.size = len(self._indices)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self._reader.read(self._indices[np.asarray(indices, np.int64)])


class TrainData:
  """The train split of one process: batch ``t`` is a pure function of ``(seed, t)``.

  Use :meth:`iterator` in the loop, :meth:`batch` to fetch one step's batch directly.

  Attributes:
    batch_size: global batch size (all processes).
    local_batch_size: rows this process gets, ``batch_size // process_count``.
    steps_per_epoch: ``num_train // batch_size`` (the remainder is dropped each epoch).
    seed: the shuffling seed.
  """

  def __init__(self, reader: _Reader, *, batch_size: int, seed: int, process_index: int,
               process_count: int):
    self._reader = reader
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.steps_per_epoch = reader.size // batch_size
    self.seed = seed
    self._lo = process_index * self.local_batch_size
    self._perm_epoch = -1
    self._perm = np.zeros((0,), np.int64)

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self._reader.size)
      self._perm_epoch = epoch
    return self._perm

  def indices(self, step: int) -> np.ndarray:
    """Train-split row indices of this process's part of the batch at ``step``.

    Args:
      step: training step, ``>= 0``.

    Returns:
      int array of shape ``(local_batch_size,)``.

    Examples:
      >>> import tempfile
      >>> from train import input_pipeline
      >>> ds = input_pipeline.get_datasets("mnist1d", batch_size=8, seed=0,
      ...                                  data_dir=tempfile.mkdtemp())  # doctest: +ELLIPSIS
      Downloading and preparing dataset ...
      >>> ds.train.indices(3).shape
      (8,)
    """
    if step < 0:
      raise ValueError(f"step: must be >= 0, got {step}")
    epoch, pos = divmod(int(step), self.steps_per_epoch)
    start = pos * self.batch_size + self._lo
    return self._permutation(epoch)[start:start + self.local_batch_size]

  def batch(self, step: int) -> Batch:
    """This process's part of the batch at ``step``: ``{"x", "label"}`` numpy arrays.

    Examples:
      >>> import tempfile
      >>> from train import input_pipeline
      >>> ds = input_pipeline.get_datasets("mnist1d", batch_size=8, seed=0,
      ...                                  data_dir=tempfile.mkdtemp())  # doctest: +ELLIPSIS
      Downloading and preparing dataset ...
      >>> b = ds.train.batch(5)
      >>> b["x"].shape, b["x"].dtype, b["label"].dtype
      ((8, 40), dtype('float32'), dtype('int32'))
    """
    x, y = self._reader.read(self.indices(step))
    return {"x": x, "label": y}

  def iterator(self, start_step: int = 0) -> Iterator[Batch]:
    """Endless batches for steps ``start_step, start_step + 1, ...``.

    To resume a run, pass the step stored in the checkpoint: the batches are the ones the
    uninterrupted run would have seen.

    Examples:
      >>> import tempfile, numpy as np
      >>> from train import input_pipeline
      >>> ds = input_pipeline.get_datasets("mnist1d", batch_size=8, seed=0,
      ...                                  data_dir=tempfile.mkdtemp())  # doctest: +ELLIPSIS
      Downloading and preparing dataset ...
      >>> it = ds.train.iterator(start_step=10)
      >>> bool(np.array_equal(next(it)["x"], ds.train.batch(10)["x"]))
      True
    """
    step = int(start_step)
    if step < 0:
      raise ValueError(f"start_step: must be >= 0, got {start_step}")
    while True:
      yield self.batch(step)
      step += 1


class EvalData:
  """The test split of one process, in a fixed order, as fixed-shape padded batches.

  Iterating yields ``num_batches`` dicts ``{"x", "label", "mask"}`` of ``local_batch_size``
  rows; ``mask`` is False on padding rows (zeros). ``num_batches`` is the same on every
  process. Iterate as often as needed; every pass yields the same batches.

  Attributes:
    num_examples: real examples this process holds.
    local_batch_size: rows per batch.
    num_batches: batches per pass, equal on all processes.
  """

  def __init__(self, reader: _Reader, *, local_batch_size: int, num_batches: int):
    self._reader = reader
    self.num_examples = reader.size
    self.local_batch_size = local_batch_size
    self.num_batches = num_batches

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[Batch]:
    b = self.local_batch_size
    for i in range(self.num_batches):
      idx = np.arange(i * b, min((i + 1) * b, self.num_examples))
      x, y = self._reader.read(idx)
      pad = b - len(idx)
      yield {
          "x": np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]),
          "label": np.concatenate([y, np.zeros((pad,), y.dtype)]),
          "mask": np.arange(b) < len(idx),
      }


class Datasets(NamedTuple):
  """What :func:`get_datasets` returns: ``train, test, info = get_datasets(...)``."""

  train: TrainData
  test: EvalData
  info: Metadata


def _metadata(name: str, builder: tfds.core.DatasetBuilder, num_train: int,
              num_test: int) -> Metadata:
  keys = builder.info.supervised_keys
  if not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys):
    raise ValueError(f"name: dataset {name!r} has no (input, label) supervised_keys: {keys}")
  input_key, label_key = keys
  features = builder.info.features
  label = features[label_key]
  if not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f"name: {name}/{label_key} is not a ClassLabel feature")
  shape = tuple(features[input_key].shape)
  if any(d is None for d in shape):
    raise ValueError(f"name: {name}/{input_key} has a variable shape {shape}")
  return Metadata(name=name, input_shape=shape, num_classes=int(label.num_classes),
                  num_train=num_train, num_test=num_test, input_key=input_key,
                  label_key=label_key)


def get_datasets(
    name: str = "mnist1d",
    *,
    batch_size: int,
    seed: int,
    eval_batch_size: int | None = None,
    data_dir: str | os.PathLike | None = None,
    train_split: str = "train",
    test_split: str = "test",
    process_index: int | None = None,
    process_count: int | None = None,
    in_memory: bool = True,
    train_indices: Sequence[int] | np.ndarray | Callable[[np.ndarray], Any] | None = None,
) -> Datasets:
  """Prepares a TFDS dataset (array_record) and returns its train and test pipelines.

  Args:
    name: TFDS name: ``"mnist1d"`` (generated locally, the default) or any registered image
      classification dataset with ``(input, label)`` supervised keys, e.g. ``"mnist"``.
    batch_size: global training batch size; must be divisible by ``process_count``.
    seed: shuffling seed (``>= 0``); the train batch at step ``t`` depends only on
      ``(seed, t)``.
    eval_batch_size: global eval batch size; defaults to ``batch_size``.
    data_dir: TFDS data directory; ``None`` means
      :func:`train.mnist1d_builder.default_data_dir` (``$JAXPRUNE_DATA_DIR`` or TFDS's
      default).
    train_split: TFDS split (slicing syntax allowed, e.g. ``"train[:90%]"``) used for training.
    test_split: split used for evaluation.
    process_index: this process; defaults to ``jax.process_index()``.
    process_count: number of processes; defaults to ``jax.process_count()``.
    in_memory: decode each split once into numpy arrays (fast; for datasets that fit in host
      memory). ``False`` reads the rows of each batch from the array_record files instead;
      the batches are identical.
    train_indices: train only on these rows of ``train_split`` (distinct, in range), or a
      function from the split's labels ``(num_train,)`` to such rows, e.g.
      ``functools.partial(unbalanced_indices, minority_classes=[0, 1], keep_fraction=0.1,
      seed=0)``. Batches are drawn from them by the same ``(seed, step)`` rule and
      ``info.num_train`` is their number. ``None``: every row.

  Returns:
    ``Datasets(train, test, info)``: a :class:`TrainData`, an :class:`EvalData` and the
    :class:`Metadata`.

  Raises:
    ValueError: bad sizes or seed, or a dataset without ``(input, label)`` supervised keys.

  Examples:
    >>> import tempfile
    >>> from train import input_pipeline
    >>> train, test, info = input_pipeline.get_datasets(
    ...     "mnist1d", batch_size=128, seed=0, data_dir=tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Downloading and preparing dataset ...
    >>> info.input_shape, info.num_classes, info.num_train, train.steps_per_epoch
    ((40,), 10, 4000, 31)
    >>> sum(int(b["mask"].sum()) for b in test)
    1000
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if eval_batch_size is None:
    eval_batch_size = batch_size
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index: {process_index} is not in [0, {process_count})")
  for arg, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
    if value < 1 or value % process_count:
      raise ValueError(f"{arg}: must be a positive multiple of process_count={process_count}, "
                       f"got {value}")
  if seed < 0:
    raise ValueError(f"seed: must be >= 0, got {seed}")

  data_dir = os.fspath(data_dir) if data_dir is not None else mnist1d_builder.default_data_dir()
  builder = tfds.builder(name, data_dir=data_dir)
  # No GCS lookup: it needs the network and only ever serves tfrecord files.
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))

  train_source = builder.as_data_source(train_split)
  test_full = builder.as_data_source(test_split)
  test_source = builder.as_data_source(tfds.split_for_jax_process(
      test_split, process_index=process_index, process_count=process_count))
  info = _metadata(name, builder, num_train=len(train_source), num_test=len(test_full))
  train_reader = _Reader(train_source, info, in_memory=in_memory, path=f"{name}/{train_split}")
  if callable(train_indices):
    train_indices = train_indices(train_reader.read(np.arange(train_reader.size))[1])
  if train_indices is not None:
    train_indices = np.asarray(train_indices)
    if (train_indices.ndim != 1 or not np.issubdtype(train_indices.dtype, np.integer)
        or len(np.unique(train_indices)) != len(train_indices)
        or (train_indices.size and not 0 <= train_indices.min() <= train_indices.max()
            < info.num_train)):
      raise ValueError(f"train_indices: must be distinct integers in [0, {info.num_train}), "
                       f"got shape {train_indices.shape}, dtype {train_indices.dtype}")
    train_reader = _Subset(train_reader, train_indices)
    info = dataclasses.replace(info, num_train=train_reader.size)
  if batch_size > info.num_train:
    raise ValueError(f"batch_size: {batch_size} exceeds the {info.num_train} training examples")

  train = TrainData(train_reader, batch_size=batch_size, seed=seed,
                    process_index=process_index, process_count=process_count)
  test_reader = _Reader(test_source, info, in_memory=in_memory, path=f"{name}/{test_split}")
  local_eval = eval_batch_size // process_count
  largest_shard = max(test_reader.size, math.ceil(info.num_test / process_count))
  test = EvalData(test_reader, local_batch_size=local_eval,
                  num_batches=math.ceil(largest_shard / local_eval))
  return Datasets(train, test, info)
