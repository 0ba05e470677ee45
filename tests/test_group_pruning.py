"""Tests for jaxprune.group_pruning: whole coupled channels pruned while training.

Exact counts of removed channels in every group (layerwise and global), pruned weights exactly
0 after Adam steps, masks that only shrink along the schedule, the same result with and
without jit, an NNX model with BatchNorm trained through nnx.Optimizer, masks that
``surgery.shrink`` turns into a smaller model with the same outputs, and the errors.
(The shared checks every transform passes are in tests/test_conformance.py.)
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_surgery import _mlp, _randn, _removed  # the MLP: hidden groups of 8 and 6 units

import jaxprune as jp
from jaxprune import surgery


def _conv():
  """Two 1-D convs (8 and 6 channels) and a dense head on the mean over time."""
  shapes = {"c1": (3, 2, 8), "c2": (3, 8, 6), "fc": (6, 4)}
  params = {k: _randn(10 + i, v) for i, (k, v) in enumerate(shapes.items())}

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1,), "SAME",
                                        dimension_numbers=("NWC", "WIO", "NWC"))

  def fn(p, x):
    h = jax.nn.relu(conv(x, p["c1"]))
    h = jax.nn.relu(conv(h, p["c2"]))
    return jnp.mean(h, axis=1) @ p["fc"]

  return fn, params


def _mlp_setup(sparsity, **kwargs):
  """The MLP, an input, and Adam chained with group pruning of the MLP's channel groups."""
  fn, params = _mlp()
  x = _randn(5, (6, 4))
  groups = surgery.channel_groups(fn, params, x)
  return fn, params, x, optax.chain(optax.adam(1e-2), jp.group_pruning(groups, sparsity, **kwargs))


def _train(fn, params, tx, x, steps, *, jit=True):
  y = jnp.arange(x.shape[0]) % 3

  def step(params, state):
    def loss(p):
      out = fn(p, x)
      return optax.softmax_cross_entropy_with_integer_labels(out[:, :3], y).mean()
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  state = tx.init(params)
  history = []
  for _ in range(steps):
    params, state = step(params, state)
    history.append(jp.masks_from_state(state))
  return params, state, history


# ----------------------------------------------------------------------------- exact counts

# (path, axis, group size) of the masked members: each hidden unit is a column of one kernel
# and a row of the next.
MLP_MEMBERS = [("w1", 1, 8), ("w2", 0, 8), ("w2", 1, 6), ("w3", 0, 6)]
CONV_MEMBERS = [("c1", 2, 8), ("c2", 1, 8), ("c2", 2, 6), ("fc", 0, 6)]


