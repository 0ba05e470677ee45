"""train.fairness (constrained fine-tuning), the experiment of benchmarks.fairness (unbalanced
data) and train.analyze (the report)."""
import functools
import json
import os

import jax
import matplotlib
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from benchmarks import fairness as experiment
from train import analyze, fairness, models

matplotlib.use("Agg")


def _read(path):
  with open(path) as f:
    return f.read()


def _is_png(path):
  with open(path, "rb") as f:
    head = f.read(8)
  return os.path.getsize(path) > 1000 and head == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- subsampling


def test_unbalanced_indices_exact_counts():
  labels = np.repeat(np.arange(4), [37, 50, 23, 10])
  idx = fairness.unbalanced_indices(labels, [0, 2], 0.1, seed=3)
  # round(3.7) = 4 and round(2.3) = 2 kept of the minority classes; every other example kept.
  assert np.bincount(labels[idx], minlength=4).tolist() == [4, 50, 2, 10]
  assert np.all(np.diff(idx) > 0) and idx.dtype == np.int64
  np.testing.assert_array_equal(np.flatnonzero(labels == 1), idx[labels[idx] == 1])
  # Deterministic in the seed; another seed picks other examples of the minority classes.
  np.testing.assert_array_equal(idx, fairness.unbalanced_indices(labels, [0, 2], 0.1, seed=3))
  other = fairness.unbalanced_indices(labels, [0, 2], 0.1, seed=4)
  assert not np.array_equal(idx, other)
  # A class's choice does not depend on which other classes are subsampled.
  only0 = fairness.unbalanced_indices(labels, [0], 0.1, seed=3)
  np.testing.assert_array_equal(only0[labels[only0] == 0], idx[labels[idx] == 0])
  assert len(fairness.unbalanced_indices(labels, [1], 0.0, seed=0)) == 120 - 50
  assert len(fairness.unbalanced_indices(labels, [1], 1.0, seed=0)) == 120


@pytest.mark.parametrize("kwargs, match", [
    (dict(keep_fraction=1.5), "keep_fraction"),
    (dict(minority_classes=[7]), "minority_classes"),
    (dict(minority_classes=[1, 1]), "minority_classes"),
    (dict(seed=-1), "seed"),
])
def test_unbalanced_indices_bad_input(kwargs, match):
  args = dict(labels=np.array([0, 1, 1, 2]), minority_classes=[1], keep_fraction=0.5, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    fairness.unbalanced_indices(**args)


# ----------------------------------------------------------------------------- mitigation


@functools.cache   # jp.prune and model creation run eagerly: share them between tests
def _tiny_pruned(sparsity=0.75):
  model = models.create_model("mlp", input_shape=(6,), num_classes=3, rngs=nnx.Rngs(0),
                              hidden=(8,))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.as_pure(params)
  params, masks = jp.prune(params, sparsity)
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 96).astype(np.int32)
  x = (rng.normal(size=(96, 6)) + y[:, None]).astype(np.float32)
  data = fairness.ArrayBatches(x, y, batch_size=16, seed=0)
  return graphdef, params, nnx.as_pure(rest), masks, data


