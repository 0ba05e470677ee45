"""Tests for train/mnist1d_builder.py and train/input_pipeline.py.

MNIST-1D is built once per test session into a temporary data_dir (about 3 s). The generic
TFDS path is exercised on ``mnist`` through ``tfds.testing.mock_data(policy=USE_CODE)``, which
needs neither the dataset files nor the network.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from train import input_pipeline, mnist1d_builder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reference():
  from mnist1d.data import get_dataset_args, make_dataset
  state = np.random.get_state()
  try:
    return make_dataset(get_dataset_args())
  finally:
    np.random.set_state(state)


def _get(data_dir, **kw):
  kw.setdefault("batch_size", 32)
  kw.setdefault("seed", 0)
  return input_pipeline.get_datasets("mnist1d", data_dir=data_dir, **kw)


# --- the MNIST-1D builder ---------------------------------------------------------------------

def test_builder_splits_shapes_and_labels(data_dir):
  builder = tfds.builder("mnist1d", data_dir=data_dir)
  assert builder.info.splits["train"].num_examples == 4000
  assert builder.info.splits["test"].num_examples == 1000
  assert builder.info.features["label"].num_classes == 10
  assert str(builder.info.version) == "1.0.0"
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  for split, n in (("train", 4000), ("test", 1000)):
    source = builder.as_data_source(split)
    assert len(source) == n
    ex = source[0]
    assert ex["x"].shape == (40,) and ex["x"].dtype == np.float32
    labels = np.array([source[i]["label"] for i in range(n)])
    assert labels.min() == 0 and labels.max() == 9
    assert set(np.unique(labels)) == set(range(10))


def test_builder_reproduces_mnist1d_exactly(data_dir, reference):
  builder = tfds.builder("mnist1d", data_dir=data_dir)
  for split, key in (("train", ""), ("test", "_test")):
    source = builder.as_data_source(split)
    x = np.stack([source[i]["x"] for i in range(len(source))])
    y = np.array([source[i]["label"] for i in range(len(source))])
    np.testing.assert_array_equal(x, reference["x" + key].astype(np.float32))
    np.testing.assert_array_equal(y, reference["y" + key])


def test_builder_needs_neither_tensorflow_nor_network(tmp_path):
  # A fresh interpreter without tensorflow (not installed here) where every connection raises.
  code = f"""
    import importlib.util, socket, sys
    assert importlib.util.find_spec("tensorflow") is None, "tensorflow must not be installed"
    def _no_network(*a, **k):
      raise OSError("network disabled in this test")
    socket.socket.connect = _no_network
    socket.create_connection = _no_network
    socket.getaddrinfo = _no_network
    import numpy as np
    from train import mnist1d_builder
    np.random.seed(123); before = np.random.get_state()[1].copy()
    builder = mnist1d_builder.prepare({str(tmp_path)!r})
    assert np.array_equal(np.random.get_state()[1], before), "global RNG changed"
    test = builder.as_data_source("test")
    assert len(test) == 1000 and test[999]["x"].shape == (40,)
    assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
    print("OK")
  """
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().endswith("OK")


def test_default_data_dir_env_override(monkeypatch, tmp_path):
  monkeypatch.setenv(mnist1d_builder.DATA_DIR_ENV, str(tmp_path))
  assert mnist1d_builder.default_data_dir() == str(tmp_path)
  monkeypatch.delenv(mnist1d_builder.DATA_DIR_ENV)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  assert mnist1d_builder.default_data_dir() == str(tmp_path / "tfds")


# --- the input pipeline -----------------------------------------------------------------------

def test_metadata_and_batch_format(data_dir):
  train, test, info = _get(data_dir, batch_size=128)
  assert info == input_pipeline.Metadata(
      name="mnist1d", input_shape=(40,), num_classes=10, num_train=4000, num_test=1000,
      input_key="x", label_key="label")
  assert train.steps_per_epoch == 4000 // 128 == 31
  b = train.batch(0)
  assert set(b) == {"x", "label"}
  assert b["x"].shape == (128, 40) and b["x"].dtype == np.float32
  assert b["label"].shape == (128,) and b["label"].dtype == np.int32
  assert test.num_batches == len(test) == 8  # ceil(1000 / 128)


def test_train_batches_match_the_train_split(data_dir, reference):
  train, _, _ = _get(data_dir)
  idx = train.indices(7)
  b = train.batch(7)
  np.testing.assert_array_equal(b["x"], reference["x"][idx].astype(np.float32))
  np.testing.assert_array_equal(b["label"], reference["y"][idx])


def test_batch_is_pure_function_of_seed_and_step(data_dir):
  a, _, _ = _get(data_dir, seed=3)
  b, _, _ = _get(data_dir, seed=3)
  c, _, _ = _get(data_dir, seed=4)
  for step in (0, 1, 124, 125, 126, 1000):  # 125 = first step of epoch 1 at batch 32
    np.testing.assert_array_equal(a.batch(step)["x"], b.batch(step)["x"])
    np.testing.assert_array_equal(a.indices(step), b.indices(step))
    assert not np.array_equal(a.indices(step), c.indices(step))
  # Order of access does not matter (no hidden iterator state).
  late_first = b.batch(1000)["label"]
  np.testing.assert_array_equal(late_first, a.batch(1000)["label"])


def test_resume_sees_the_same_batches(data_dir):
  train, _, _ = _get(data_dir, seed=7)
  uninterrupted = train.iterator()
  seen = [next(uninterrupted) for _ in range(140)]  # crosses the epoch boundary at 125
  resumed_train, _, _ = _get(data_dir, seed=7)  # a new process after restoring step 100
  resumed = resumed_train.iterator(start_step=100)
  for step in range(100, 140):
    b = next(resumed)
    np.testing.assert_array_equal(b["x"], seen[step]["x"])
    np.testing.assert_array_equal(b["label"], seen[step]["label"])


def test_epochs_are_permutations_without_repeats(data_dir):
  train, _, _ = _get(data_dir, batch_size=96)
  spe = train.steps_per_epoch
  assert spe == 4000 // 96 == 41
  epoch0 = np.concatenate([train.indices(t) for t in range(spe)])
  epoch1 = np.concatenate([train.indices(t) for t in range(spe, 2 * spe)])
  for e in (epoch0, epoch1):
    assert len(e) == spe * 96 == len(np.unique(e))  # drop remainder: 4000 - 3936 = 64 dropped
    assert e.min() >= 0 and e.max() < 4000
  assert not np.array_equal(epoch0, epoch1)


def test_eval_covers_test_split_once_in_order(data_dir, reference):
  _, test, _ = _get(data_dir, eval_batch_size=300)
  batches = list(test)
  assert len(batches) == 4
  assert all(b["x"].shape == (300, 40) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 1000 and mask[:1000].all() and not mask[1000:].any()
  x = np.concatenate([b["x"] for b in batches])[mask]
  y = np.concatenate([b["label"] for b in batches])[mask]
  np.testing.assert_array_equal(x, reference["x_test"].astype(np.float32))
  np.testing.assert_array_equal(y, reference["y_test"])
  assert (np.concatenate([b["x"] for b in batches])[~mask] == 0).all()
  second_pass = list(test)
  np.testing.assert_array_equal(second_pass[3]["x"], batches[3]["x"])


def test_in_memory_and_streaming_give_identical_batches(data_dir):
  a, ta, _ = _get(data_dir, seed=1)
  b, tb, _ = _get(data_dir, seed=1, in_memory=False)
  for step in (0, 200):
    np.testing.assert_array_equal(a.batch(step)["x"], b.batch(step)["x"])
  np.testing.assert_array_equal(next(iter(ta))["x"], next(iter(tb))["x"])


@pytest.mark.parametrize("count", [2, 4])
def test_per_process_split(data_dir, count):
  whole, whole_test, _ = _get(data_dir, batch_size=64, eval_batch_size=128, seed=5)
  parts = [_get(data_dir, batch_size=64, eval_batch_size=128, seed=5, process_index=p,
                process_count=count) for p in range(count)]
  for train, _, _ in parts:
    assert train.local_batch_size == 64 // count and train.batch_size == 64
    assert train.batch(3)["x"].shape == (64 // count, 40)
  for step in (0, 62, 63):  # 62 is the last step of epoch 0
    joined = np.concatenate([train.batch(step)["x"] for train, _, _ in parts])
    np.testing.assert_array_equal(joined, whole.batch(step)["x"])
  # Test split: disjoint contiguous shards of 1000 / count examples, same batch count everywhere.
  sizes = [test.num_examples for _, test, _ in parts]
  assert sizes == [1000 // count] * count
  assert len({test.num_batches for _, test, _ in parts}) == 1
  real = np.concatenate([np.concatenate([b["x"][b["mask"]] for b in test])
                         for _, test, _ in parts])
  expected = np.concatenate([b["x"][b["mask"]] for b in whole_test])
  np.testing.assert_array_equal(real, expected)


def test_uneven_test_shards_have_equal_batch_counts(data_dir):
  parts = [_get(data_dir, batch_size=96, seed=0, process_index=p, process_count=3)[1]
           for p in range(3)]
  assert [t.num_examples for t in parts] == [334, 333, 333]
  assert [t.num_batches for t in parts] == [11, 11, 11]  # ceil(334 / 32)
  assert sum(int(b["mask"].sum()) for t in parts for b in t) == 1000


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=30, process_count=4, process_index=0), "batch_size"),
    (dict(batch_size=0), "batch_size"),
    (dict(eval_batch_size=7, process_count=2, process_index=1), "eval_batch_size"),
    (dict(seed=-1), "seed"),
    (dict(process_index=2, process_count=2), "process_index"),
    (dict(batch_size=5000), "batch_size"),
])
def test_bad_arguments_raise(data_dir, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _get(data_dir, **kwargs)


def test_bad_step_raises(data_dir):
  train, _, _ = _get(data_dir)
  with pytest.raises(ValueError, match="step"):
    train.batch(-1)
  with pytest.raises(ValueError, match="start_step"):
    next(train.iterator(start_step=-2))


# --- the generic TFDS path, mocked ------------------------------------------------------------

def test_generic_tfds_path_with_mock_mnist(tmp_path):
  # USE_CODE builds the DatasetInfo from the builder class and generates random examples: no
  # metadata files and no network (checked by running this file under `unshare -n`).
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    train, test, info = input_pipeline.get_datasets(
        "mnist", batch_size=4, eval_batch_size=4, seed=0, data_dir=str(tmp_path))
    b = train.batch(0)
    evals = list(test)
  assert info.input_shape == (28, 28, 1) and info.num_classes == 10
  assert info.num_train == 8 and (info.input_key, info.label_key) == ("image", "label")
  assert train.steps_per_epoch == 2
  assert b["x"].shape == (4, 28, 28, 1) and b["x"].dtype == np.float32
  assert 0.0 <= b["x"].min() and b["x"].max() <= 1.0 and b["x"].max() > 0.5  # uint8 / 255
  assert b["label"].dtype == np.int32 and ((0 <= b["label"]) & (b["label"] < 10)).all()
  assert len(evals) == 2 and all(e["mask"].all() for e in evals)


def test_mock_mnist_batch_trains_a_model(tmp_path):
  import optax
  from flax import nnx

  from train import models

  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    train, _, info = input_pipeline.get_datasets(
        "mnist", batch_size=8, seed=0, data_dir=str(tmp_path))
    batch = train.batch(0)
  model = models.create_model("mlp", input_shape=info.input_shape,
                              num_classes=info.num_classes, rngs=nnx.Rngs(0), hidden=(32,))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt, batch["x"], batch["label"])) for _ in range(5)]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
