"""The mitigation as a recipe option of the main loop, and ``train.analyze`` on its runs.

* ``config.imbalance`` trains on exactly the subsample :func:`unbalanced_indices` picks;
* a constrained step of :class:`train.train.Trainer` follows the dual rule exactly, and is the
  same on 8 host devices as on one;
* ``train/configs/mitigation.py`` end to end (tiny MLP): the ``mitigate`` phase keeps the masks
  and the pruned weights at exactly 0, the control arm starts from the identical pruned model,
  a run killed inside the phase resumes to identical parameters and multipliers, and
  ``python -m train.analyze`` reports dense / before / control / after;
* bad values raise errors naming the key.
"""

import importlib
import json
import os
import shutil

import numpy as np
import optax
import pytest
from conftest import run_with_devices
from flax import nnx

from train import analyze, fairness, input_pipeline, models, train

pytestmark = pytest.mark.usefixtures("fast_compile")


def _npz(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


# --- unbalanced training split ------------------------------------------------------------------

def test_imbalance_trains_on_exactly_the_chosen_subsample(data_dir):
  config = importlib.import_module("train.configs.mitigation").get_config()
  full = input_pipeline.get_datasets("mnist1d", batch_size=100, seed=0, data_dir=data_dir)
  labels = np.concatenate([full.train.batch(t)["label"] for t in range(40)])
  counts = np.bincount(labels, minlength=10)
  ds = input_pipeline.get_datasets("mnist1d", batch_size=100, seed=3, data_dir=data_dir,
                                   train_indices=train.train_subset(config))
  expected = [round(0.1 * c) if k < 3 else int(c) for k, c in enumerate(counts)]
  assert ds.info.num_train == sum(expected)
  # One epoch of batches visits each kept example once (the remainder of the epoch dropped).
  seen = np.concatenate([ds.train.batch(t)["label"] for t in range(ds.train.steps_per_epoch)])
  tail = ds.info.num_train - len(seen)
  assert 0 <= tail < 100
  got = np.bincount(seen, minlength=10)
  assert np.all(got <= expected) and sum(expected) - got.sum() == tail
  # The same rows as unbalanced_indices picks, for any training seed.
  idx = input_pipeline.unbalanced_indices(labels, (0, 1, 2), 0.1, seed=0)
  assert train.train_subset(config)(labels).tolist() == idx.tolist()
  config.imbalance.classes = ()
  assert train.train_subset(config) is None

  for bad in ([0, 0, 1], [-1], [4000], np.ones((2, 2), int)):
    with pytest.raises(ValueError, match="train_indices"):
      input_pipeline.get_datasets("mnist1d", batch_size=1, seed=0, data_dir=data_dir,
                                  train_indices=bad)


# --- the constrained step ------------------------------------------------------------------------

def test_constrained_step_follows_the_dual_rule():
  model = models.create_model("mlp", input_shape=(40,), num_classes=4, rngs=nnx.Rngs(0),
                              hidden=(16,))
  mitigation = fairness.Mitigation(epsilon=0.01, dual_lr=0.5)
  trainer = train.Trainer(model, optax.sgd(0.1), mesh=train.make_mesh(), mitigation=mitigation,
                          num_classes=4)
  rng = np.random.default_rng(0)
  lam = np.zeros(4, np.float32)
  for _ in range(3):
    batch = {"x": rng.normal(size=(16, 40)).astype(np.float32),
             "label": rng.integers(0, 4, 16).astype(np.int32)}
    logits = trainer.model()(batch["x"])  # MLP: no dropout or batch statistics
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    group_mean = np.array([per_example[batch["label"] == g].mean() for g in range(4)])
    violation = group_mean - float(per_example.mean()) - 0.01
    metrics = trainer.train_step(batch)
    expected = np.maximum(lam + 0.5 * violation, 0)
    np.testing.assert_allclose(trainer.state["multipliers"], expected, atol=1e-5)
    assert float(metrics["max_multiplier"]) == pytest.approx(lam.max(), abs=1e-6)
    assert float(metrics["max_violation"]) == pytest.approx(violation.max(), abs=1e-5)
    lam = np.asarray(trainer.state["multipliers"])
  assert (lam > 0).sum() >= 1 and (lam == 0).sum() >= 1


def test_constrained_step_is_the_same_on_8_devices():
  out = run_with_devices("""
      import jax, json, numpy as np, optax
      from flax import nnx
      from train import fairness, models, train
      rng = np.random.default_rng(0)
      batches = [{"x": rng.normal(size=(16, 40)).astype(np.float32),
                  "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(3)]
      out = {}
      for n in (8, 1):
        model = models.create_model("mlp", input_shape=(40,), num_classes=10,
                                    rngs=nnx.Rngs(0), hidden=(16,))
        t = train.Trainer(model, optax.adam(1e-2), mesh=train.make_mesh(jax.devices()[:n]),
                          mitigation=fairness.Mitigation(0.0, 0.3), num_classes=10)
        for b in batches:
          t.train_step(b)
        assert len(t.state["multipliers"].sharding.device_set) == n
        out[n] = ([np.asarray(x) for x in jax.tree.leaves(t.state["model"])],
                  np.asarray(t.state["multipliers"]))
      print(json.dumps({
          "params": max(float(np.max(np.abs(a - b))) for a, b in zip(out[8][0], out[1][0])),
          "lam": float(np.max(np.abs(out[8][1] - out[1][1]))),
          "lam_max": float(out[1][1].max())}))
      """)
  diff = json.loads(out.strip().splitlines()[-1])
  assert diff["params"] < 1e-6 and diff["lam"] < 1e-6 and diff["lam_max"] > 0


# --- the recipe end to end ------------------------------------------------------------------------

def _config(data_dir, seed=0, **overrides):
  config = importlib.import_module("train.configs.mitigation").get_config()
  config.model, config.model_kwargs.mlp.hidden = "mlp", (32,)
  config.num_steps, config.batch_size = 200, 64
  config.pruning.update_every = 10  # begin/end steps follow num_steps: 20 and 130
  config.mitigation.steps = 60
  config.mitigation.epsilon = 0.0  # every class above the mean loss is a violation
  config.checkpoint_every, config.keep_checkpoints, config.eval_every = 20, 20, 100
  config.progress, config.data_dir, config.seed = False, data_dir, seed
  for key, value in overrides.items():
    section, field = key.split("__")
    config[section][field] = value
  return config


def test_mitigation_recipe_end_to_end(tmp_path, data_dir):
  mit, ctl, dense = tmp_path / "runs" / "mit", tmp_path / "runs" / "ctl", tmp_path / "runs" / "d"
  final = train.train_and_evaluate(_config(data_dir), str(mit))
  assert final["step"] == 260 and final["sparsity"] == pytest.approx(0.9, abs=1e-6)
  before, after = _npz(mit / "predictions_before_mitigation.npz"), _npz(mit / "predictions.npz")

  # The phase keeps the masks and the pruned weights at exactly 0; the weights did change.
  masks = sorted(k for k in after if k.startswith("masks/"))
  assert masks == sorted(k for k in before if k.startswith("masks/")) and masks
  kept = pruned = 0
  for k in masks:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    w_after, w_before = after["params/" + k[6:]], before["params/" + k[6:]]
    assert np.all(w_after[~after[k]] == 0) and np.all(w_before[~before[k]] == 0), k
    assert not np.array_equal(w_after, w_before), k
    kept, pruned = kept + int(after[k].sum()), pruned + int((~after[k]).sum())
  assert pruned == round(0.9 * (kept + pruned))
  lam = after["multipliers"]
  assert lam.shape == (10,) and np.all(lam >= 0) and lam.max() > 0
  assert "multipliers" not in before
  assert after["label"].tolist() == before["label"].tolist() and after["logits"].shape == (1000, 10)
  report = (mit / "report.md").read_text()
  assert "| pruned (before) |" in report and "| gmp+mitigation (after) |" in report
  assert "accuracy of classes 0,1,2" in report

  # The control arm: the identical pruned model, then plain cross-entropy, no multipliers.
  train.train_and_evaluate(_config(data_dir, mitigation__constrained=False), str(ctl))
  c_before, c_after = _npz(ctl / "predictions_before_mitigation.npz"), _npz(ctl / "predictions.npz")
  for k in before:
    np.testing.assert_array_equal(c_before[k], before[k], err_msg=k)
  assert "multipliers" not in c_after
  assert not np.array_equal(c_after["logits"], after["logits"])

  # Killed inside the mitigate phase (after step 240): resumes to the identical end.
  shutil.rmtree(mit / "checkpoints_mitigate" / "260")
  os.remove(mit / "predictions.npz")
  train.train_and_evaluate(_config(data_dir), str(mit))
  resumed = _npz(mit / "predictions.npz")
  for k in after:
    np.testing.assert_array_equal(resumed[k], after[k], err_msg=k)

  # Dense reference of the same seed, then the analysis of all three.
  train.train_and_evaluate(_config(data_dir, pruning__method="dense",
                                   mitigation__enabled=False), str(dense))
  assert not (dense / "predictions_before_mitigation.npz").exists()
  path = analyze.main(["--workdir", str(tmp_path / "runs")])
  with open(path) as f:
    text = f.read()
  wd = analyze.load_workdir(tmp_path / "runs")
  assert sorted((r.method, r.sparsity, r.seed) for r in wd.runs) == [
      ("dense", 0.0, 0), ("gmp", 0.9, 0), ("gmp+finetune", 0.9, 0), ("gmp+mitigation", 0.9, 0)]
  assert wd.minority == (0, 1, 2) and wd.x.shape == (1000, 40)
  assert ("| metric | dense | gmp (before) | gmp+finetune (control) | gmp+mitigation (after) "
          "| after − control |") in text
  rows = {(r["method"], r["sparsity"]): r for r in analyze.summary_rows(wd)}
  acc = float(np.mean(np.argmax(after["logits"], -1) == after["label"]))
  assert rows[("gmp+mitigation", 0.9)]["accuracy_mean"] == pytest.approx(acc)
  assert f"| accuracy | {rows[('dense', 0.0)]['accuracy_mean']:.3f} ± 0.000 |" in text
  assert "## Layer sensitivity" in text and os.path.exists(tmp_path / "runs" /
                                                            "layer_sensitivity.png")
  assert "Final multipliers λ of gmp+mitigation" in text

  # Runs of another setting in the same tree are refused, naming the setting.
  other = tmp_path / "runs" / "other"
  other.mkdir()
  shutil.copy(dense / "predictions.npz", other / "predictions.npz")
  cfg = json.loads((dense / "config.json").read_text())
  cfg["imbalance"]["keep_fraction"] = 0.5
  (other / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="imbalance"):
    analyze.load_workdir(tmp_path / "runs")


def test_bad_mitigation_values_raise_naming_the_key():
  info = input_pipeline.Metadata("mnist1d", (40,), 10, 4000, 1000, "x", "label")
  mesh = train.make_mesh()
  cases = [("mitigation.steps", "steps", 0), ("mitigation.epsilon", "epsilon", -0.1),
           ("mitigation.dual_lr", "dual_lr", 0.0), ("mitigation.groups", "groups", "rows"),
           ("mitigation.learning_rate", "learning_rate", 0.0)]
  for key, field, value in cases:
    config = _config(None)
    config.mitigation[field] = value
    with pytest.raises(ValueError, match=key):
      train.Experiment(config, info, mesh=mesh)
  config = _config(None, mitigation__groups="minority")
  exp = train.Experiment(config, info, mesh=mesh)  # minority classes follow imbalance.classes
  assert exp.mitigation == fairness.Mitigation(0.0, 0.01, "minority", (0, 1, 2))
  assert exp.phases == [("train", 0, 200), ("mitigate", 200, 260)]


def test_analyze_names_each_run_by_method_structure_and_arm(tmp_path, data_dir):
  # Run directories written by hand (no training): what load_workdir calls each one.
  labels = np.concatenate([b["label"][b["mask"]] for b in input_pipeline.get_datasets(
      "mnist1d", batch_size=1, seed=0, eval_batch_size=500, data_dir=data_dir).test])
  rng = np.random.default_rng(0)

  def run(name, method, sparsity, seed=0, structure="unstructured", mitigation=None,
          logits=None):
    d = tmp_path / "runs" / name
    d.mkdir(parents=True)
    config = {"dataset": "mnist1d", "data_dir": data_dir, "model": "mlp",
              "model_kwargs": {"mlp": {"hidden": [8]}}, "seed": seed,
              "imbalance": {"classes": [], "keep_fraction": 1.0, "seed": 0},
              "pruning": {"method": method, "sparsity": sparsity, "structure": structure},
              "mitigation": mitigation or {"enabled": False}}
    (d / "config.json").write_text(json.dumps(config))
    out = rng.normal(size=(len(labels), 10)) if logits is None else logits
    analyze.save_run_file(d / "predictions.npz", logits=out, labels=labels)
    if mitigation:
      analyze.save_run_file(d / "predictions_before_mitigation.npz", logits=out + 1,
                            labels=labels)
    return out

  run("dense", "dense", 0.0)
  run("nm24", "oneshot", 0.5, structure="2:4")
  run("oneshot", "oneshot", 0.5)
  constrained = {"enabled": True, "constrained": True, "epsilon": 0.1, "dual_lr": 0.2,
                 "groups": "classes"}
  shared = run("mitigated", "gmp", 0.9, mitigation=constrained)  # same pruned model ("before")
  run("control", "gmp", 0.9, mitigation={**constrained, "constrained": False}, logits=shared)
  wd = analyze.load_workdir(tmp_path / "runs")
  assert sorted((r.method, r.sparsity) for r in wd.runs) == [
      ("dense", 0.0), ("gmp", 0.9), ("gmp+finetune", 0.9), ("gmp+mitigation", 0.9),
      ("oneshot", 0.5), ("oneshot 2:4", 0.5)]
  assert (wd.config["epsilon"], wd.config["dual_lr"]) == (0.1, 0.2)
  # The mitigated and control runs share their "gmp" (before): read once. Made to differ, the
  # one name would hold two models: refused.
  before = {r.method: r for r in wd.runs}["gmp"]
  assert before.record["file"].endswith("control/predictions_before_mitigation.npz")
  (tmp_path / "runs" / "mitigated" / "predictions_before_mitigation.npz").unlink()
  analyze.save_run_file(tmp_path / "runs" / "mitigated" / "predictions_before_mitigation.npz",
                        logits=rng.normal(size=(len(labels), 10)), labels=labels)
  with pytest.raises(ValueError, match="logits differ"):
    analyze.load_workdir(tmp_path / "runs")