def test_mitigation_follows_the_dual_rule_and_keeps_pruned_weights_zero():
  graphdef, params, rest, masks, data = _tiny_pruned()
  eps, eta, steps = 0.0, 0.5, 8          # eta = 0.5: eta * v is exact in float32
  mit = fairness.Mitigation(epsilon=eps, dual_lr=eta)
  r = fairness.mitigation_finetune(graphdef, params, rest, masks, data.batch, steps=steps,
                                   sparsity=0.75, mitigation=mit, learning_rate=1e-2, chunk=3)
  lam, viol = r.history["multipliers"], r.history["violations"]
  assert lam.shape == viol.shape == (steps, 3)
  np.testing.assert_array_equal(lam[0], np.zeros(3, np.float32))
  # Projected dual ascent after every step: lam_{t+1} = max(0, lam_t + eta * v_t).
  expected = np.maximum(lam + np.float32(eta) * viol, 0).astype(np.float32)
  np.testing.assert_array_equal(lam[1:], expected[:-1])
  np.testing.assert_array_equal(np.asarray(r.multipliers), expected[-1])
  assert np.any(lam[1:] > 0) and np.any(viol < 0)    # constraints were active and inactive
  # The first violation is L_g - L - eps on batch 0, computed here independently.
  b = data.batch(0)
  logits = nnx.merge(graphdef, params, rest)(b["x"])
  ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]))
  want = [ce[b["label"] == g].mean() - ce.mean() - eps if np.any(b["label"] == g) else 0.0
          for g in range(3)]
  np.testing.assert_allclose(viol[0], want, rtol=1e-5, atol=1e-6)
  # Masks unchanged; pruned weights exactly 0; kept weights trained.
  for path, m, m2 in zip(*(jp.tree.flatten(masks)[:2]), jp.tree.flatten(r.masks)[1]):
    np.testing.assert_array_equal(np.asarray(m), np.asarray(m2), err_msg=path)
  flat0 = dict(zip(*jp.tree.flatten(params)[:2]))
  flat1 = dict(zip(*jp.tree.flatten(r.params)[:2]))
  flat_m = dict(zip(*jp.tree.flatten(masks)[:2]))
  for path, m in flat_m.items():
    if np.ndim(m):
      w = np.asarray(flat1[path])
      assert np.all(w[~np.asarray(m)] == 0.0), path
      assert round(0.75 * m.size) == int((~np.asarray(m)).sum())
      assert not np.array_equal(w[np.asarray(m)], np.asarray(flat0[path])[np.asarray(m)])
  assert float(jp.sparsity(r.params)) == 0.75


def test_plain_finetune_is_the_same_routine_without_multipliers():
  graphdef, params, rest, masks, data = _tiny_pruned()
  # Same settings as the dual-rule test, so the jitted steps are reused.
  kw = dict(steps=8, sparsity=0.75, learning_rate=1e-2, chunk=3)
  plain = fairness.mitigation_finetune(graphdef, params, rest, masks, data.batch,
                                       mitigation=None, **kw)
  mit = fairness.mitigation_finetune(graphdef, params, rest, masks, data.batch,
                                     mitigation=fairness.Mitigation(0.0, 0.5), **kw)
  np.testing.assert_array_equal(np.asarray(plain.multipliers), [0.0])
  # Step 0 has lambda = 0, so both arms take the same first step; later they differ.
  np.testing.assert_allclose(plain.history["loss"][0], mit.history["loss"][0], rtol=1e-6)
  assert not np.allclose(plain.history["loss"][1:], mit.history["loss"][1:])
  assert float(jp.sparsity(plain.params)) == 0.75


def test_mitigation_groups_and_config():
  mit = fairness.mitigation_from_config({"mitigation": {"epsilon": 0.1, "dual_lr": 0.2,
                                                        "groups": "minority",
                                                        "minority_classes": [2, 0]}})
  assert mit == fairness.Mitigation(0.1, 0.2, "minority", (2, 0))
  assert mit.num_groups(5) == 2
  np.testing.assert_array_equal(fairness.group_ids(np.array([0, 1, 2, 3]), mit), [1, 0, 1, 0])
  assert fairness.mitigation_from_config({"mitigation": None}) is None
  assert fairness.mitigation_from_config({"mitigation": {"enabled": False}}) is None
  with pytest.raises(ValueError, match="mitigation.dual_lr"):
    fairness.Mitigation(0.1, 0.0).validate(3)
  with pytest.raises(ValueError, match="mitigation.groups"):
    fairness.Mitigation(0.1, 0.1, "rows").validate(3)
  with pytest.raises(ValueError, match="mitigation.minority_classes"):
    fairness.Mitigation(0.1, 0.1, "minority", (5,)).validate(3)


def test_finetune_freezes_any_masks_with_sparsity_none():
  graphdef, params, rest, _, data = _tiny_pruned()
  masks = jp.topk_mask(jp.magnitude_scores(params), 0.6, scope="global")
  params = jp.apply_masks(params, masks)
  r = fairness.mitigation_finetune(graphdef, params, rest, masks, data.batch, steps=3,
                                   sparsity=None, learning_rate=1e-2,
                                   mitigation=fairness.Mitigation(0.0, 0.5))
  for (path, m), m2, w in zip(zip(*jp.tree.flatten(masks)[:2]), jp.tree.flatten(r.masks)[1],
                              jp.tree.flatten(r.params)[1]):
    np.testing.assert_array_equal(np.asarray(m), np.asarray(m2), err_msg=path)
    if np.ndim(m):
      assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0), path


