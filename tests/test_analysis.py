"""Tests of jaxprune.analysis: every metric on constructed inputs with hand-computed answers."""
import math
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import pytest

from jaxprune import analysis as A

matplotlib.use("Agg")

F32 = np.float32
LOG2, LOG5 = math.log(2.0), math.log(5.0)


def _logits(labels, p_label, num_classes=3):
  """Logits whose softmax puts ``p`` on the label and splits the rest evenly.

  With ``p > 1/num_classes`` the prediction is the label; below, it is the smallest other class.
  The cross-entropy of example ``i`` is ``-log p_i``.
  """
  labels = np.asarray(labels)
  p = np.asarray(p_label, np.float64)
  probs = np.repeat(((1 - p) / (num_classes - 1))[:, None], num_classes, axis=1)
  probs[np.arange(len(labels)), labels] = p
  return jnp.asarray(np.log(probs), jnp.float32)


def _is_png(path):
  with open(path, "rb") as f:
    head = f.read(8)
  return os.path.getsize(path) > 1000 and head == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- per-group metrics

def test_per_class_accuracy_recall_precision_from_predictions():
  labels = jnp.array([0, 0, 0, 1, 1, 2])
  preds = jnp.array([0, 0, 1, 1, 0, 0])
  m = A.per_group_metrics(preds, labels)
  np.testing.assert_array_equal(m.count, [3, 2, 1])
  # recall: class 0: 2/3, class 1: 1/2, class 2: 0/1.
  np.testing.assert_array_equal(m.accuracy, [F32(2) / F32(3), 0.5, 0.0])
  np.testing.assert_array_equal(m.recall, m.accuracy)
  # precision: predicted 0 four times (2 right), 1 twice (1 right), 2 never (NaN).
  np.testing.assert_array_equal(m.precision, [0.5, 0.5, np.nan])
  assert float(m.overall_accuracy) == 0.5
  assert m.loss is None and m.overall_loss is None


def test_per_class_loss_from_logits():
  labels = [0, 0, 1, 1]
  logits = _logits(labels, [0.5, 0.25, 0.5, 0.8])
  m = A.per_group_metrics(logits, jnp.array(labels))
  # p = 0.25 < 1/3: that example is predicted as class 1 (the smallest other class).
  np.testing.assert_array_equal(m.accuracy, [0.5, 1.0, np.nan])
  np.testing.assert_allclose(m.loss[:2], [(LOG2 + 2 * LOG2) / 2,
                                          (LOG2 - math.log(0.8)) / 2], rtol=1e-6)
  assert np.isnan(m.loss[2]) and int(m.count[2]) == 0
  np.testing.assert_allclose(m.overall_loss, (4 * LOG2 - math.log(0.8)) / 4, rtol=1e-6)


def test_user_groups_accuracy_within_group_and_empty_group():
  labels = jnp.array([0, 1, 1, 0, 1])
  preds = jnp.array([0, 1, 0, 1, 1])
  groups = jnp.array([3, 3, 0, 0, 3])
  m = A.per_group_metrics(preds, labels, groups, num_groups=5)
  np.testing.assert_array_equal(m.count, [2, 0, 0, 3, 0])
  np.testing.assert_array_equal(m.accuracy, [0.0, np.nan, np.nan, 1.0, np.nan])
  assert m.precision is None  # precision is per class; the groups here are not the classes
  assert "| 3 | 3 | 1.0000 |" in m.to_markdown()


def test_per_group_metrics_same_under_jit():
  labels = jnp.array([0, 2, 1, 1, 2, 0])
  logits = _logits(np.asarray(labels), [0.5, 0.2, 0.9, 0.3, 0.6, 0.7])
  groups = jnp.array([1, 0, 1, 0, 1, 1])
  fn = jax.jit(A.per_group_metrics, static_argnames=("num_groups", "num_classes"))
  for g, n in ((None, 3), (groups, 2)):
    eager = A.per_group_metrics(logits, labels, g, num_groups=n)
    jitted = fn(logits, labels, g, num_groups=n)
    jax.tree.map(np.testing.assert_array_equal, eager, jitted)


