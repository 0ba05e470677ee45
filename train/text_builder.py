"""A tensorflow-datasets builder for an offline text corpus: the Python standard library's own
top-level ``*.py`` files of the running interpreter (no download; exists on every machine).

The corpus is ``sorted(glob(<stdlib>/*.py))`` of ``sysconfig.get_paths()["stdlib"]`` (168 files,
4.70 MB for CPython 3.11.7). Files are assigned to splits by their name alone —
``sha256(file name) mod 10``: 0 → ``validation``, 1 → ``calibration``, else ``train`` (for 3.11.7:
130 / 21 / 17 files, 3.76 MB / 583 kB / 355 kB) — so a file never spans two splits and the
assignment of a file does not depend on which other files exist. One example per file:
``{"name": file name, "text": its bytes}``.

Different interpreters have different files: the builder config is named after the Python
version and a hash of every file's name and bytes (``py3.11_<sha256[:12]>``), so each corpus is
built into its own directory and :func:`corpus_info` gives the hash to record in a run.

The dataset is written in the ``array_record`` format and read without TensorFlow through
``builder.as_data_source()``. Importing this module registers the builder as
``"python_stdlib"``; :func:`prepare` builds it (about 2 s) unless it is on disk.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os
import sys
import sysconfig

import numpy as np
import tensorflow_datasets as tfds

from train.mnist1d_builder import default_data_dir

__all__ = ["PythonStdlib", "corpus_info", "prepare", "split_of", "stdlib_files"]

SPLITS = ("train", "validation", "calibration")


def stdlib_files(stdlib_dir: str | None = None) -> list[str]:
  """The corpus: the sorted top-level ``*.py`` files of the interpreter's standard library.

  Examples:
    >>> from train import text_builder
    >>> files = text_builder.stdlib_files()
    >>> len(files) > 100 and files == sorted(files) and all(f.endswith(".py") for f in files)
    True
  """
  d = stdlib_dir or sysconfig.get_paths()["stdlib"]
  return sorted(glob.glob(os.path.join(d, "*.py")))


def split_of(name: str) -> str:
  """The split of a file, from its base name only: ``sha256(name) mod 10`` is 0 for
  ``validation``, 1 for ``calibration``, anything else for ``train``.

  Examples:
    >>> from train import text_builder
    >>> [text_builder.split_of(n) for n in ("ast.py", "bisect.py", "os.py")]
    ['validation', 'calibration', 'train']
  """
  r = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10
  return "validation" if r == 0 else "calibration" if r == 1 else "train"


@functools.lru_cache(maxsize=4)
def corpus_info(stdlib_dir: str | None = None) -> dict:
  """What a run records about the corpus: its directory, file count, bytes per split, and
  the sha256 over every ``(name, bytes)`` in order (the dataset version).

  Examples:
    >>> from train import text_builder
    >>> info = text_builder.corpus_info()
    >>> sorted(info["bytes"]) == ["calibration", "train", "validation"], len(info["sha256"])
    (True, 64)
  """
  files = stdlib_files(stdlib_dir)
  digest = hashlib.sha256()
  sizes = dict.fromkeys(SPLITS, 0)
  counts = dict.fromkeys(SPLITS, 0)
  for path in files:
    name = os.path.basename(path)
    with open(path, "rb") as f:
      data = f.read()
    digest.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    sizes[split_of(name)] += len(data)
    counts[split_of(name)] += 1
  return {"dir": os.path.dirname(files[0]) if files else stdlib_dir,
          "python": ".".join(map(str, sys.version_info[:3])), "num_files": len(files),
          "files": counts, "bytes": sizes, "sha256": digest.hexdigest()}


def _config_name() -> str:
  return f"py{sys.version_info[0]}.{sys.version_info[1]}_{corpus_info()['sha256'][:12]}"


@dataclasses.dataclass
class StdlibConfig(tfds.core.BuilderConfig):
  """One interpreter's corpus (the config name carries its hash)."""
  stdlib_dir: str | None = None


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
  """The running interpreter's standard-library ``*.py`` files, split by file name.

  Features: ``name`` (the file name) and ``text`` (its bytes, ``tfds.features.Text``).

  Examples:
    >>> import tempfile
    >>> from train import text_builder
    >>> builder = text_builder.prepare(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Downloading and preparing dataset ...
    >>> val = builder.as_data_source("validation")
    >>> len(val) == text_builder.corpus_info()["files"]["validation"]
    True
    >>> names = [val[i]["name"] for i in range(len(val))]
    >>> names == sorted(names) and b"ast.py" in names
    True
  """

  name = "python_stdlib"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Top-level stdlib *.py files, split by sha256(name) mod 10."}
  BUILDER_CONFIGS = [StdlibConfig(name=_config_name(), description=(
      "Python standard library of the interpreter that built this dataset."))]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("The top-level *.py files of the Python standard library of the "
                     "interpreter, one example per file, split by file name."),
        features=tfds.features.FeaturesDict({"name": tfds.features.Text(),
                                             "text": tfds.features.Text()}),
        disable_shuffling=True,  # sorted by file name within each split
        homepage="https://docs.python.org/3/library/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    files = stdlib_files(self.builder_config.stdlib_dir)
    return {split: self._generate_examples([f for f in files
                                            if split_of(os.path.basename(f)) == split])
            for split in SPLITS}

  def _generate_examples(self, files):
    for path in files:
      name = os.path.basename(path)
      with open(path, "rb") as f:
        yield name, {"name": name, "text": f.read()}


def prepare(data_dir: str | os.PathLike | None = None) -> PythonStdlib:
  """Builds the corpus in ``data_dir`` (array_record) unless it is already there; never uses
  the network.

  Args:
    data_dir: TFDS data directory; ``None`` means
      :func:`train.mnist1d_builder.default_data_dir`.

  Returns:
    The prepared builder.

  Examples:
    >>> import tempfile
    >>> from train import text_builder
    >>> b = text_builder.prepare(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Downloading and preparing dataset ...
    >>> b.info.splits["validation"].num_examples == text_builder.corpus_info()["files"][
    ...     "validation"]
    True
  """
  data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
  builder = PythonStdlib(data_dir=data_dir)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def as_bytes(value) -> bytes:
  """A decoded ``Text`` feature (``bytes``, ``str`` or a numpy scalar) as bytes."""
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.encode() if isinstance(value, str) else bytes(value)