def test_finetune_rejects_masks_that_do_not_match():
  graphdef, params, rest, masks, data = _tiny_pruned(0.75)
  with pytest.raises(ValueError, match="sparsity"):
    fairness.mitigation_finetune(graphdef, params, rest, masks, data.batch, steps=1,
                                 sparsity=0.5, mitigation=None)
  dense = jax.tree.map(lambda p: p + 1.0, params)
  with pytest.raises(ValueError, match="not 0"):
    fairness.mitigation_finetune(graphdef, dense, rest, masks, data.batch, steps=1,
                                 sparsity=0.75, mitigation=None)


# ----------------------------------------------------------------------------- experiment + report


def test_tiny_experiment_writes_a_workdir_that_analyze_reports(tmp_path):
  rng = np.random.default_rng(1)
  def split(n):
    y = rng.integers(0, 3, n).astype(np.int32)
    return (rng.normal(size=(n, 12)) + 2 * y[:, None]).astype(np.float32), y
  data = experiment.Arrays(*split(240), *split(60), num_classes=3)
  config = experiment.ExperimentConfig(
      model="mlp", model_kwargs=(("hidden", (16,)),), minority_classes=(0,), keep_fraction=0.2,
      seeds=(0, 1), sparsities=(0.8,), batch_size=32, dense_steps=20, prune_steps=10,
      finetune_steps=6, prune_update_every=2, keep_dense=())
  work = str(tmp_path / "work")
  records = experiment.run_experiment(work, config, data=data, log=lambda s: None)
  assert [(r["method"], r["seed"]) for r in records] == [
      (m, seed) for seed in (0, 1) for m in ("dense", "pruned", "pruned+mitigation")]
  cfg = json.loads(_read(os.path.join(work, "config.json")))
  counts = np.bincount(data.y_train, minlength=3)
  assert cfg["train_class_counts"] == [round(0.2 * counts[0]), counts[1], counts[2]]
  wd = analyze.load_workdir(work)
  for seed in (0, 1):
    pruned, mitigated = wd.select("pruned", 0.8)[seed], wd.select("pruned+mitigation", 0.8)[seed]
    assert set(pruned.masks) == {"layers/0/kernel", "head/kernel"}
    for path, m in pruned.masks.items():
      assert int((~m).sum()) == round(0.8 * m.size)            # exact layerwise sparsity
      np.testing.assert_array_equal(m, mitigated.masks[path])  # same pruned start, fixed masks
      for run in (pruned, mitigated):
        assert np.all(run.params[path][~m] == 0.0)
    assert "multipliers" in mitigated.arrays and "multipliers" not in pruned.arrays

  # The report's numbers come from these files (analyze itself: the synthetic test below).
  rows = analyze.summary_rows(wd)
  assert [(r["method"], r["sparsity"], r["seeds"]) for r in rows] == [
      ("dense", 0.0, [0, 1]), ("pruned", 0.8, [0, 1]), ("pruned+mitigation", 0.8, [0, 1])]
  for r in records:
    run = [x for x in wd.runs if x.record["file"] == r["file"]][0]
    assert r["accuracy"] == np.mean(np.argmax(run.logits, -1) == data.y_test)


