"""Tests for train/checkpointing.py (the orbax V1 adapter)."""

import os
import subprocess
import sys
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from train import checkpointing, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (40,)


class MaskState(NamedTuple):
  """Shaped like a jaxprune transform state: int32 count, bool masks (0-d for unpruned)."""
  count: jax.Array
  masks: optax.Params


def _masking() -> optax.GradientTransformation:
  """Keeps pruned weights at zero; masks: bool arrays for ndim >= 2, scalar True otherwise."""

  def init(params):
    masks = jax.tree.map(
        lambda p: jnp.abs(p) > 0.05 if p.ndim >= 2 else jnp.array(True), params)
    return MaskState(jnp.zeros([], jnp.int32), masks)

  def update(updates, state, params=None):
    updates = jax.tree.map(lambda u, m, p: jnp.where(m, u, -p), updates, state.masks, params)
    return updates, MaskState(optax.safe_increment(state.count), state.masks)

  return optax.GradientTransformation(init, update)


def _make(seed=0):
  rngs = nnx.Rngs(jax.random.key(seed, impl="rbg"))  # rbg: initializers compile faster on CPU
  model = models.create_model("cnn", input_shape=SHAPE, num_classes=10, rngs=rngs,
                              features=(4, 4), kernel_sizes=(3, 3))
  opt = nnx.Optimizer(model, optax.chain(optax.adam(1e-2), _masking()), wrt=nnx.Param)
  return model, opt


@nnx.jit
def _step(model, opt, x, y):
  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  opt.update(model, grads)
  return loss


def _data():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(8, *SHAPE)).astype(np.float32)),
          jnp.asarray(np.arange(8) % 10, jnp.int32))


def _state(model, opt, step):
  # "opt" is the optimizer as NNX stores it (NamedTuples become State nodes); "opt_state" is
  # the raw optax state, where the NamedTuples are kept.
  return {"model": nnx.state(model), "opt": nnx.state(opt),
          "opt_state": nnx.as_pure(opt.opt_state), "step": step,
          "data": {"seed": 3, "rng": np.array([7, 8, 9, 2**32 - 1], np.uint32)}}


def _abstract():
  abs_model, abs_opt = nnx.eval_shape(_make)
  return {"model": nnx.state(abs_model), "opt": nnx.state(abs_opt),
          "opt_state": nnx.as_pure(abs_opt.opt_state), "step": 0,
          "data": {"seed": 0, "rng": np.zeros(4, np.uint32)}}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
    if isinstance(x, (jax.Array, np.ndarray)):
      assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def trained():
  model, opt = _make()
  x, y = _data()
  for _ in range(3):
    _step(model, opt, x, y)
  return model, opt


def test_round_trip_into_eval_shape_abstract(tmp_path, trained):
  model, opt = trained
  state = _state(model, opt, step=3)
  with checkpointing.Checkpoints(tmp_path) as ckpts:
    assert ckpts.latest_step() is None
    assert ckpts.save(3, state)
    assert ckpts.latest_step() == 3
  with checkpointing.Checkpoints(tmp_path) as ckpts:  # a new process would do this
    restored = ckpts.restore(_abstract())
  _assert_trees_equal(restored, state)
  assert restored["step"] == 3 and type(restored["step"]) is int
  assert isinstance(restored["data"]["rng"], np.ndarray)
  assert restored["data"]["rng"].dtype == np.uint32

  # The NamedTuple survives with its int32 count and bool masks, incl. 0-d bool leaves.
  adam_state, mask_state = restored["opt_state"]
  assert isinstance(mask_state, MaskState) and isinstance(adam_state[0], optax.ScaleByAdamState)
  assert adam_state[0].count.dtype == jnp.int32 and int(adam_state[0].count) == 3
  assert mask_state.count.dtype == jnp.int32 and int(mask_state.count) == 3
  masks = jax.tree.leaves(mask_state.masks)
  assert all(m.dtype == jnp.bool_ for m in masks)
  scalars = [m for m in masks if m.shape == ()]
  arrays = [m for m in masks if m.ndim >= 2]
  assert scalars and arrays and all(bool(m) for m in scalars)
  assert any(not bool(m.all()) for m in arrays)  # real masks with False entries


def test_restored_run_continues_identically(tmp_path, trained):
  model, opt = trained
  x, y = _data()
  with checkpointing.Checkpoints(tmp_path) as ckpts:
    ckpts.save(3, _state(model, opt, step=3))
    restored = ckpts.restore(_abstract())
  model2, opt2 = _make(seed=1)  # different init: everything must come from the checkpoint
  nnx.update(model2, restored["model"])
  nnx.update(opt2, restored["opt"])
  np.testing.assert_array_equal(np.asarray(models.eval_view(model2)(x)),
                                np.asarray(models.eval_view(model)(x)))
  ref_model, ref_opt = nnx.clone(model), nnx.clone(opt)  # continue the original run
  for _ in range(2):
    _step(ref_model, ref_opt, x, y)
    _step(model2, opt2, x, y)
  _assert_trees_equal(nnx.state(model2), nnx.state(ref_model))
  _assert_trees_equal(nnx.state(opt2), nnx.state(ref_opt))
  kernel = np.asarray(model2.convs[0].kernel[...])
  mask = np.asarray(restored["opt_state"][1].masks["convs"][0]["kernel"])
  assert (kernel[~mask] == 0).all()  # pruned weights stayed at exactly zero after resuming