def test_per_group_metrics_bad_input():
  with pytest.raises(ValueError, match="labels"):
    A.per_group_metrics(jnp.zeros((3, 2)), jnp.array([0, 1, 2]))   # label 2 of 2 classes
  with pytest.raises(ValueError, match="labels"):
    A.per_group_metrics(jnp.zeros((3, 2)), jnp.array([0, 1]))
  with pytest.raises(ValueError, match="groups"):
    A.per_group_metrics(jnp.array([0, 1]), jnp.array([0, 1]), jnp.array([0, 4]), num_groups=3)
  with pytest.raises(ValueError, match="logits_or_preds"):
    A.per_group_metrics(jnp.zeros((2, 2, 2)), jnp.array([0, 1]))
  with pytest.raises(ValueError, match="num_groups"):
    jax.jit(A.per_group_metrics)(jnp.array([0, 1]), jnp.array([0, 1]), jnp.array([0, 1]))


# ----------------------------------------------------------------------------- disparate impact

def _disparate_case():
  labels = np.array([0, 0, 1, 1, 2, 2, 2, 2])
  dense = _logits(labels, [.5, .5, .5, .5, .2, .5, .5, .5])    # one class-2 error
  pruned = _logits(labels, [.5, .5, .2, .5, .5, .5, .5, .5])   # one class-1 error
  return jnp.asarray(labels), dense, pruned


def test_disparate_impact_per_class():
  labels, dense, pruned = _disparate_case()
  r = A.disparate_impact(dense, pruned, labels)
  np.testing.assert_array_equal(r.dense.accuracy, [1.0, 1.0, 0.75])
  np.testing.assert_array_equal(r.pruned.accuracy, [1.0, 0.5, 1.0])
  np.testing.assert_array_equal(r.accuracy_change, [0.0, -0.5, 0.25])
  assert int(r.worst_group) == 1
  assert float(r.worst_group_drop) == 0.5
  assert float(r.gap) == 0.75                                  # drop 0.5 minus drop -0.25
  assert float(r.overall_accuracy_change) == 0.0               # 7/8 both: the mean hides it
  # dense preds [0,0,1,1,0,2,2,2], pruned preds [0,0,0,1,2,2,2,2]: precision 2/3, 1, 1 both.
  np.testing.assert_array_equal(r.dense.precision, [F32(2) / F32(3), 1.0, 1.0])
  np.testing.assert_array_equal(r.precision_change, [0.0, 0.0, 0.0])
  np.testing.assert_allclose(r.excess_loss, [0.0, (LOG5 - LOG2) / 2, (LOG2 - LOG5) / 4],
                             atol=1e-6)
  text = r.to_markdown()
  assert "| 1 | 2 | 1.0000 | 0.5000 | -0.5000 |" in text
  assert "worst group 1 drops 0.5000" in text and "gap between" in text


def test_disparate_impact_user_groups_and_predictions():
  labels, dense, pruned = _disparate_case()
  groups = jnp.array([0, 1, 0, 1, 0, 1, 0, 1])
  r = A.disparate_impact(dense, pruned, labels, groups)
  # group 0 = examples 0, 2, 4, 6: dense wrong on 4, pruned wrong on 2; group 1: all right.
  np.testing.assert_array_equal(r.dense.accuracy, [0.75, 1.0])
  np.testing.assert_array_equal(r.accuracy_change, [0.0, 0.0])
  assert float(r.gap) == 0.0 and r.precision_change is None
  np.testing.assert_allclose(r.excess_loss, [0.0, 0.0], atol=1e-6)
  # Predictions instead of logits: same accuracies, no losses.
  rp = A.disparate_impact(jnp.argmax(dense, -1), jnp.argmax(pruned, -1), labels)
  np.testing.assert_array_equal(rp.accuracy_change, [0.0, -0.5, 0.25])
  assert rp.excess_loss is None and rp.dense.loss is None


def test_disparate_impact_pruned_never_predicts_last_class():
  labels = jnp.array([0, 1, 2])
  r = A.disparate_impact(jnp.array([0, 1, 2]), jnp.array([0, 1, 1]), labels)
  np.testing.assert_array_equal(r.accuracy_change, [0.0, 0.0, -1.0])
  np.testing.assert_array_equal(r.pruned.precision, [1.0, 0.5, np.nan])


# ----------------------------------------------------------------------------- exemplars