@pytest.mark.parametrize("model, members", [(_mlp, MLP_MEMBERS), (_conv, CONV_MEMBERS)])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_layerwise_removes_exactly_round_s_size_channels_per_group(model, members, sparsity):
  fn, params = model()
  x = _randn(5, (6, 4) if model is _mlp else (6, 5, 2))
  groups = surgery.channel_groups(fn, params, x)
  tx = optax.chain(optax.adam(1e-2), jp.group_pruning(groups, sparsity, update_every=2))
  params, state, _ = _train(fn, params, tx, x, 5)
  masks = jp.masks_from_state(state)
  for path, axis, size in members:
    assert _removed(masks, path, axis) == round(sparsity * size), (path, axis)
    w = np.asarray(params[path])
    assert np.all(w[~np.asarray(masks[path])] == 0.0), path  # pruned weights are exactly 0
    assert np.count_nonzero(w[np.asarray(masks[path])]) == np.asarray(masks[path]).sum()
  # A mask removes whole channels only: every entry of a kept channel survives.
  assert int((~np.asarray(masks[members[0][0]])).sum()) == (
      round(sparsity * members[0][2]) * (np.size(params[members[0][0]]) // members[0][2]))
  for path in params:  # biases (and any leaf no group masks) have the scalar mask True
    if np.ndim(params[path]) == 1:
      assert np.shape(masks[path]) == () and bool(masks[path])


def test_global_scope_removes_round_s_n_channels_over_all_groups():
  fn, params, x, tx = _mlp_setup(0.5, scope="global")
  _, state, _ = _train(fn, params, tx, x, 1)
  masks = jp.masks_from_state(state)
  first, second = _removed(masks, "w1", 1), _removed(masks, "w3", 0)
  assert first + second == round(0.5 * (8 + 6)) == 7
  assert _removed(masks, "w2", 0) == first and _removed(masks, "w2", 1) == second


def test_schedule_masks_only_shrink_and_reach_the_target():
  schedule = jp.polynomial_schedule(0.75, begin_step=0, end_step=6)
  fn, params, x, tx = _mlp_setup(schedule, update_every=2)
  _, _, history = _train(fn, params, tx, x, 10)
  for before, after in zip(history, history[1:]):
    for path in ("w1", "w2", "w3"):
      assert not np.any(np.asarray(after[path]) & ~np.asarray(before[path])), path
  counts = [_removed(m, "w1", 1) for m in history]
  assert counts == sorted(counts) and counts[0] == 0
  # Updated at steps 0, 2, 4, 6: the schedule's value then, rounded, in each group.
  assert [counts[t] for t in (0, 2, 4, 6)] == [round(float(schedule(t)) * 8) for t in (0, 2, 4, 6)]
  assert counts[-1] == 6 and _removed(history[-1], "w3", 0) == round(0.75 * 6)


def test_end_step_freezes_the_masks():
  schedule = jp.polynomial_schedule(0.75, begin_step=0, end_step=8)
  fn, params, x, tx = _mlp_setup(schedule, end_step=3)
  _, _, history = _train(fn, params, tx, x, 8)
  counts = [_removed(m, "w1", 1) for m in history]
  assert counts[3:] == [counts[2]] * 5 and counts[2] == round(float(schedule(2)) * 8)


def test_same_result_with_and_without_jit():
  fn, params, x, tx = _mlp_setup(jp.polynomial_schedule(0.5, begin_step=0, end_step=4),
                                 update_every=2)
  p_jit, s_jit, _ = _train(fn, params, tx, x, 6)
  p_eager, s_eager, _ = _train(fn, params, tx, x, 6, jit=False)
  for a, b in zip(jax.tree.leaves(jp.masks_from_state(s_jit)),
                  jax.tree.leaves(jp.masks_from_state(s_eager)), strict=True):
    np.testing.assert_array_equal(a, b)
  for path in params:
    np.testing.assert_allclose(p_jit[path], p_eager[path], rtol=1e-6, atol=1e-6, err_msg=path)
    pruned = ~np.asarray(jp.masks_from_state(s_jit)[path])
    assert np.all(np.asarray(p_eager[path])[pruned] == 0) and np.all(
        np.asarray(p_jit[path])[pruned] == 0)


def test_masks_shrink_to_a_smaller_model_with_the_same_outputs():
  fn, params = _conv()
  x = _randn(5, (6, 5, 2))
  groups = surgery.channel_groups(fn, params, x)
  tx = optax.chain(optax.adam(1e-2), jp.group_pruning(groups, 0.5))
  params, state, _ = _train(fn, params, tx, x, 3)
  masks = jp.masks_from_state(state)
  small = surgery.shrink(fn, params, masks, x)
  assert {k: v.shape for k, v in small.items()} == {"c1": (3, 2, 4), "c2": (3, 4, 3),
                                                    "fc": (3, 4)}
  np.testing.assert_allclose(fn(small, x), fn(params, x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- NNX


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(4, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
    self.fc2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.relu(self.bn(self.fc1(x))))


def test_nnx_optimizer_with_groups_traced_on_the_whole_state():
  # The groups also name BatchNorm statistics and biases; the optimizer's tree is the Params
  # only. Masks apply to the two kernels; 8 of the 16 hidden units go.
  model = _Net(nnx.Rngs(0))
  x = _randn(5, (6, 4))
  fn, state = surgery.module_fn(model)
  groups = surgery.channel_groups(fn, state, x)
  opt = nnx.Optimizer(model, optax.chain(optax.adam(1e-2), jp.group_pruning(groups, 0.5)),
                      wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    opt.update(model, grads)

  for _ in range(3):
    step(model, opt)
  masks = jp.masks_from_state(opt.opt_state)
  assert _removed(masks["fc1"]["kernel"], None, 1) == 8
  assert _removed(masks["fc2"]["kernel"], None, 0) == 8
  assert np.shape(masks["fc1"]["bias"]) == () and np.shape(masks["bn"]["scale"]) == ()
  kernel = np.asarray(model.fc1.kernel[...])
  assert np.all(kernel[~np.asarray(masks["fc1"]["kernel"])] == 0)
  small = surgery.shrink_module(model, masks, x)
  assert small.fc1.kernel.shape == (4, 8) and small.bn.mean.shape == (8,)
  np.testing.assert_allclose(small(x), model(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_bad_input_raises_naming_the_argument():
  fn, params = _mlp()
  x = _randn(5, (6, 4))
  groups = surgery.channel_groups(fn, params, x)
  unprunable = tuple(g for g in groups if not g.prunable)
  with pytest.raises(ValueError, match="groups: no group is prunable"):
    jp.group_pruning(unprunable, 0.5)
  with pytest.raises(ValueError, match="groups: expected the channel groups"):
    jp.group_pruning([1, 2], 0.5)
  with pytest.raises(ValueError, match="outside"):
    jp.group_pruning(groups, 1.5)
  with pytest.raises(ValueError, match="scope"):
    jp.group_pruning(groups, 0.5, scope="per_leaf")
  with pytest.raises(ValueError, match="update_every"):
    jp.group_pruning(groups, 0.5, update_every=0)
  tx = jp.group_pruning(groups, 0.5)
  with pytest.raises(ValueError, match="'w2', which params lacks"):
    tx.init({k: v for k, v in params.items() if k != "w2"})
  with pytest.raises(ValueError, match="'w1' axis 1 has length 5"):
    tx.init({**params, "w1": jnp.ones((4, 5))})
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))