def test_every_and_force(tmp_path):
  tree = {"w": jnp.arange(4.0), "flag": jnp.array(False)}
  with checkpointing.Checkpoints(tmp_path, every=3) as ckpts:
    saved = [ckpts.save(s, tree) for s in range(8)]
    assert saved == [True, False, False, True, False, False, True, False]
    assert ckpts.save(7, tree, force=True)
    assert not ckpts.save(7, tree, force=True)  # an existing step is not rewritten
    assert ckpts.steps() == [0, 3, 6, 7] and ckpts.latest_step() == 7


def test_keep_preserves_latest_n_and_restore_by_step(tmp_path):
  with checkpointing.Checkpoints(tmp_path, keep=2) as ckpts:
    for s in range(6):
      ckpts.save(s, {"w": jnp.full((3,), float(s)), "step": s})
    ckpts.wait()
    assert ckpts.steps() == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]
    old = ckpts.restore({"w": jnp.zeros(3), "step": 0}, step=4)
    assert old["step"] == 4 and old["w"].tolist() == [4.0, 4.0, 4.0]
    with pytest.raises(FileNotFoundError, match="step"):
      ckpts.restore({"w": jnp.zeros(3), "step": 0}, step=1)
  with checkpointing.Checkpoints(tmp_path, keep=2) as ckpts:
    assert ckpts.latest_step() == 5
    assert ckpts.restore({"w": jnp.zeros(3), "step": 0})["step"] == 5


def test_restore_without_checkpoint_raises(tmp_path):
  with checkpointing.Checkpoints(tmp_path) as ckpts:
    with pytest.raises(FileNotFoundError):
      ckpts.restore({"w": jnp.zeros(3)})


@pytest.mark.parametrize("kwargs, match", [(dict(every=0), "every"), (dict(keep=0), "keep")])
def test_bad_arguments_raise(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    checkpointing.Checkpoints(tmp_path, **kwargs)


def test_restore_keeps_shardings(tmp_path):
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  w = jax.device_put(jnp.arange(8.0), sharding)
  with checkpointing.Checkpoints(tmp_path) as ckpts:
    ckpts.save(0, {"w": w})
    restored = ckpts.restore({"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)})
  assert restored["w"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(8.0))


def test_abstract_like():
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[1])
  tree = {"a": jnp.zeros((2, 3), jnp.bfloat16), "b": jax.ShapeDtypeStruct((4,), jnp.int32),
          "c": np.ones(2, np.uint8), "d": 5, "e": 0.5}
  out = checkpointing.abstract_like(tree, default_sharding=sharding)
  assert out["a"] == jax.ShapeDtypeStruct((2, 3), jnp.bfloat16, sharding=tree["a"].sharding)
  assert out["b"].sharding == sharding and out["b"].shape == (4,)
  assert out["c"] is tree["c"] and out["d"] == 5 and out["e"] == 0.5


def test_sigkill_mid_save_restores_previous_checkpoint(tmp_path):
  # The child saves step 1, then is SIGKILLed inside the save of step 2 after every file is
  # written but before orbax commits (renames) the step directory.
  code = f"""
    import os, signal
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from train import checkpointing
    with checkpointing.Checkpoints({str(tmp_path)!r}) as ckpts:
      ckpts.save(1, {{"w": jnp.full((256,), 1.0), "step": 1}})
      async def killed(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
      atomicity.AtomicRenameTemporaryPath.finalize = killed
      atomicity.CommitFileTemporaryPath.finalize = killed
      ckpts.save(2, {{"w": jnp.full((256,), 2.0), "step": 2}})
    print("save returned")
  """
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=300)
  assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])
  assert "save returned" not in proc.stdout
  leftovers = sorted(os.listdir(tmp_path))
  assert "1" in leftovers and "2" not in leftovers
  assert any(name.startswith("2.") for name in leftovers)  # the uncommitted temporary dir

  with checkpointing.Checkpoints(tmp_path) as ckpts:
    assert ckpts.steps() == [1] and ckpts.latest_step() == 1
    restored = ckpts.restore({"w": jnp.zeros(256), "step": 0})
    assert restored["step"] == 1 and bool((restored["w"] == 1.0).all())
    assert sorted(os.listdir(tmp_path)) == ["1"]  # the temporary dir was cleaned up
    assert ckpts.save(2, {"w": jnp.full((256,), 3.0), "step": 2})
    assert ckpts.restore({"w": jnp.zeros(256), "step": 0})["step"] == 2
