"""Byte-level language-model data from any TFDS text dataset: one byte stream per split,
random training windows that are a pure function of ``(seed, step)``, and fixed evaluation and
calibration windows.

``"python_stdlib"`` (:mod:`train.text_builder`, the offline default) has the splits ``train``,
``validation`` and ``calibration``; any TFDS text dataset with a text feature (e.g.
``tiny_shakespeare``: ``train``/``validation``/``test``, ``lm1b``: ``train``/``test``) goes
through the same path where it can be downloaded, with the split names given in the config.
Each split's examples are joined, in their order, with a newline into one ``uint8`` stream;
tokens are the bytes (vocabulary 256), so bits per token are bits per byte.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from train import text_builder
from train.mnist1d_builder import default_data_dir

__all__ = ["TextData", "calibration_windows", "eval_windows", "load_text", "train_batch"]


@dataclasses.dataclass(frozen=True)
class TextData:
  """The byte streams of a text dataset's splits, and what a run records about them.

  Attributes:
    streams: ``{split: uint8 array}``.
    info: name, config (the corpus hash for ``python_stdlib``), version, bytes per split.
  """
  streams: dict
  info: dict


def load_text(name: str = "python_stdlib", *, splits=("train", "validation", "calibration"),
              text_key: str = "text", data_dir: str | os.PathLike | None = None) -> TextData:
  """Prepares a TFDS text dataset (array_record, no GCS) and returns each split as bytes.

  Args:
    name: TFDS name; ``"python_stdlib"`` is built locally from the interpreter's files.
    splits: the splits to read (TFDS slicing syntax allowed, e.g. ``"train[:1%]"``).
    text_key: the text feature.
    data_dir: TFDS data directory (default: ``$JAXPRUNE_DATA_DIR`` or TFDS's default).

  Returns:
    A :class:`TextData`.

  Examples:
    >>> import tempfile
    >>> from train import lm_data
    >>> data = lm_data.load_text(data_dir=tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Downloading and preparing dataset ...
    >>> data.streams["validation"].dtype, data.info["bytes"]["validation"] > 100_000
    (dtype('uint8'), True)
  """
  data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
  if name == "python_stdlib":
    builder = text_builder.prepare(data_dir)
  else:
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  features = builder.info.features
  if text_key not in features:
    raise ValueError(f"text_key: dataset {name!r} has no feature {text_key!r} "
                     f"(features: {list(features)})")
  streams = {}
  for split in splits:
    source = builder.as_data_source(split)
    parts = [text_builder.as_bytes(source[i][text_key]) for i in range(len(source))]
    if not parts:
      raise ValueError(f"splits: {name}/{split} is empty")
    streams[split] = np.frombuffer(b"\n".join(parts), np.uint8)
  info = {"name": name, "config": builder.builder_config.name if builder.builder_config else None,
          "version": str(builder.version), "bytes": {s: int(v.size) for s, v in streams.items()}}
  if name == "python_stdlib":
    info["corpus"] = text_builder.corpus_info()
  return TextData(streams, info)


def _check(stream: np.ndarray, context: int, what: str) -> None:
  if stream.size < context + 2:
    raise ValueError(f"{what}: the stream has {stream.size} bytes, fewer than context + 2 = "
                     f"{context + 2}")


def train_batch(stream: np.ndarray, step: int, *, batch_size: int, context: int,
                seed: int) -> dict[str, np.ndarray]:
  """The training batch of ``step``: ``batch_size`` random windows of ``context + 1`` bytes,
  their starts drawn from ``np.random.default_rng([seed, step])``, so a resumed run sees the
  same batches. Returns ``{"tokens": int32 (B, T), "targets": int32 (B, T)}`` (targets are the
  tokens shifted by one).

  Examples:
    >>> import numpy as np
    >>> from train import lm_data
    >>> s = np.arange(100, dtype=np.uint8)
    >>> b = lm_data.train_batch(s, 3, batch_size=2, context=4, seed=0)
    >>> b["tokens"].shape, bool((b["targets"] == b["tokens"] + 1).all())
    ((2, 4), True)
  """
  _check(stream, context, "train_batch")
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, stream.size - context - 1, batch_size)
  w = stream[starts[:, None] + np.arange(context + 1)[None, :]].astype(np.int32)
  return {"tokens": w[:, :-1], "targets": w[:, 1:]}


def eval_windows(stream: np.ndarray, context: int, num: int | None = None) -> np.ndarray:
  """Non-overlapping windows of ``context + 1`` bytes covering the stream (``num=None``), or
  ``num`` of them evenly spaced over it; int32 ``(n, context + 1)``.

  Examples:
    >>> import numpy as np
    >>> from train import lm_data
    >>> lm_data.eval_windows(np.arange(20, dtype=np.uint8), 4).tolist()
    [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    >>> lm_data.eval_windows(np.arange(20, dtype=np.uint8), 4, num=2)[:, 0].tolist()
    [0, 15]
  """
  _check(stream, context, "eval_windows")
  total = stream.size // (context + 1)
  if num is None or num >= total:
    starts = np.arange(total) * (context + 1)
  else:
    starts = np.linspace(0, (total - 1) * (context + 1), num).astype(np.int64)
  return stream[starts[:, None] + np.arange(context + 1)[None, :]].astype(np.int32)


def calibration_windows(stream: np.ndarray, context: int, num: int, *,
                        seed: int = 0) -> np.ndarray:
  """``num`` random windows of ``context`` bytes (the papers' calibration samples: random
  segments of the calibration text), int32 ``(num, context)``.

  Examples:
    >>> import numpy as np
    >>> from train import lm_data
    >>> lm_data.calibration_windows(np.arange(50, dtype=np.uint8), 8, 3).shape
    (3, 8)
  """
  _check(stream, context, "calibration_windows")
  starts = np.random.default_rng([seed, 2**31 - 1]).integers(0, stream.size - context, num)
  return stream[starts[:, None] + np.arange(context)[None, :]].astype(np.int32)
