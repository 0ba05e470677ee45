"""train/export.py on real tiny runs: ``python -m train.export --workdir DIR`` writes
``compressed/`` (orbax) and ``export.json``; the checkpoint read back with no target gives the
run's final params bit for bit, and a model rebuilt from it predicts the run's logits."""
import json

import jax
import numpy as np
import pytest
from test_train_recipes import tiny_config

from jaxprune.compress import Compressed
from train import checkpointing, export, input_pipeline, train

pytestmark = pytest.mark.usefixtures("fast_compile")


def _run(tmp_path, data_dir, recipe, name):
  config = tiny_config(recipe, "mlp", num_steps=4)
  config.model_kwargs.mlp.hidden = (256,)
  config.data_dir = data_dir
  workdir = tmp_path / name
  train.train_and_evaluate(config, str(workdir))
  return config, workdir


def _flat(tree):
  from jaxprune import _tree
  paths, leaves, _ = _tree.flatten(tree)
  return dict(zip(paths, leaves, strict=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  tmp = tmp_path_factory.mktemp("export")
  return {recipe: _run(tmp, data_dir, recipe, recipe) for recipe in ("gmp", "nm24")}


def test_cli_exports_a_finished_run(runs, capsys):
  config, workdir = runs["gmp"]
  done = export.main(["--workdir", str(workdir)])
  assert list(done) == [str(workdir)]
  assert "compressed model (compressed/)" in capsys.readouterr().out
  info = json.loads((workdir / "export.json").read_text())
  assert info["round_trip_exact"] is True
  # gmp (0.9 over all kernels): every kernel is stored as its kept values plus a bitmask or
  # the gaps between their indices, whichever is smaller.
  with np.load(workdir / "predictions.npz") as z:
    params = {k[len("params/"):]: z[k] for k in z.files if k.startswith("params/")}
    masks = {k[len("masks/"):]: z[k] for k in z.files if k.startswith("masks/")}
    logits = z["logits"]
  by_path = {r["path"]: r for r in info["leaves"]}
  for path, mask in masks.items():
    row = by_path[path]
    k, meta = int(mask.sum()), 4 * (7 + mask.ndim)
    assert row["kept"] == k
    index_bytes = row["stored_bytes"] - 4 * k - meta
    if row["format"] == "bitmask":
      assert index_bytes == -(-mask.size // 8)             # 1 bit per weight
    else:
      assert row["format"] == "indices" and index_bytes in (k, 2 * k), row  # uint8/16 gaps
      assert index_bytes < mask.size / 8
  assert info["prunable"]["ratio"] < 0.14
  # On disk (orbax adds ~1 kB per array and zstd-compresses both; at this size that overhead is
  # the difference, see test_on_disk_sizes_at_a_realistic_size).
  assert info["compressed_bytes"] == sum(f.stat().st_size for f in
                                         (workdir / "compressed").rglob("*") if f.is_file())
  assert info["ratio_vs_dense_checkpoint"] == pytest.approx(
      info["compressed_bytes"] / info["dense_checkpoint_bytes"])
  assert info["training_checkpoint_bytes"] > info["dense_checkpoint_bytes"]
  assert not [p for p in workdir.iterdir() if p.name.startswith(".export")]

  # The restore recipe: no target, then decompress; the bits are the run's final params.
  tree = checkpointing.load_tree(workdir / "compressed")
  got = _flat(export.jp.decompress(tree["params"]))
  assert set(got) == set(params)
  for path, want in params.items():
    np.testing.assert_array_equal(np.asarray(got[path]).view(np.uint32),
                                  want.view(np.uint32), err_msg=path)

  # A model rebuilt from the compressed checkpoint predicts what the run predicted.
  from flax import nnx
  info_ds = input_pipeline.get_datasets(config.dataset, batch_size=config.batch_size, seed=0,
                                        eval_batch_size=config.eval_batch_size,
                                        data_dir=config.data_dir)
  model = train.build_model(config, info_ds.info)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, export.jp.decompress(tree["params"])))
  nnx.update(model, state)
  model.eval()
  batch = next(iter(info_ds.test))
  x = batch["x"][batch["mask"]]
  np.testing.assert_allclose(np.asarray(model(x)), logits[: len(x)], rtol=1e-5, atol=1e-5)

  # The report gets one "Compressed export" section, replaced when exported again.
  export.main(["--workdir", str(workdir)])
  report = (workdir / "report.md").read_text()
  assert report.count("## Compressed export") == 1 and "dense with zeros (orbax)" in report


def test_n_of_m_run_and_a_directory_of_runs(runs):
  _, workdir = runs["nm24"]
  parent = workdir.parent
  done = export.export_workdir(parent)
  assert set(done) == {str(parent / "gmp"), str(parent / "nm24")}
  info = done[str(workdir)]
  assert info["round_trip_exact"] is True
  formats = {r["format"] for r in info["leaves"] if r["path"].endswith("kernel")}
  assert formats == {"n_of_m"}, info["leaves"]
  # 2:4 along the input axis: half the values plus 2 bits per kept weight (+ the description).
  assert info["prunable"]["ratio"] < 0.56
  tree = checkpointing.load_tree(workdir / "compressed")
  node = tree["params"]["layers"]["0"]["kernel"]
  assert sorted(node) == ["jaxprune_format", "nm_index", "values"]
  assert node["values"].shape == (20, 256)                   # (in=40 -> 20 kept, out=256)
  assert isinstance(export.jp.as_compressed(tree)["params"]["layers"]["0"]["kernel"], Compressed)


def test_export_run_takes_a_module_with_batchnorm_state(tmp_path):
  from flax import nnx
  model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.BatchNorm(16, rngs=nnx.Rngs(1)),
                         nnx.Linear(16, 4, rngs=nnx.Rngs(2)))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  masks = export.jp.topk_mask(export.jp.magnitude_scores(params), 0.75)
  info = export.export_run(tmp_path, model, masks)
  assert info["round_trip_exact"] is True
  tree = checkpointing.load_tree(tmp_path / "compressed")
  assert sorted(tree["rest"]["layers"]["1"]) == ["mean", "var"]
  assert [r["format"] for r in info["leaves"] if r["path"].endswith("kernel")] == ["bitmask"] * 2
  # The runner's call: the pure nnx.State of the params, masks of the same tree, the rest.
  rest = nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))
  again = export.export_run(tmp_path / "state", params, masks, rest=rest)
  assert again["round_trip_exact"] is True and again["leaves"] == info["leaves"]
  assert sorted(checkpointing.load_tree(tmp_path / "state" / "compressed")) == ["params", "rest"]
  with pytest.raises(ValueError, match="masks: paths not in the params"):
    export.export_run(tmp_path, {"w": np.ones((4, 4), np.float32)},
                      {"v": np.ones((4, 4), bool)})
  with pytest.raises(ValueError, match="has no predictions.npz"):
    export.read_run(tmp_path)


