"""A tensorflow-datasets builder for MNIST-1D, generated locally (no download).

MNIST-1D (Greydanus & Kobak, 2020) is a procedurally generated, 1-D analogue of MNIST: 5000
sequences of 40 floats, 10 classes, split 4000 train / 1000 test. This builder calls the
``mnist1d`` package's generator with its default arguments,
``make_dataset(get_dataset_args())`` (seed 42), so the data are exactly the published dataset,
and never uses the package's download path.

The dataset is written in the ``array_record`` file format, which TFDS reads without
TensorFlow through ``builder.as_data_source()``. Importing this module registers the builder
under the name ``"mnist1d"``, so ``tfds.builder("mnist1d", data_dir=...)`` finds it;
:func:`prepare` builds it (about 3 s) if it is not on disk yet.

Where the data go: ``data_dir`` if given, else ``$JAXPRUNE_DATA_DIR`` if set, else TFDS's own
default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``); see :func:`default_data_dir`.

References:
  Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024,
  https://arxiv.org/abs/2011.14439
"""

from __future__ import annotations

import os
import random

import numpy as np
import tensorflow_datasets as tfds

__all__ = ["DATA_DIR_ENV", "Mnist1d", "default_data_dir", "prepare"]

DATA_DIR_ENV = "JAXPRUNE_DATA_DIR"
"""Environment variable that overrides the default data directory of ``train/``."""

_SEQ_LEN = 40
_NUM_CLASSES = 10

_CITATION = """\
@inproceedings{greydanus2024scaling,
  title={Scaling Down Deep Learning with {MNIST}-{1D}},
  author={Greydanus, Sam and Kobak, Dmitry},
  booktitle={International Conference on Machine Learning},
  year={2024}
}
"""


def default_data_dir() -> str:
  """Returns the data directory ``train/`` uses when none is given.

  ``$JAXPRUNE_DATA_DIR`` if set, else TFDS's default (``$TFDS_DATA_DIR`` or
  ``~/tensorflow_datasets``).

  Examples:
    >>> import os
    >>> from train import mnist1d_builder
    >>> isinstance(mnist1d_builder.default_data_dir(), str)
    True
  """
  env = os.environ.get(DATA_DIR_ENV)
  if env:
    return os.path.expanduser(env)
  return os.path.expanduser(tfds.core.constants.get_default_data_dir())


def _generate() -> dict[str, np.ndarray]:
  """Runs mnist1d's generator with its published arguments, leaving global RNGs untouched.

  ``make_dataset`` seeds the global ``random`` and ``np.random`` generators; their previous
  states are restored so building the dataset has no effect on the caller's randomness.
  """
  from mnist1d.data import get_dataset_args, make_dataset  # local: imports matplotlib

  py_state, np_state = random.getstate(), np.random.get_state()
  try:
    args = get_dataset_args()
    if args.final_seq_length != _SEQ_LEN:  # guard against a changed package default
      raise ValueError(f"mnist1d final_seq_length={args.final_seq_length}, expected {_SEQ_LEN}")
    return make_dataset(args)
  finally:
    random.setstate(py_state)
    np.random.set_state(np_state)


class Mnist1d(tfds.core.GeneratorBasedBuilder):
  """MNIST-1D: 40-sample 1-D sequences in 10 classes, 4000 train / 1000 test.

  Features: ``x`` float32 ``(40,)``, ``label`` ``ClassLabel(num_classes=10)``.
  Supervised keys: ``("x", "label")``. Example keys are the row indices in mnist1d's
  split, and reading with ``as_data_source`` returns the rows in that order.

  Examples:
    >>> import tempfile, tensorflow_datasets as tfds
    >>> from train import mnist1d_builder
    >>> builder = mnist1d_builder.prepare(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Downloading and preparing dataset ...
    >>> test = builder.as_data_source("test")
    >>> len(test), test[0]["x"].shape
    (1000, (40,))
  """

  name = "mnist1d"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Generated with mnist1d.data.make_dataset(get_dataset_args())."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "MNIST-1D: procedurally generated 1-D digit sequences (40 samples, 10 classes), "
            "generated locally with the mnist1d package's default arguments (seed 42)."),
        features=tfds.features.FeaturesDict({
            "x": tfds.features.Tensor(shape=(_SEQ_LEN,), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=_NUM_CLASSES),
        }),
        supervised_keys=("x", "label"),
        disable_shuffling=True,  # keep mnist1d's own order (its split is already shuffled)
        homepage="https://github.com/greydanus/mnist1d",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data are generated.
    data = _generate()
    return {
        "train": self._generate_examples(data["x"], data["y"]),
        "test": self._generate_examples(data["x_test"], data["y_test"]),
    }

  def _generate_examples(self, xs: np.ndarray, ys: np.ndarray):
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
      yield i, {"x": np.asarray(x, np.float32), "label": int(y)}


def prepare(data_dir: str | os.PathLike | None = None) -> Mnist1d:
  """Builds MNIST-1D in ``data_dir`` (array_record) unless it is already there.

  Never touches the network: the GCS lookup TFDS does by default is switched off and the data
  are generated by the ``mnist1d`` package.

  Args:
    data_dir: TFDS data directory; ``None`` means :func:`default_data_dir`.

  Returns:
    The prepared builder; read it with ``builder.as_data_source(split)``.

  Examples:
    >>> import tempfile
    >>> from train import mnist1d_builder
    >>> builder = mnist1d_builder.prepare(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Downloading and preparing dataset ...
    >>> builder.info.splits["train"].num_examples
    4000
  """
  data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
  builder = Mnist1d(data_dir=data_dir)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(try_download_gcs=False),
  )
  return builder
