"""Tests for train/models.py: shapes, one jitted training step, BatchNorm modes, bad input,
hashable graphdefs, and RNN hidden units that surgery can shrink."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import surgery
from train import models

SEQ, IMG = (40,), (8, 8, 1)
NAMES = sorted(models.MODELS)
# Small configurations for the tests that compile (every code path, fewer ops to compile).
SMALL = {"mlp": dict(hidden=(16,)), "cnn": dict(features=(4, 4), kernel_sizes=(3, 3)),
         "rnn": dict(hidden=8), "resnet": dict(widths=(4, 8)),
         "transformer": dict(dim=8, depth=1, num_heads=2)}


def _rngs(seed=0):
  # "rbg" keys: the same model code, but initializers compile ~4x faster than with threefry on
  # CPU (each new kernel shape compiles its own random-number program).
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _small(name, shape, seed=0):
  return models.create_model(name, input_shape=shape, num_classes=10, rngs=_rngs(seed),
                             **SMALL[name])


def _batch(shape, n=8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, *shape)).astype(np.float32)
  y = (np.arange(n) % 10).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


_jit_call = nnx.jit(lambda model, x: model(x))


@nnx.jit
def _train_step(model, opt, x, y):
  loss, grads = nnx.value_and_grad(_loss)(model, x, y)
  opt.update(model, grads)
  return loss


def _params(model):
  return {"/".join(map(str, path)): np.asarray(v[...])
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _batch_stats(model):
  return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]


CONFIGS = [(n, {}) for n in NAMES] + [("rnn", {"cell": "lstm"})]


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=[n + "-" + "-".join(k.values())
                                                        for n, k in CONFIGS])
@pytest.mark.parametrize("shape", [SEQ, (40, 2), (28, 28, 1)], ids=["seq", "seq2ch", "image"])
def test_output_shape_and_dtype(name, kwargs, shape):
  # Default configurations, traced abstractly (no compile): logits are (batch, num_classes).
  model = nnx.eval_shape(lambda: models.create_model(
      name, input_shape=shape, num_classes=10, rngs=nnx.Rngs(0), **kwargs))
  x = jax.ShapeDtypeStruct((3, *shape), jnp.float32)
  for m in (model, models.eval_view(model)):
    logits = nnx.eval_shape(lambda m, x: m(x), m, x)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32


# Every model on sequences; the image code paths (2-D convs, 2-D patches) of the CNN and the
# Transformer. (Compiling costs ~1-3 s of CPU per case; shapes of all cases are checked above.)
STEP_CASES = [(n, SEQ, {}) for n in NAMES] + [("cnn", IMG, {}), ("transformer", IMG, {})]


@pytest.mark.parametrize("name, shape, kwargs", STEP_CASES)
def test_jitted_step_changes_every_param_and_lowers_loss(name, shape, kwargs):
  model = models.create_model(name, input_shape=shape, num_classes=10, rngs=_rngs(),
                              **{**SMALL[name], **kwargs})
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  train_model, eval_model = models.train_view(model), models.eval_view(model)
  x, y = _batch(shape)
  before = _params(model)
  loss0 = float(_train_step(train_model, opt, x, y))
  after = _params(model)
  assert before.keys() == after.keys()
  unchanged = [k for k in before if np.array_equal(before[k], after[k])]
  assert not unchanged, f"params not updated: {unchanged}"
  loss1 = float(_train_step(train_model, opt, x, y))  # the loss before the 2nd update
  assert np.isfinite(loss0) and loss1 < loss0
  # The eval view shares the Variables: it sees the new weights without any copying.
  assert eval_model.head.kernel is model.head.kernel
  assert int(opt.step[...]) == 2


@pytest.mark.parametrize("name, shape", [("cnn", SEQ), ("cnn", IMG), ("resnet", SEQ)])
def test_batchnorm_running_stats_update_only_in_train_mode(name, shape):
  model = _small(name, shape)
  x, y = _batch(shape)
  stats0 = _batch_stats(model)
  assert stats0, "model has no BatchNorm statistics"

  eval_model = models.eval_view(model)
  eval_out = _jit_call(eval_model, x)
  assert all(np.array_equal(a, b) for a, b in zip(stats0, _batch_stats(model), strict=True))
  # Eval mode normalizes each example alone: the output of a row does not depend on the batch.
  np.testing.assert_allclose(np.asarray(_jit_call(eval_model, x[:2])), np.asarray(eval_out[:2]),
                             rtol=1e-5, atol=1e-5)

  train_out = _jit_call(models.train_view(model), x)
  stats1 = _batch_stats(model)
  assert all(not np.array_equal(a, b) for a, b in zip(stats0, stats1, strict=True))
  assert not np.allclose(np.asarray(train_out), np.asarray(eval_out))

  # Inside a jitted training step too; and model.eval() (in place) freezes them like the view.
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  _train_step(model, opt, x, y)  # model was built in train mode
  stats2 = _batch_stats(model)
  assert all(not np.array_equal(a, b) for a, b in zip(stats1, stats2, strict=True))
  model.eval()
  _jit_call(model, x)
  assert all(np.array_equal(a, b) for a, b in zip(stats2, _batch_stats(model), strict=True))


def test_mode_views_and_in_place_switching_agree():
  model = _small("cnn", SEQ, seed=1)
  x, _ = _batch(SEQ)
  _jit_call(models.train_view(model), x)  # move the running stats away from their init
  via_view = np.asarray(_jit_call(models.eval_view(model), x))
  assert model.bns[0].use_running_average is False  # the view did not change the model
  model.eval()
  np.testing.assert_array_equal(np.asarray(_jit_call(model, x)), via_view)
  model.train()
  assert model.bns[0].use_running_average is False


def test_mlp_layer_paths_and_defaults():
  model = nnx.eval_shape(
      lambda: models.create_model("mlp", input_shape=SEQ, num_classes=10, rngs=nnx.Rngs(0)))
  shapes = {"/".join(map(str, path)): v.shape
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert shapes == {"layers/0/kernel": (40, 100), "layers/0/bias": (100,),
                    "layers/1/kernel": (100, 100), "layers/1/bias": (100,),
                    "head/kernel": (100, 10), "head/bias": (10,)}


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_rnn_keeps_no_rng_state(cell):
  model = nnx.eval_shape(lambda: models.create_model(
      "rnn", input_shape=SEQ, num_classes=10, rngs=nnx.Rngs(0), cell=cell))
  # Only parameters: no RNG keys or counters that would change on every call.
  assert jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param))) == []


def test_same_seed_same_model():
  a, b = _small("transformer", SEQ, seed=3), _small("transformer", SEQ, seed=3)
  pa, pb = _params(a), _params(b)
  assert all(np.array_equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("name, shape, kwargs, match", [
    ("vgg", SEQ, {}, "name"),
    ("mlp", (), {}, "mlp/input_shape"),
    ("cnn", (1, 2, 3, 4), {}, "cnn/input_shape"),
    ("cnn", (2,), {}, "cnn/input_shape"),
    ("cnn", SEQ, {"features": (8,), "kernel_sizes": (3, 3)}, "cnn/kernel_sizes"),
    ("rnn", SEQ, {"cell": "vanilla"}, "rnn/cell"),
    ("transformer", (42,), {}, "transformer/patch"),
    ("transformer", SEQ, {"dim": 30, "num_heads": 4}, "transformer/num_heads"),
])
def test_bad_arguments_raise(name, shape, kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.create_model(name, input_shape=shape, num_classes=10, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_graphdef_is_hashable(name):
  # A graphdef is a static argument of jitted functions (jax.jit(..., static_argnums)): every
  # model's, in both modes, must hash, and equal models' graphdefs must be equal with one hash.
  make = lambda: nnx.eval_shape(lambda: models.create_model(
      name, input_shape=IMG if name == "cnn" else SEQ, num_classes=10, rngs=nnx.Rngs(0)))
  a, b = make(), make()
  for view in (lambda m: m, models.eval_view):
    da, db = nnx.graphdef(view(a)), nnx.graphdef(view(b))
    assert da == db and hash(da) == hash(db)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_rnn_hidden_units_shrink(cell):
  # The carry is sized by the cell (not a copy of `hidden`), so surgery can remove hidden units.
  model = models.eval_view(models.create_model(
      "rnn", input_shape=SEQ, num_classes=10, rngs=_rngs(), hidden=8, cell=cell))
  x, _ = _batch(SEQ, n=4)
  fn, state = surgery.module_fn(model)
  groups = [g for g in surgery.channel_groups(fn, state, x) if g.prunable]
  assert [(g.name.split("/")[-2], g.size) for g in groups] == [
      ("dense_i" if cell == "gru" else "ii", 8)]
  masks = surgery.group_masks(groups, state, 0.5)
  small = surgery.shrink_module(model, masks, x)
  masked = nnx.merge(nnx.graphdef(model), jp.apply_masks(state, masks))
  other, _ = _batch((24,), n=3, seed=1)  # another batch size and sequence length
  np.testing.assert_allclose(np.asarray(_jit_call(small, other)),
                             np.asarray(_jit_call(masked, other)), rtol=1e-5, atol=1e-5)
  assert small.hidden == small.rnn.cell.hidden_features == small.head.in_features == 4
  count = lambda m: sum(np.size(v) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(small) < count(model)