def test_on_disk_sizes_at_a_realistic_size(tmp_path):
  # One 1024 x 1024 float32 kernel: orbax's zstd already shrinks the dense-with-zeros
  # checkpoint; the compressed one is smaller still (numbers in benchmarks/sparse_inference).
  w = np.random.default_rng(0).normal(size=(1024, 1024)).astype(np.float32)
  out = {}
  for name, mask in (("90", np.abs(w) > np.quantile(np.abs(w), 0.9)),
                     ("2:4", np.argsort(np.argsort(-np.abs(w).reshape(256, 4, 1024), axis=1),
                                        axis=1).reshape(1024, 1024) < 2)):
    info = export.export_run(tmp_path / name, {"fc": {"kernel": w}}, {"fc/kernel": mask})
    assert info["round_trip_exact"] is True
    out[name] = info
  assert out["2:4"]["leaves"][0]["format"] == "n_of_m"
  assert out["90"]["prunable"]["ratio"] < 0.14 and out["2:4"]["prunable"]["ratio"] < 0.56
  assert out["90"]["ratio_vs_dense_checkpoint"] < 0.85, out["90"]
  assert out["90"]["ratio_vs_dense_npz_gzip"] < 0.9, out["90"]
  assert out["2:4"]["ratio_vs_dense_checkpoint"] < 0.95, out["2:4"]