def test_modal_prediction_ties_go_to_smallest_label():
  preds = jnp.array([[2, 1, 0, 3],
                     [1, 2, 3, 3],
                     [0, 0, 3, 1]])
  # ex0: 2,1,0 all once -> 0; ex1: 1,2,0 -> 0; ex2: 0,3,3 -> 3; ex3: 3,3,1 -> 3.
  np.testing.assert_array_equal(A.modal_prediction(preds, 4), [0, 0, 3, 3])
  np.testing.assert_array_equal(A.modal_prediction(preds[::-1], 4), [0, 0, 3, 3])
  np.testing.assert_array_equal(A.modal_prediction(jnp.array([[1, 0], [0, 1]]), 2), [0, 0])


def test_pruning_identified_exemplars_known_answer():
  dense = jnp.array([[0, 1, 2, 2, 1, 0],
                     [0, 1, 2, 1, 1, 0],
                     [1, 1, 2, 1, 0, 0]])
  pruned = jnp.array([[0, 0, 2, 2, 1, 2],
                      [0, 0, 1, 2, 0, 1]])
  labels = jnp.array([0, 1, 2, 1, 1, 0])
  r = A.pruning_identified_exemplars(dense, pruned, labels)
  # dense modal [0,1,2,1,1,0]; pruned modal (ties -> smallest) [0,0,1,2,0,1].
  np.testing.assert_array_equal(r.dense_modal, [0, 1, 2, 1, 1, 0])
  np.testing.assert_array_equal(r.pruned_modal, [0, 0, 1, 2, 0, 1])
  np.testing.assert_array_equal(r.mask, [False, True, True, True, True, True])
  assert int(r.count) == 5
  np.testing.assert_array_equal(r.class_counts, [1, 3, 1])
  np.testing.assert_array_equal(r.class_fraction, [0.5, 1.0, 1.0])
  assert str(r).startswith("5 pruning-identified exemplars of 6 examples")
  # Same answer whatever the order of the models, and under jit.
  r2 = A.pruning_identified_exemplars(dense[::-1], pruned[::-1], labels)
  np.testing.assert_array_equal(r2.mask, r.mask)
  fn = jax.jit(A.pruning_identified_exemplars, static_argnames="num_classes")
  jax.tree.map(np.testing.assert_array_equal, fn(dense, pruned, labels, num_classes=3), r)


def test_pruning_identified_exemplars_without_labels_and_bad_input():
  r = A.pruning_identified_exemplars(jnp.array([[1, 1]]), jnp.array([[1, 1], [1, 0]]))
  np.testing.assert_array_equal(r.mask, [False, True])   # pruned tie 1 vs 0 -> 0
  assert r.class_counts is None and int(r.count) == 1
  with pytest.raises(ValueError, match="pruned_preds"):
    A.pruning_identified_exemplars(jnp.array([[1, 1]]), jnp.array([1, 1]))
  with pytest.raises(ValueError, match="examples"):
    A.pruning_identified_exemplars(jnp.array([[1, 1]]), jnp.array([[1, 1, 0]]))
  with pytest.raises(ValueError, match="labels"):
    A.pruning_identified_exemplars(jnp.array([[1, 1]]), jnp.array([[1, 1]]), jnp.array([0]))


@pytest.mark.parametrize("shape", [(10, 40), (10, 8, 8), (10, 8, 8, 1), (10, 8, 8, 3)])
def test_exemplar_gallery_writes_png(tmp_path, shape):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  if len(shape) == 4 and shape[-1] == 3:
    x = (x - x.min()) / (x.max() - x.min())
  mask = np.zeros(10, bool)
  mask[[1, 4, 5, 9]] = True
  path = tmp_path / "pies.png"
  drawn = A.plot_exemplar_gallery(x, np.arange(10) % 3, mask, np.zeros(10, int),
                                  np.ones(10, int), path, max_examples=3)
  assert drawn == 3 and _is_png(path)


def test_exemplar_gallery_with_no_exemplars_and_bad_input(tmp_path):
  path = tmp_path / "none.png"
  assert A.plot_exemplar_gallery(np.zeros((4, 40)), None, np.zeros(4, bool), np.zeros(4, int),
                                 np.zeros(4, int), path) == 0
  assert _is_png(path)
  with pytest.raises(ValueError, match="pie_mask"):
    A.plot_exemplar_gallery(np.zeros((4, 40)), None, np.zeros(3, bool), np.zeros(4, int),
                            np.zeros(4, int), path)
  with pytest.raises(ValueError, match="x"):
    A.plot_exemplar_gallery(np.zeros((4,)), None, np.zeros(4, bool), np.zeros(4, int),
                            np.zeros(4, int), path)


