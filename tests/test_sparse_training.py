"""Tests for jaxprune.sparse_training: SET and RigL.

Connectivity changes over training while every leaf stays at exactly its target sparsity; RigL
drops the smallest active weights and grows the largest dense gradients (constructed cases);
SET grows at random; grown weights start at 0 with their inner-optimizer state reset, found
generically for any optax optimizer.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"l1": {"kernel": jax.random.normal(k1, (12, 16)), "bias": jnp.zeros(16)},
          "l2": {"kernel": jax.random.normal(k2, (16, 4)), "bias": jnp.zeros(4)}}


X = jax.random.normal(jax.random.key(5), (24, 12))


def _loss(p):
  h = jax.nn.relu(X @ p["l1"]["kernel"] + p["l1"]["bias"][None])
  return jnp.mean((h @ p["l2"]["kernel"] + p["l2"]["bias"][None]) ** 2)


@pytest.mark.parametrize("factory", [jp.rigl, jp.set_training])
def test_connectivity_changes_sparsity_never_moves(factory):
  params = _params()
  tx = factory(optax.adam(1e-2), sparsity=0.8, update_every=3, end_step=15, key=4)
  state = tx.init(params)
  erk = jp.erk_sparsities(params, 0.8)
  target = {k: round(erk[k]["kernel"] * params[k]["kernel"].size) for k in ("l1", "l2")}

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(_loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  prev = jp.masks_from_state(state)
  changed_at = []
  for t in range(24):
    params, state = step(params, state)
    masks = jp.masks_from_state(state)
    for k in ("l1", "l2"):
      m = np.asarray(masks[k]["kernel"])
      assert (~m).sum() == target[k], (t, k)                 # exact at every step
      assert np.all(np.asarray(params[k]["kernel"])[~m] == 0), (t, k)
    moved = sum(int(np.sum(np.asarray(masks[k]["kernel"]) != np.asarray(prev[k]["kernel"])))
                for k in ("l1", "l2"))
    if moved:
      changed_at.append(t)
    prev = masks
  assert changed_at and set(changed_at) <= {3, 6, 9, 12}    # only at update steps < end_step


def _constructed_rigl(grads_row1, key=None, grow="rigl"):
  """One leaf (2, 4), 4 active at flat 0, 2, 4, 6 with |w| 5, 3, 0.1, 4; k = 2 per update."""
  w = jnp.array([[5.0, 0.0, 3.0, 0.0], [0.1, 0.0, 4.0, 0.0]])
  params = {"w": w}
  factory = jp.rigl if grow == "rigl" else jp.set_training
  tx = factory(optax.sgd(0.1), sparsity=0.5, update_every=1, end_step=100,
               drop_fraction=lambda t: 0.5, distribution="uniform", key=key)
  masks = {"w": jnp.array([[True, False, True, False], [True, False, True, False]])}
  state = jp.replace_masks(tx.init(params), masks)
  _, state = tx.update({"w": jnp.zeros((2, 4))}, state, params)   # count 0: no update
  grads = {"w": jnp.array(grads_row1)}
  updates, state = tx.update(grads, state, params)                 # count 1: drop and grow
  return optax.apply_updates(params, updates), state


def test_rigl_grows_largest_gradient():
  # Drop: the 2 smallest active, w[1,0] = 0.1 and w[0,2] = 3. Grow: the 2 largest |g| among
  # the rest (just-dropped included): g[1,3] = 9 and g[0,3] = 7.
  params, state = _constructed_rigl([[0.0, 1.0, 0.2, 7.0], [0.2, 0.5, 0.0, -9.0]])
  np.testing.assert_array_equal(state.masks["w"], [[True, False, False, True],
                                                   [False, False, True, True]])
  np.testing.assert_allclose(params["w"], [[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0]])
  # The grown weights start at 0 (no update applied to them at the growth step).
  assert params["w"][0, 3] == 0 and params["w"][1, 3] == 0


def test_rigl_regrowing_a_just_dropped_weight_keeps_it():
  """RigL's Algorithm 1 grows among all connections not kept, the just-dropped included; one
  that is dropped and grown again keeps its weight and is updated like any active weight."""
  params, state = _constructed_rigl([[0.0, 1.0, 10.0, 7.0], [0.2, 0.5, 0.0, -9.0]])
  np.testing.assert_array_equal(state.masks["w"], [[True, False, True, False],
                                                   [False, False, True, True]])
  np.testing.assert_allclose(params["w"], [[5.0, 0.0, 2.0, 0.0], [0.0, 0.0, 4.0, 0.0]])


def test_set_grows_at_random_among_free_connections():
  grown = []
  for key in range(6):
    params, state = _constructed_rigl([[0.0, 1.0, 0.2, 7.0], [0.2, 0.5, 0.0, -9.0]], key=key,
                                      grow="set")
    m = np.asarray(state.masks["w"])
    assert m.sum() == 4 and m[0, 0] and m[1, 2]              # the two largest stay
    assert np.all(np.asarray(params["w"])[~m] == 0)
    grown.append(tuple(np.flatnonzero(m.ravel() & ~np.array([1, 0, 0, 0, 0, 0, 1, 0], bool))))
  assert len(set(grown)) > 1                                  # depends on the key


# ----------------------------------------------------------------------------- inner optimizers

INNER = {
    "adam": lambda: optax.adam(1e-2),
    "lion": lambda: optax.lion(1e-3),
    "adafactor": lambda: optax.adafactor(1e-2),
    "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
    "inject_adamw": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2),
}


def _param_like_leaves(inner_tx, inner_state):
  """The leaves of the parts of ``inner_state`` shaped like the params (via map_params)."""
  marked = optax.tree.map_params(inner_tx, lambda x: ("P", x), inner_state,
                                 transform_non_params=lambda x: ("N", x))
  pairs = jax.tree.leaves(marked, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
                          and x[0] in ("P", "N"))
  return [x for tag, x in pairs if tag == "P"]


@pytest.mark.parametrize("name", list(INNER))
def test_reset_inner_state_is_generic(name):
  inner = INNER[name]()
  params = {"w": jnp.ones((128, 130)), "b": jnp.ones(130)}
  state = optax.tree.map_params(inner, jnp.ones_like, inner.init(params))  # nonzero moments
  reset = {"w": jnp.zeros((128, 130), bool).at[3, 4].set(True), "b": jnp.zeros((), bool)}
  new = jp.reset_inner_state(inner, state, reset)
  before = _param_like_leaves(inner, state)
  after = _param_like_leaves(inner, new)
  reset_any = False
  for a, b in zip(before, after, strict=True):
    if np.shape(a) == (128, 130):
      assert b[3, 4] == 0 and b[3, 5] == a[3, 5] and b[0, 0] == a[0, 0]
      reset_any = True
    else:  # other leaves (biases, Adafactor's factored row/column statistics) are untouched
      chex.assert_trees_all_equal(a, b)
  assert reset_any == (name != "adafactor")  # adafactor factors a 128x130 kernel: no v
  same = jax.tree.map(lambda x: x, state)
  chex.assert_trees_all_equal(jax.tree.structure(new), jax.tree.structure(same))


@pytest.mark.parametrize("name", list(INNER))
def test_rigl_with_any_inner_optimizer(name):
  """RigL trains exactly sparse with each inner optimizer, and a connection it grows enters the
  step's inner update with a zero state and a zero gradient in every param-shaped part of the
  inner state: right after growing it holds exactly what the optimizer makes of those (0 for
  every optimizer here but Adafactor, whose second moment becomes (1 - decay) * eps)."""
  inner = INNER[name]()
  params = _params()
  tx = jp.rigl(inner, sparsity=0.75, update_every=2, end_step=20, distribution="uniform")
  state = tx.init(params)
  # Give the inner state nonzero entries everywhere, so that a reset is visible.
  state = state._replace(inner_state=optax.tree.map_params(
      inner, lambda x: jnp.full_like(x, 0.5), state.inner_state))
  update = jax.jit(tx.update)
  for t in range(5):
    old, before = jp.masks_from_state(state), state.inner_state
    updates, state = update(jax.grad(_loss)(params), state, params)
    params = optax.apply_updates(params, updates)
    masks = jp.masks_from_state(state)
    for k in ("l1", "l2"):
      m = np.asarray(masks[k]["kernel"])
      assert (~m).sum() == round(0.75 * m.size)
      assert np.all(np.asarray(params[k]["kernel"])[~m] == 0)
    if t == 2:  # an update step
      grown = np.asarray(masks["l1"]["kernel"]) & ~np.asarray(old["l1"]["kernel"])
      assert grown.any()
      # What the optimizer makes of a zero state and a zero gradient, at this step's count.
      zero_state = optax.tree.map_params(inner, jnp.zeros_like, before)
      _, fresh = inner.update(jax.tree.map(jnp.zeros_like, params), zero_state, params)
      reset_any = False
      for leaf, ref in zip(_param_like_leaves(inner, state.inner_state),
                           _param_like_leaves(inner, fresh), strict=True):
        if np.shape(leaf) == (12, 16):
          np.testing.assert_array_equal(np.asarray(leaf)[grown], np.asarray(ref)[grown])
          if name != "adafactor":
            assert np.all(np.asarray(leaf)[grown] == 0), name
          assert np.any(np.asarray(leaf)[~grown] != np.asarray(ref)[~grown]), name
          reset_any = True
      assert reset_any


# ----------------------------------------------------------------------------- schedule, input

def test_cosine_drop_fraction():
  f = jp.cosine_drop_fraction(0.3, end_step=100)
  t = np.arange(0, 120, 10)
  want = np.where(t < 100, 0.15 * (1 + np.cos(np.pi * t / 100)), 0.0)
  np.testing.assert_allclose(jax.vmap(f)(jnp.asarray(t)), want, atol=1e-6)


@pytest.mark.parametrize("make, message", [
    (functools.partial(jp.rigl, sparsity=1.0, update_every=1, end_step=10), "sparsity"),
    (functools.partial(jp.rigl, sparsity=0.5, update_every=0, end_step=10), "update_every"),
    (functools.partial(jp.rigl, sparsity=0.5, update_every=1, end_step=0), "end_step"),
    (functools.partial(jp.set_training, sparsity=0.5, update_every=1, end_step=10,
                       drop_fraction=1.5), "drop_fraction"),
    (functools.partial(jp.set_training, sparsity=0.5, update_every=1, end_step=10,
                       distribution="normal"), "distribution"),
])
def test_bad_arguments_raise(make, message):
  with pytest.raises(ValueError, match=message):
    make(optax.sgd(0.1))
