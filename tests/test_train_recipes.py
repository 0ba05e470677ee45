"""Every model x every recipe of train/: two training steps on mock data, then the check that
the recipe pruned as it says (exact per-leaf counts, exact zeros, 2 of every 4, a physically
smaller model after shrinking). Data: ``tfds.testing.mock_data`` (random MNIST-1D-shaped
examples; nothing generated, no network).

Cost: ~95 s of CPU for the 40 combinations. Compiling jaxprune's pruning transforms dominates
(~0.5 s per pruned leaf per transform), so the models are tiny and the forward/backward program
of each model is compiled once and shared by its 8 recipes (see ``train.trainer._gradients``).
"""

import importlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import jaxprune as jp
from train import input_pipeline, models, train

TINY = {
    "mlp": {"hidden": (8,)},
    "cnn": {"features": (4, 4), "kernel_sizes": (3, 3), "stride": 2},
    "rnn": {"hidden": 4, "cell": "gru"},
    "resnet": {"widths": (4,), "blocks_per_stage": 1},
    "transformer": {"patch": 8, "dim": 8, "depth": 1, "num_heads": 2, "mlp_ratio": 1},
}
RECIPES = ("dense", "oneshot", "gmp", "imp", "set", "rigl", "nm24", "channels")
# Compiling a pruning transform costs ~0.5 s of CPU per pruned leaf, so the transformer's
# recipes prune its MLP blocks and head only; the other tiny models keep jaxprune's default
# `where` (every kernel). The end-to-end tests below use the default everywhere.
WHERE = {"transformer": "fc|head"}

pytestmark = pytest.mark.usefixtures("fast_compile")


def tiny_config(recipe: str, model: str, *, num_steps: int = 2):
  """A recipe's config with a tiny model whose pruning happens within ``num_steps``."""
  config = importlib.import_module(f"train.configs.{recipe}").get_config()
  config.model = model
  for k, v in TINY[model].items():
    config.model_kwargs[model][k] = v
  config.num_steps = num_steps
  config.batch_size = 8
  config.eval_batch_size = 8
  config.progress = False
  p = config.pruning
  if recipe != "dense" and model in WHERE:
    p.where = WHERE[model]
  if recipe in ("oneshot", "nm24"):
    p.at_step = 1
  elif recipe in ("gmp", "channels"):
    p.update_every, p.begin_step, p.end_step = 1, 0, 1
  elif recipe == "imp":
    p.rounds, p.rewind_step = 1, 0
  elif recipe in ("set", "rigl"):
    p.update_every, p.end_step = 1, num_steps
  if recipe == "channels":
    p.finetune_steps = 1
  return config


@pytest.fixture(scope="module")
def mock_data(tmp_path_factory):
  """MNIST-1D-shaped random examples from tfds.testing.mock_data (no generation, no network)."""
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    return input_pipeline.get_datasets("mnist1d", batch_size=8, seed=0,
                                       data_dir=str(tmp_path_factory.mktemp("mock")))


def _kernels(params, where, masks=None):
  """``{path: array}`` of the leaves ``where`` selects (of ``masks`` if given, by path)."""
  paths, leaves, _ = jp.tree.flatten(params)
  chosen = [p for p, x in zip(paths, leaves, strict=True) if where(p, x)]
  source = dict(zip(*jp.tree.flatten(masks if masks is not None else params)[:2], strict=True))
  return {p: np.asarray(source[p]) for p in chosen}


# --- every model x recipe: one step on mock data ------------------------------------------------

@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("model", sorted(TINY))
def test_every_model_and_recipe_trains_and_prunes(model, recipe, mock_data):
  train_data, test_data, info = mock_data
  config = tiny_config(recipe, model)
  exp = train.Experiment(config, info, mesh=train.make_mesh())
  before = jax.tree.map(np.asarray, exp.trainer.params())
  for t in range(config.num_steps):
    exp.before_step(t)
    metrics = jax.device_get(exp.trainer.train_step(train_data.batch(t)))
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1
  params = exp.trainer.params()
  kernels = _kernels(params, exp.where)
  s = float(config.pruning.sparsity)
  masks = None if recipe == "dense" else _kernels(params, exp.where, exp.trainer.masks())

  if recipe == "dense":
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before, params)
    assert all(jax.tree.leaves(changed))
  elif recipe in ("oneshot", "gmp"):  # ERK: each leaf loses round(s_leaf * n), s_leaf from ERK
    erk = dict(zip(*jp.tree.flatten(jp.erk_sparsities(params, s, where=exp.where))[:2],
                   strict=True))
    for path, w in kernels.items():
      assert abs(int((~masks[path]).sum()) - round(erk[path] * w.size)) <= 1, path
      assert (w[~masks[path]] == 0).all(), path
    total = sum(w.size for w in kernels.values())
    assert abs(sum(int((~m).sum()) for m in masks.values()) / total - s) < 0.01
  elif recipe == "imp":  # global scope: exactly round(s * N) pruned over all prunable leaves
    total = sum(w.size for w in kernels.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(s * total)
    for path, w in kernels.items():
      assert (w[~masks[path]] == 0).all(), path
  elif recipe in ("set", "rigl"):
    total = sum(w.size for w in kernels.values())
    pruned = sum((~m).sum() for m in masks.values())
    assert abs(pruned / total - s) < 0.02  # ERK: per-leaf sparsities averaging s
    for path, w in kernels.items():
      assert (w[~masks[path]] == 0).all(), path
  elif recipe == "nm24":
    assert kernels
    for path, w in kernels.items():  # every group of 4 along the input axis keeps exactly 2
      groups = np.moveaxis(masks[path], -2, -1).reshape(-1, 4)
      assert (groups.sum(-1) == 2).all(), path
      assert (w[~masks[path]] == 0).all(), path
    if model == "cnn":  # the first conv reads 1 channel: 2:4 cannot fit, it stays dense
      assert "convs/0/kernel" in exp.structure_skipped
      assert not exp.where("convs/0/kernel", params["convs"][0]["kernel"])
  elif recipe == "channels":
    big_model = exp.trainer.model()
    x = train_data.batch(0)["x"]
    masked_out = models.eval_view(big_model)(x)
    exp.start_finetune(test_data)
    info_ = exp.shrink_info
    assert info_["params_after"] < info_["params_before"]
    assert info_["accuracy_shrunk"] == info_["accuracy_masked"]
    small = exp.trainer.model()
    # The RNN's carry is sized by its cell, so its GRU hidden units shrink too.
    tol = 1e-5 if model == "rnn" else 1e-4
    np.testing.assert_allclose(models.eval_view(small)(x), masked_out, rtol=tol, atol=tol)
    if model == "rnn":
      assert small.rnn.cell.hidden_features < big_model.rnn.cell.hidden_features
      assert small.hidden == small.rnn.cell.hidden_features == small.head.in_features
    metrics = jax.device_get(exp.trainer.train_step(train_data.batch(2)))
    assert np.isfinite(metrics["loss"])


