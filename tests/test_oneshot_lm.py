"""The byte-level LM recipe: the offline stdlib corpus (TFDS builder), the generic TFDS text
path (mocked), LM windows, and one-shot pruning of a tiny trained LM end to end."""
import json
import os
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import jaxprune as jp
from train import lm, lm_data, oneshot_lm, text_builder
from train.configs import lm as lm_config

pytestmark = pytest.mark.usefixtures("fast_compile")


def test_stdlib_corpus_splits_by_file(tmp_path):
  builder = text_builder.prepare(str(tmp_path))
  info = text_builder.corpus_info()
  files = text_builder.stdlib_files()
  assert info["num_files"] == len(files) and len(info["sha256"]) == 64
  assert builder.builder_config.name.endswith(info["sha256"][:12])
  names = {s: [] for s in text_builder.SPLITS}
  for f in files:
    names[text_builder.split_of(os.path.basename(f))].append(f)
  for split in text_builder.SPLITS:
    assert builder.info.splits[split].num_examples == len(names[split]) == info["files"][split]
  assert all(n > 0 for n in info["files"].values())
  data = lm_data.load_text(data_dir=str(tmp_path))
  expected = b"\n".join(pathlib.Path(f).read_bytes() for f in names["validation"])
  assert data.streams["validation"].tobytes() == expected    # whole files, in sorted order
  assert data.info["corpus"]["sha256"] == info["sha256"]
  assert sum(data.info["bytes"].values()) == sum(info["bytes"].values()) + sum(
      len(v) - 1 for v in names.values())                    # + the joining newlines


def test_generic_tfds_text_path_with_mock_tiny_shakespeare(tmp_path):
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    data = lm_data.load_text("tiny_shakespeare", splits=("train", "validation", "test"),
                             data_dir=str(tmp_path))
  for split in ("train", "validation", "test"):
    assert data.streams[split].dtype == np.uint8 and data.streams[split].size > 0
  with pytest.raises(ValueError, match="text_key"):
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
      lm_data.load_text("tiny_shakespeare", text_key="body", data_dir=str(tmp_path))


def test_windows_are_deterministic():
  s = np.frombuffer(bytes(range(256)) * 8, np.uint8)
  a = lm_data.train_batch(s, 5, batch_size=4, context=16, seed=1)
  b = lm_data.train_batch(s, 5, batch_size=4, context=16, seed=1)
  c = lm_data.train_batch(s, 6, batch_size=4, context=16, seed=1)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert not np.array_equal(a["tokens"], c["tokens"])
  np.testing.assert_array_equal(a["tokens"][:, 1:], a["targets"][:, :-1])
  w = lm_data.eval_windows(s, 15)
  assert w.shape == (len(s) // 16, 16) and (np.diff(w[:, 0]) % 256 == 16).all()
  with pytest.raises(ValueError, match="context"):
    lm_data.train_batch(s[:10], 0, batch_size=1, context=16, seed=0)


def _tiny_config(tmp_path):
  c = lm_config.get_config()
  c.model.update(dict(context=16, dim=16, depth=2, num_heads=2, mlp_ratio=1))
  c.num_steps, c.batch_size, c.log_every, c.eval_every, c.checkpoint_every = 20, 8, 10, 10, 10
  c.eval_windows, c.eval_batch_size = 16, 8
  c.data_dir = str(tmp_path / "data")
  o = c.oneshot
  o.calibration_samples, o.calibration_batch, o.sparsities = 16, 8, ("0.6", "2:4")
  c.recovery.steps, c.recovery.targets = 2, ("sparsegpt@2:4",)
  return c


@pytest.mark.slow
def test_oneshot_lm_end_to_end(tmp_path, monkeypatch):
  c = _tiny_config(tmp_path)
  monkeypatch.chdir(tmp_path)
  workdir = "run"                                            # relative: orbax needs absolute
  oneshot_lm.run(c, workdir, log=lambda *a: None)   # trains the dense LM first
  with open(os.path.join(workdir, "lm_train.json")) as f:
    train = json.load(f)
  assert train["steps"] == 20 and train["dataset"]["corpus"]["sha256"]
  with open(os.path.join(workdir, "oneshot_lm.json")) as f:
    doc = json.load(f)
  assert len(doc["rows"]) == 6 and doc["dense"]["bits_per_byte"] < 8.0
  by = {(r["method"], r["sparsity"]): r for r in doc["rows"]}
  # Block kernels: 12 of 16x16 (one shape: one compiled SparseGPT program per structure).
  sizes = [(16, 16)] * 12
  total = sum(a * b for a, b in sizes)
  exact = sum(round(0.6 * a * b) for a, b in sizes) / total
  per_output = sum(round(0.6 * a) * b for a, b in sizes) / total
  for method, expected in (("magnitude", exact), ("sparsegpt", exact), ("wanda", per_output)):
    assert by[(method, "0.6")]["measured_sparsity"] == pytest.approx(expected, abs=1e-7)
    assert by[(method, "2:4")]["measured_sparsity"] == 0.5
  for r in doc["rows"]:
    assert np.isfinite(r["bits_per_byte"]) and r["perplexity"] == pytest.approx(
        2 ** r["bits_per_byte"], rel=1e-6)
  assert [(r["target"], r["loss"]) for r in doc["recovery"]] == [
      ("sparsegpt@2:4", "ce"), ("sparsegpt@2:4", "kd")]
  for r in doc["recovery"]:
    assert r["sparsity_kept"] == 0.5           # the masks were held through the fine-tune
  assert "| sparsegpt | 2:4 |" in pathlib.Path(workdir, "oneshot_lm.md").read_text()
  # the restored checkpoint is the trained model: same validation figure
  graphdef, params = lm.restore(c, workdir)
  data = lm.load_data(c)
  w = lm_data.eval_windows(data.streams["validation"], 16, 16)
  assert lm.evaluate(graphdef, params, w, 8)["nll"] == pytest.approx(doc["dense"]["nll"])
  pruned, masks, _ = oneshot_lm.prune_lm(c, graphdef, params, oneshot_lm.calibration_batches(
      c, data), "wanda", "2:4")
  assert float(jp.sparsity(masks, where=oneshot_lm.block_kernels)) == 0.5
  assert jax.tree.structure(masks) == jax.tree.structure(params)