def _synthetic_workdir(path):
  """Hand-written workdir: 3 classes, class 0 is the minority; known predictions.

  dense: all correct. pruned at 0.5: all correct. pruned at 0.8: every minority example
  predicted as class 1. pruned+mitigation at 0.8 (same masks): only example 3 wrong.
  """
  os.makedirs(path / "runs")
  model = models.create_model("mlp", input_shape=(5,), num_classes=3, rngs=nnx.Rngs(0),
                              hidden=(4,))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  flat = dict(zip(*jp.tree.flatten(nnx.as_pure(params))[:2]))
  (path / "config.json").write_text(json.dumps(
      {"num_classes": 3, "minority_classes": [0], "model": "mlp",
       "model_kwargs": {"hidden": [4]}, "input_shape": [5], "keep_fraction": 0.1}))
  labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2], np.int32)
  np.savez(path / "test_data.npz", x=np.linspace(0, 1, 50).reshape(10, 5).astype(np.float32),
           label=labels)
  onehot = lambda pred: (np.eye(3, dtype=np.float32)[pred] * 4.0)
  preds = {("pruned", 0.5): labels, ("pruned", 0.8): np.where(labels == 0, 1, labels),
           ("pruned+mitigation", 0.8): np.where(np.arange(10) == 3, 2, labels)}
  runs = []
  def add(method, s, seed, **arrays):
    f = f"runs/{method}_{s}_{seed}.npz"
    np.savez(path / f, **arrays)
    runs.append({"method": method, "sparsity": s, "seed": seed, "file": f})
  for seed in (0, 1):
    add("dense", 0.0, seed, logits=onehot(labels),
        **{f"params/{k}": np.asarray(v) for k, v in flat.items()})
    for (method, s), pred in preds.items():
      m = np.ones((5, 4), bool)
      m.flat[:round(s * 20) - seed] = False
      extra = {"multipliers": np.array([0.5, 0.0, 0.25], np.float32)} if "+" in method else {}
      add(method, s, seed, logits=onehot(pred), **{"masks/layers/0/kernel": m}, **extra)
  (path / "runs.json").write_text(json.dumps(runs))


def test_analyze_synthetic_workdir(tmp_path):
  _synthetic_workdir(tmp_path)
  rows = analyze.summary_rows(analyze.load_workdir(tmp_path))
  assert [(r["method"], r["sparsity"]) for r in rows] == [
      ("dense", 0.0), ("pruned", 0.5), ("pruned", 0.8), ("pruned+mitigation", 0.8)]
  dense, half, pruned, mitigated = rows
  assert dense["accuracy_mean"] == 1.0 and half["accuracy_mean"] == 1.0 and half["pies"] == 0
  assert pruned["accuracy_mean"] == pytest.approx(0.7)
  assert pruned["minority_drop_mean"] == 1.0 and pruned["majority_drop_mean"] == 0.0
  assert pruned["disparity_mean"] == 1.0 and pruned["gap_mean"] == 1.0
  assert pruned["pies"] == 3 and pruned["pies_minority"] == 3
  assert pruned["excess_loss_minority_mean"] > 0 and pruned["excess_loss_majority_mean"] == 0.0
  assert mitigated["minority_drop_mean"] == 0.0
  assert mitigated["majority_drop_mean"] == pytest.approx(1 / 7)
  assert mitigated["pies"] == 1 and mitigated["pies_minority"] == 0
  path = analyze.main(["--workdir", str(tmp_path)])
  md = _read(path)
  assert "| pruned | 0.8 | 2 | 0.700 ± 0.000 | 0.000 ± 0.000 | 1.000 ± 0.000 |" in md
  assert "| minority drop | — | +1.000 ± 0.000 | +0.000 ± 0.000 | -1.000 |" in md
  assert "| PIEs vs dense population | — | 3 | 1 | -2 |" in md
  assert ("Final multipliers λ of pruned+mitigation (mean over seeds, sparsity 0.8): 0.500, "
          "0.000, 0.250") in md
  assert "3 pruning-identified exemplars of 10 examples" in md
  assert "the same masks as pruned" in md
  overlap = md.split("## Mask overlap")[1]
  # seed 0 keeps 4 of 20 weights, seed 1 keeps 5 (a superset): Jaccard 4/5.
  assert "| layers/0/kernel | 0.8000 | 0.8000 | 0.8000 |" in overlap
  for png in ("per_class_change.png", "accuracy_vs_sparsity.png",
              "minority_accuracy_vs_sparsity.png", "layer_sensitivity.png", "mask_overlap.png",
              "pies_pruned_s0.8.png"):
    assert _is_png(tmp_path / png), png
    assert f"]({png})" in md