# ----------------------------------------------------------------------------- seeds

def test_mask_overlap_known_jaccard():
  a = {"w": jnp.array([[True, True], [False, False]]), "v": jnp.array([True, False, True]),
       "b": jnp.array(True)}
  same = A.mask_overlap(a, a)
  assert same == {"w": 1.0, "v": 1.0}                  # the scalar (unpruned) leaf is skipped
  disjoint = {"w": ~a["w"], "v": ~a["v"], "b": jnp.array(True)}
  assert A.mask_overlap(a, disjoint) == {"w": 0.0, "v": 0.0}
  b = {"w": jnp.array([[True, False], [True, False]]), "v": jnp.array(True),
       "b": jnp.array(True)}
  # w: 1 shared of 3 kept in either; v: scalar True = all kept, so 2 of 3.
  assert A.mask_overlap(a, b) == {"w": 1 / 3, "v": 2 / 3}
  none = {"w": jnp.zeros((2, 2), bool), "v": jnp.zeros(3, bool), "b": jnp.array(True)}
  assert A.mask_overlap(none, none) == {"w": 1.0, "v": 1.0}


def test_mask_overlap_bad_input():
  a = {"w": jnp.ones((2, 2), bool)}
  with pytest.raises(ValueError, match="'w'"):
    A.mask_overlap(a, {"w": jnp.ones((2, 3), bool)})
  with pytest.raises(ValueError, match="masks_b"):
    A.mask_overlap(a, {"u": jnp.ones((2, 2), bool)})
  with pytest.raises(ValueError, match="at least two"):
    A.pairwise_mask_overlap([a])


def test_pairwise_mask_overlap_known_matrix():
  w = jnp.arange(1.0, 9.0).reshape(2, 4)
  bias = jnp.array(True)                                  # an unpruned leaf: skipped
  keep_large = {"dense": {"kernel": w > 4, "bias": bias}}         # keeps 5..8
  keep_small = {"dense": {"kernel": w <= 4, "bias": bias}}        # keeps 1..4
  keep_mid = {"dense": {"kernel": (w > 2) & (w < 7), "bias": bias}}  # keeps 3..6
  r = A.pairwise_mask_overlap([keep_large, keep_small, keep_mid])
  # large/small disjoint: 0; large/mid share {5, 6} of {3..8}: 1/3; small/mid: {3, 4} -> 1/3.
  np.testing.assert_array_equal(r.matrix["dense/kernel"],
                                [[1, 0, 1 / 3], [0, 1, 1 / 3], [1 / 3, 1 / 3, 1]])
  assert r.mean == {"dense/kernel": (0 + 1 / 3 + 1 / 3) / 3}
  assert "| dense/kernel | 0.2222 | 0.0000 | 0.3333 |" in r.to_markdown()


def test_seed_spread_exact():
  s = A.seed_spread([0.25, 0.75])
  assert (s.num_seeds, s.mean, s.std, s.min, s.max) == (2, 0.5, 0.25, 0.25, 0.75)
  assert A.seed_spread([0.25, 0.75], ddof=1).std == math.sqrt(0.125)
  pc = A.seed_spread([0.5, 1.0], [[0.5, 1.0, 0.0], [1.0, 1.0, 1.0]])
  np.testing.assert_array_equal(pc.per_class_mean, [0.75, 1.0, 0.5])
  np.testing.assert_array_equal(pc.per_class_std, [0.25, 0.0, 0.5])
  np.testing.assert_array_equal(pc.per_class_min, [0.5, 1.0, 0.0])
  np.testing.assert_array_equal(pc.per_class_max, [1.0, 1.0, 1.0])
  assert "| 2 | 0.5000 | 0.5000 | 0.0000 | 1.0000 |" in pc.to_markdown()
  with pytest.raises(ValueError, match="per_class_accuracies"):
    A.seed_spread([0.5, 1.0], [[0.5, 1.0]])
  with pytest.raises(ValueError, match="ddof"):
    A.seed_spread([0.5], ddof=1)


