"""Every public pruning transform trains a 40-256-256-10 MLP on MNIST-1D to a stated accuracy.

MNIST-1D (Greydanus 2020) is generated locally with ``mnist1d.data.make_dataset`` (4000 train /
1000 test sequences of length 40, 10 classes; no download). Each transform trains for
``STEPS`` Adam steps (batch 128) and ends at exactly ``SPARSITY`` of the kernels pruned; the
test accuracy of the masked model must reach the bar in ``BARS``, set a little below what was
measured (the measured value is in the comment next to each bar).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp

SPARSITY = 0.9
STEPS = 1000
LR = 3e-3
# Measured on CPU (jax 0.10.2) with seeds 0 / 1 / 2; the test runs seed 0. The dense MLP with
# the same budget reaches 0.653 / 0.651 / 0.636.
BARS = {  # transform: test-accuracy bar  (measured, seeds 0 / 1 / 2)
    "magnitude": 0.60,                   # 0.638 / 0.651 / 0.632
    "magnitude_global": 0.60,            # 0.634 / 0.670 / 0.641
    "magnitude_straight_through": 0.44,  # 0.490 / 0.502 / 0.458
    "random": 0.46,                      # 0.525 / 0.492 / 0.512
    "saliency": 0.57,                    # 0.609 / 0.623 / 0.606
    "movement": 0.63,                    # 0.673 / 0.677 / 0.696
    "generic_pruning": 0.60,             # 0.643 / 0.656 / 0.631
    "set": 0.60,                         # 0.643 / 0.633 / 0.660
    "rigl": 0.59,                        # 0.650 / 0.616 / 0.641
    "group": 0.55,                       # 0.606 / 0.588 / 0.588 (whole units: 26 of 256 kept)
}


def _my_score(params, *, grads, key, where):
  del key, where
  return jax.tree.map(lambda p, g: jnp.abs(p) + jnp.abs(g), params, grads)


def make_tx(name):
  """The optimizer for one case (all use Adam at LR; pruning ends at 70% of training)."""
  if name == "dense":
    return optax.adam(LR)
  sched = jp.polynomial_schedule(SPARSITY, begin_step=STEPS // 10, end_step=STEPS * 7 // 10)
  every = STEPS // 40
  return {
      "magnitude": lambda: optax.chain(optax.adam(LR), jp.magnitude_pruning(
          sched, update_every=every)),
      "magnitude_global": lambda: optax.chain(optax.adam(LR), jp.magnitude_pruning(
          sched, update_every=every, scope="global")),
      "magnitude_straight_through": lambda: optax.chain(optax.adam(LR), jp.magnitude_pruning(
          sched, update_every=every, end_step=STEPS * 8 // 10, straight_through=True)),
      "random": lambda: optax.chain(optax.adam(LR), jp.random_pruning(
          sched, update_every=every, key=0)),
      "saliency": lambda: jp.saliency_pruning(optax.adam(LR), sched, update_every=every),
      "movement": lambda: jp.movement_pruning(optax.adam(LR), sched, update_every=every),
      "generic_pruning": lambda: jp.pruning(_my_score, sched, inner_tx=optax.adam(LR),
                                            update_every=every),
      "set": lambda: jp.set_training(optax.adam(LR), sparsity=SPARSITY, update_every=every * 2,
                                     end_step=STEPS * 8 // 10, key=0),
      "rigl": lambda: jp.rigl(optax.adam(LR), sparsity=SPARSITY, update_every=every * 2,
                              end_step=STEPS * 8 // 10, key=0),
      "group": lambda: optax.chain(optax.adam(LR), jp.group_pruning(
          jp.surgery.channel_groups(mlp, mlp_params(jax.random.key(0)), jnp.ones((1, 40))),
          sched, update_every=every)),
  }[name]()


@functools.cache
def mnist1d():
  from mnist1d.data import get_dataset_args, make_dataset
  data = make_dataset(get_dataset_args())
  return (jnp.asarray(data["x"], jnp.float32), jnp.asarray(data["y"], jnp.int32),
          jnp.asarray(data["x_test"], jnp.float32), jnp.asarray(data["y_test"], jnp.int32))


def mlp_params(key):
  sizes = [40, 256, 256, 10]
  keys = jax.random.split(key, len(sizes) - 1)
  return {f"dense{i}": {"kernel": jax.random.normal(k, (a, b)) * math.sqrt(2.0 / a),
                        "bias": jnp.zeros((b,))}
          for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))}


def mlp(params, x):
  for i in range(3):
    x = x @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"][None]
    if i < 2:
      x = jax.nn.relu(x)
  return x


def train(name, seed=0, batch=128):
  """Trains with the case's transform; returns (test accuracy, masks or None, params)."""
  x, y, xt, yt = mnist1d()
  tx = make_tx(name)
  straight_through = name == "magnitude_straight_through"
  params = mlp_params(jax.random.key(seed))
  state = tx.init(params)
  idx = jax.random.randint(jax.random.key(seed + 1), (STEPS, batch), 0, x.shape[0])

  def loss(p, xb, yb, state):
    if straight_through:
      p = jp.apply_masks_straight_through(p, jp.masks_from_state(state))
    return optax.softmax_cross_entropy_with_integer_labels(mlp(p, xb), yb).mean()

  @jax.jit
  def run(params, state):
    def body(carry, i):
      params, state = carry
      grads = jax.grad(loss)(params, x[i], y[i], state)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None
    (params, state), _ = jax.lax.scan(body, (params, state), idx)
    return params, state

  params, state = run(params, state)
  masks = None if name == "dense" else jp.masks_from_state(state)
  eval_params = params if masks is None else jp.apply_masks(params, masks)
  acc = float(jnp.mean(jnp.argmax(mlp(eval_params, xt), -1) == yt))
  return acc, masks, params


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BARS))
def test_mnist1d_accuracy(name):
  acc, masks, params = train(name)
  kernels = [k for k in masks]
  pruned = sum(int(np.sum(~np.asarray(masks[k]["kernel"]))) for k in kernels)
  total = sum(masks[k]["kernel"].size for k in kernels)
  if name in ("set", "rigl"):  # ERK: exact per layer, about SPARSITY overall
    erk = jp.erk_sparsities(params, SPARSITY)
    assert pruned == sum(round(erk[k]["kernel"] * masks[k]["kernel"].size) for k in kernels)
  elif name == "magnitude_global":
    assert pruned == round(SPARSITY * total)
  elif name == "group":  # round(0.9 * 256) = 230 of each hidden layer's 256 units removed
    kept = 256 - round(SPARSITY * 256)
    m = {k: np.asarray(masks[k]["kernel"]) for k in kernels}
    assert [int(m[k].any(axis=0).sum()) for k in kernels] == [kept, kept, 10]
    assert [int(m[k].any(axis=1).sum()) for k in kernels] == [40, kept, kept]
    assert pruned == total - (40 * kept + kept * kept + kept * 10)
  else:
    assert pruned == sum(round(SPARSITY * masks[k]["kernel"].size) for k in kernels)
  if name != "magnitude_straight_through":
    for k in kernels:
      assert np.all(np.asarray(params[k]["kernel"])[~np.asarray(masks[k]["kernel"])] == 0)
  assert acc >= BARS[name], f"{name}: test accuracy {acc:.3f} < bar {BARS[name]}"