# ----------------------------------------------------------------------------- layer sensitivity

def _tiny_linear():
  """Two linear layers; kernel entries 1..12 and 0.6..0.1 (nonzero, distinct magnitudes)."""
  return {"l1": {"kernel": jnp.arange(1.0, 13.0).reshape(4, 3), "bias": jnp.zeros(3)},
          "l2": {"kernel": jnp.arange(6.0, 0.0, -1.0).reshape(3, 2) / 10,
                 "bias": jnp.array([0.0, jnp.log(3.0)])}}


def test_layer_sensitivity_exact_counts_and_known_loss(tmp_path):
  params = _tiny_linear()
  x = jnp.array([[1.0, 0, 0, 0], [0, 0, 0, 1.0], [1.0, 1.0, 0, 0], [0, 0, 1.0, 0]])
  # logit_1 - logit_0 = log 3 - 0.1 * sum(x @ k1) = 0.5, -2.2, -1.0, -1.3: dense is right on all.
  labels = jnp.array([1, 0, 0, 0])

  @jax.jit
  def evaluate(p):
    k1, k2 = p["l1"]["kernel"], p["l2"]["kernel"]
    logits = (x @ k1 + p["l1"]["bias"][None]) @ k2 + p["l2"]["bias"][None]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return {"zeros_l1": jnp.sum(k1 == 0), "zeros_l2": jnp.sum(k2 == 0),
            "abs_l1": jnp.sum(jnp.abs(k1)), "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

  t = A.layer_sensitivity(params, evaluate, [0.0, 0.25, 0.5, 1.0])
  assert t.layers == ("l1/kernel", "l2/kernel")          # biases are not prunable by default
  assert {k: t.baseline[k] for k in ("zeros_l1", "zeros_l2", "abs_l1")} == {
      "zeros_l1": 0.0, "zeros_l2": 0.0, "abs_l1": 78.0}
  # Only the row's layer is pruned, by exactly round(s * n) weights.
  np.testing.assert_array_equal(t.values["zeros_l1"], [[0, 3, 6, 12], [0, 0, 0, 0]])
  np.testing.assert_array_equal(t.values["zeros_l2"], [[0, 0, 0, 0], [0, 2, 3, 6]])
  # Magnitude pruning of l1 removes the smallest: 1+2+3 at 25%, 1..6 at 50%.
  np.testing.assert_array_equal(t.change("abs_l1"), [[0, -6, -21, -78], [0, 0, 0, 0]])
  np.testing.assert_array_equal(t.change("loss")[:, 0], [0.0, 0.0])
  # Either kernel fully pruned: logits = l2 bias = [0, log 3] for every example, so every
  # prediction is class 1 (accuracy 1/4) and the loss is -log(3/4) on label 1, -log(1/4) else.
  assert t.baseline["accuracy"] == 1.0
  expected_loss = (math.log(4.0 / 3.0) + 3 * math.log(4.0)) / 4
  np.testing.assert_allclose(t.values["loss"][:, 3], [expected_loss] * 2, rtol=1e-6)
  np.testing.assert_array_equal(t.change("accuracy")[:, 3], [-0.75, -0.75])
  text = t.to_markdown("accuracy")
  assert text.startswith("accuracy (unpruned: 1.0000)")
  assert "| l1/kernel | 1.0000 (+0.0000) |" in text and "0.2500 (-0.7500) |" in text
  assert _is_png(A.plot_layer_sensitivity(t, tmp_path / "sens.png"))


def test_layer_sensitivity_custom_scores_where_and_errors():
  params = _tiny_linear()
  evaluate = lambda p: {"abs": jnp.sum(jnp.abs(p["l1"]["kernel"]))}
  largest_first = jax.tree.map(lambda w: -jnp.abs(w), params)
  t = A.layer_sensitivity(params, evaluate, [0.25], scores=largest_first,
                          where=lambda path, leaf: path == "l1/kernel")
  assert t.layers == ("l1/kernel",)
  assert float(t.change("abs")[0, 0]) == -(12 + 11 + 10)
  with pytest.raises(ValueError, match="outside"):
    A.layer_sensitivity(params, evaluate, [1.5])
  with pytest.raises(ValueError, match="mapping"):
    A.layer_sensitivity(params, lambda p: 1.0, [0.5])


# ----------------------------------------------------------------------------- accuracy vs sparsity

def _records():
  rec = [dict(method="gmp", sparsity=0.9, seed=0, accuracy=0.25),
         dict(method="gmp", sparsity=0.5, seed=0, accuracy=1.0),
         dict(method="random", sparsity=0.5, seed=0, accuracy=0.5, loss=2.0),
         dict(method="gmp", sparsity=0.9, seed=1, accuracy=0.75),
         dict(method="gmp", sparsity=0.5, seed=1, accuracy=0.5)]
  return rec


def test_accuracy_vs_sparsity_mean_std_exact():
  out = A.accuracy_vs_sparsity(_records())
  assert list(out.curves) == ["gmp", "random"]
  gmp = out.curves["gmp"]
  np.testing.assert_array_equal(gmp.sparsity, [0.5, 0.9])
  np.testing.assert_array_equal(gmp.mean, [0.75, 0.5])
  np.testing.assert_array_equal(gmp.std, [0.25, 0.25])
  np.testing.assert_array_equal(gmp.num_seeds, [2, 2])
  np.testing.assert_array_equal(out.curves["random"].std, [0.0])
  sample = A.accuracy_vs_sparsity(_records(), ddof=1)
  np.testing.assert_array_equal(sample.curves["gmp"].std, [math.sqrt(0.125)] * 2)
  assert np.isnan(sample.curves["random"].std[0])     # one seed: no sample std
  assert "| gmp | 0.9000 | 2 | 0.5000 | 0.2500 |" in out.to_markdown()


def test_accuracy_vs_sparsity_errors_and_other_metric(tmp_path):
  with pytest.raises(ValueError, match="repeats"):
    A.accuracy_vs_sparsity(_records() + [dict(method="gmp", sparsity=0.5, seed=1, accuracy=0)])
  with pytest.raises(ValueError, match=r"records\[0\] has no key 'loss'"):
    A.accuracy_vs_sparsity(_records(), metric="loss")
  losses = A.accuracy_vs_sparsity(_records()[2:3], metric="loss")
  np.testing.assert_array_equal(losses.curves["random"].mean, [2.0])
  path = A.plot_accuracy_vs_sparsity(A.accuracy_vs_sparsity(_records()), tmp_path / "c.png",
                                     dense=1.0, title="test")
  assert _is_png(path)


# ----------------------------------------------------------------------------- mitigation

def test_constrained_loss_value_violations_and_gradient():
  loss = jnp.array([1.0, 3.0, 2.0, 6.0])
  groups = jnp.array([0, 0, 1, 1])
  lam = jnp.array([0.5, 1.0])
  value, viol = A.constrained_loss(loss, groups, lam, num_groups=2, epsilon=0.5)
  # mean 3; group means 2 and 4: violations 2-3-0.5 = -1.5 and 4-3-0.5 = 0.5.
  np.testing.assert_array_equal(viol, [-1.5, 0.5])
  assert float(value) == 3.0 + 0.5 * -1.5 + 1.0 * 0.5
  # d/d loss_i = 1/N + sum_g lam_g (1[g_i = g] / N_g - 1/N).
  lagrangian = lambda v: A.constrained_loss(v, groups, lam, num_groups=2, epsilon=0.5)
  grad = jax.grad(lambda v: lagrangian(v)[0])(loss)
  np.testing.assert_array_equal(grad, [0.125, 0.125, 0.375, 0.375])
  # The violations carry no gradient (they feed the dual step).
  g_viol = jax.grad(lambda v: lagrangian(v)[1].sum())(loss)
  np.testing.assert_array_equal(g_viol, jnp.zeros(4))


def test_constrained_loss_absent_group_and_jit():
  loss, groups = jnp.array([1.0, 3.0]), jnp.array([0, 0])
  fn = jax.jit(A.constrained_loss, static_argnames=("num_groups",))
  value, viol = fn(loss, groups, jnp.array([1.0, 7.0]), num_groups=2, epsilon=0.25)
  np.testing.assert_array_equal(viol, [-0.25, 0.0])       # group 1 not in the batch
  assert float(value) == 2.0 - 0.25
  with pytest.raises(ValueError, match="multipliers"):
    A.constrained_loss(loss, groups, jnp.zeros(3), num_groups=2, epsilon=0.0)


def test_dual_ascent_update_rule():
  lam = jnp.array([0.5, 0.5, 0.0, 0.0])
  viol = jnp.array([2.0, -3.0, -1.0, 1.0])
  new = A.dual_ascent_update(lam, viol, 0.25)
  np.testing.assert_array_equal(new, [1.0, 0.0, 0.0, 0.25])   # max(0, lam + 0.25 * viol)
  assert new.dtype == lam.dtype
  np.testing.assert_array_equal(jax.jit(A.dual_ascent_update)(lam, viol, 0.25), new)
  with pytest.raises(ValueError, match="violations"):
    A.dual_ascent_update(lam, viol[:2], 0.1)


def test_constrained_fine_tuning_reduces_worst_group_excess_loss():
  """A pruned logistic regression fine-tuned with and without per-group loss constraints.

  Group 0 (80 examples) has label x > 0, group 1 (20 examples) has label x > 1. The dense model
  sees a group-indicator feature and fits both; pruning removes that feature's weight, so the
  pruned model needs one threshold for both groups. Plain fine-tuning serves the majority; the
  constrained loop moves toward group 1.
  """
  x0, x1 = np.linspace(-2, 2, 80), np.linspace(-2, 2, 20)
  x = jnp.asarray(np.concatenate([x0, x1]), jnp.float32)
  labels = jnp.asarray(np.concatenate([x0 > 0, x1 > 1]), jnp.int32)
  groups = jnp.asarray(np.repeat([0, 1], [80, 20]), jnp.int32)
  feats = jnp.stack([x, groups.astype(jnp.float32)], axis=1)
  mask = jnp.array([True, False])

  def logits(params):          # two-class logits [0, z]: softmax CE = sigmoid BCE of z
    z = feats @ params["w"] + params["b"]
    return jnp.stack([jnp.zeros_like(z), z], axis=1)

  def objective(params, lam, constrained):
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits(params), labels)
    if constrained:
      return A.constrained_loss(per_example, groups, lam, num_groups=2, epsilon=0.05)
    return jnp.mean(per_example), jnp.zeros(2)

  tx = optax.sgd(0.5)

  def fine_tune(params, constrained, steps=300):
    @jax.jit
    def step(params, opt_state, lam):
      (_, viol), grads = jax.value_and_grad(objective, has_aux=True)(params, lam, constrained)
      grads = {"w": jnp.where(mask, grads["w"], 0.0), "b": grads["b"]}   # keep w[1] pruned
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return params, opt_state, A.dual_ascent_update(lam, viol, 1.0)
    opt_state, lam = tx.init(params), jnp.zeros(2)
    for _ in range(steps):
      params, opt_state, lam = step(params, opt_state, lam)
    return params, lam

  dense = {"w": jnp.array([10.0, -10.0]), "b": jnp.array(0.0)}  # thresholds 0 and 1
  pruned = {"w": jnp.where(mask, dense["w"], 0.0), "b": dense["b"]}
  plain, _ = fine_tune(pruned, constrained=False)
  fair, lam = fine_tune(pruned, constrained=True)
  assert float(plain["w"][1]) == 0.0 and float(fair["w"][1]) == 0.0

  r_plain = A.disparate_impact(logits(dense), logits(plain), labels, groups)
  r_fair = A.disparate_impact(logits(dense), logits(fair), labels, groups)
  worst_plain = float(jnp.max(r_plain.excess_loss))
  worst_fair = float(jnp.max(r_fair.excess_loss))
  # Measured: 0.665 (plain) vs 0.274 (constrained).
  assert worst_fair < 0.5 * worst_plain
  # The constraint L_1 - L <= 0.05 holds up to 0.05 after 300 steps; plain misses it by ~0.43.
  gap_fair = float(r_fair.pruned.loss[1] - r_fair.pruned.overall_loss)
  gap_plain = float(r_plain.pruned.loss[1] - r_plain.pruned.overall_loss)
  assert gap_fair < 0.1 < 0.4 < gap_plain
  # Only the hurt group's multiplier is active; the price is a higher overall loss.
  assert float(lam[0]) == 0.0 and float(lam[1]) > 0.1
  assert float(r_fair.pruned.overall_loss) > float(r_plain.pruned.overall_loss)
