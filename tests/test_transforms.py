"""Tests for jaxprune.transforms (pruning while training) and jaxprune.rewinding.

What each transform must do beyond the shared conformance suite: gradual schedules give exact,
monotone masks; the chain-position rule; structures and global scope; gradient criteria see the
raw gradients; movement accumulates; straight-through keeps params dense and lets weights come
back; masks can be found in and put into any nested state; lottery-ticket rewinding; global
magnitude pruning on params sharded over 8 devices; and the README section's examples run.
"""
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT, run_with_devices

import jaxprune as jp
from jaxprune import _checks


def _params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"a": {"kernel": jax.random.normal(k1, (12, 10)), "bias": jnp.zeros(10)},
          "b": {"kernel": jax.random.normal(k2, (10, 6)), "bias": jnp.zeros(6)}}


def _pruned(masks, leaf):
  return int(np.sum(~np.asarray(masks[leaf]["kernel"])))


def _run(tx, params, steps, grads_fn=None):
  """Eager training loop: returns params, state and the masks after every step."""
  state = tx.init(params)
  history = []
  for _ in range(steps):
    grads = grads_fn(params) if grads_fn else jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(jp.masks_from_state(state))
  return params, state, history


# ----------------------------------------------------------------------------- magnitude

def test_gradual_schedule_exact_and_monotone():
  """At each update step every kernel holds exactly round(s(t)·n) pruned weights; masks only
  shrink; between update steps they do not change."""
  schedule = jp.polynomial_schedule(0.8, begin_step=2, end_step=12)
  tx = optax.chain(optax.sgd(0.05), jp.magnitude_pruning(schedule, update_every=3))
  params, _, history = _run(tx, _params(), 16, grads_fn=lambda p: jax.tree.map(jnp.sign, p))
  for t, masks in enumerate(history):
    last_update = t - t % 3
    s = float(schedule(last_update))
    for leaf, n in (("a", 120), ("b", 60)):
      assert _pruned(masks, leaf) == round(s * n), (t, leaf)
      if t:
        prev = np.asarray(history[t - 1][leaf]["kernel"])
        assert not np.any(np.asarray(masks[leaf]["kernel"]) & ~prev), "a pruned weight returned"
  assert _pruned(history[-1], "a") == 96 and _pruned(history[-1], "b") == 48
  assert np.all(np.asarray(params["a"]["kernel"])[~np.asarray(history[-1]["a"]["kernel"])] == 0)


def test_magnitude_prunes_smallest_current_weights():
  params = {"w": jnp.array([[0.5, -4.0, 0.1], [3.0, -0.2, 2.0]])}
  tx = jp.magnitude_pruning(0.5)
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_array_equal(state.masks["w"], [[False, True, False], [True, False, True]])
  np.testing.assert_array_equal(optax.apply_updates(params, updates)["w"],
                                [[0.0, -4.0, 0.0], [3.0, 0.0, 2.0]])


def test_chain_position_rule():
  """Last in the chain: pruned weights land on exactly 0. Before the learning-rate scaling the
  transform's ``-p`` is rescaled and they do not (which is why it must go last), and the next
  update says so (it used to go on silently: issue 13)."""
  params = _params()
  grads_fn = lambda p: jax.tree.map(jnp.sign, p)
  last = optax.chain(optax.adam(0.1), jp.magnitude_pruning(0.5))
  p_last, _, h = _run(last, params, 3, grads_fn)
  assert np.all(np.asarray(p_last["a"]["kernel"])[~np.asarray(h[-1]["a"]["kernel"])] == 0)
  first = optax.chain(jp.magnitude_pruning(0.5), optax.adam(0.1))
  p_first, state, h = _run(first, params, 1, grads_fn)
  assert np.all(np.asarray(p_first["a"]["kernel"])[~np.asarray(h[-1]["a"]["kernel"])] != 0)
  with pytest.raises(_checks.RUNTIME_ERRORS, match="inner_tx=optax.chain"):
    jax.block_until_ready(first.update(grads_fn(p_first), state, p_first))


def test_sparsity_zero_is_identity():
  params = _params()
  tx = optax.chain(optax.adam(0.1), jp.magnitude_pruning(0.0))
  ref = optax.adam(0.1)
  grads = jax.tree.map(jnp.sign, params)
  u, state = tx.update(grads, tx.init(params), params)
  u_ref, _ = ref.update(grads, ref.init(params), params)
  chex.assert_trees_all_equal(u, u_ref)
  assert all(bool(jnp.all(m)) for m in jax.tree.leaves(jp.masks_from_state(state)))


def test_global_scope_exact_total_uneven_layers():
  params = {"a": {"kernel": jnp.arange(1.0, 101.0).reshape(10, 10)},
            "b": {"kernel": jnp.arange(1.0, 51.0).reshape(10, 5) * 10}}
  tx = jp.magnitude_pruning(0.6, scope="global")
  _, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  pruned = {k: _pruned(state.masks, k) for k in params}
  assert sum(pruned.values()) == 90
  assert pruned == {"a": 82, "b": 8}  # one threshold (82): a loses 82 of 100, b 8 of 50


@pytest.mark.parametrize("structure, check", [
    (jp.n_of_m(2, 4), lambda m: np.all(m.reshape(3, 4, 10).sum(axis=1) == 2)),
    (jp.channels(), lambda m: set(m.all(axis=0) | ~m.any(axis=0)) == {True}
     and (~m.any(axis=0)).sum() == 5),
])
def test_structures(structure, check):
  params = {"w": jax.random.normal(jax.random.key(1), (12, 10))}
  tx = optax.chain(optax.sgd(0.1), jp.magnitude_pruning(0.5, structure=structure))
  p, state, _ = _run(tx, params, 4)
  m = np.asarray(state[1].masks["w"])
  assert check(m)
  assert np.all(np.asarray(p["w"])[~m] == 0)


@pytest.mark.parametrize("s", [0.3, 0.8, 0.95])
def test_erk_distribution_matches_core(s):
  params = _params()
  traced = jax.jit(lambda s: jp.erk_sparsities(params, s))(s)  # a traced sparsity
  core = jp.erk_sparsities(params, s)
  chex.assert_trees_all_close(traced, jax.tree.map(np.float32, core), atol=1e-6)
  tx = jp.magnitude_pruning(jp.constant_schedule(s), distribution="erk")
  _, state = jax.jit(tx.update)(params, tx.init(params), params)
  for k in ("a", "b"):
    assert _pruned(state.masks, k) == round(core[k]["kernel"] * params[k]["kernel"].size)


def test_random_pruning_depends_on_key():
  params = {"w": jnp.ones((20, 10))}
  masks = []
  for key in (0, 1):
    tx = jp.random_pruning(0.5, key=key)
    _, state = tx.update(params, tx.init(params), params)
    masks.append(np.asarray(state.masks["w"]))
    assert (~masks[-1]).sum() == 100
  assert np.any(masks[0] != masks[1])


_RAMP = jp.polynomial_schedule(0.5, begin_step=0, end_step=10)


@pytest.mark.parametrize("fn, callbacks", [
    (lambda p: _step_of(optax.chain(optax.adam(1e-3), jp.magnitude_pruning(_RAMP)), p), 3),
    (lambda p: _step_of(optax.chain(optax.adam(1e-3), jp.magnitude_pruning(
        jp.one_shot_schedule(0.5, 2), structure=jp.n_of_m(2, 4),
        where=lambda path, x: path == "a/kernel")), p), 4),
    (lambda p: _step_of(jp.rigl(optax.adam(1e-3), sparsity=0.5, update_every=2, end_step=8,
                                distribution="uniform"), p), 2),
    (lambda p: (lambda s: jp.topk_mask(p, s), jnp.float32(0.5)), 1),
    (lambda p: (lambda s: jp.erk_sparsities(p, s), jnp.float32(0.5)), 1),
], ids=["schedule_and_misplacement", "n_of_m_traced", "rigl", "topk_mask_traced", "erk_traced"])
def test_checked_programs_hold_no_jax_effect_and_keep_their_checks(fn, callbacks):
  """The run-time checks are pure callbacks, not ``jax.debug.callback``: the program has no
  JAX effect, so JAX dispatches every call of a jitted step on its C++ fast path (an effect
  anywhere made every call go through Python: a magnitude step without a mask update on the
  half-width GPT-2 tree cost 1.47-1.59x a plain adam step with it, 1.13-1.18x without), and
  every check is still in the compiled program, kept by the value it returns (the counts are
  those of the debug-callback version: the schedule, the sparsity, N:M, the drop fraction and the
  misplacement check)."""
  f, *args = fn(_params())
  assert jax.make_jaxpr(f)(*args).effects == set()
  hlo = jax.jit(f).lower(*args).compile().as_text()
  assert len(re.findall(r"custom_call_target=\"xla_ffi_python_cpu_callback\"", hlo)) == callbacks


def _step_of(tx, params):
  return (lambda p, s: tx.update(jax.tree.map(jnp.sign, p), s, p)), params, tx.init(params)


# ----------------------------------------------------------------------------- gradient criteria

def test_saliency_sees_raw_gradients():
  """Adam's first update is ±lr everywhere, so a chain link after it could not rank weights; the
  wrapper ranks by |w·g| of the raw gradient, and the inner optimizer sees only the surviving
  weights' gradients."""
  params = {"w": jnp.ones((2, 4))}
  grads = {"w": jnp.array([[5.0, 0.1, 3.0, 0.2], [0.3, 4.0, 0.4, 2.0]])}
  tx = jp.saliency_pruning(optax.adam(0.1), 0.5)
  updates, state = tx.update(grads, tx.init(params), params)
  keep = np.array([[True, False, True, False], [False, True, False, True]])
  np.testing.assert_array_equal(state.masks["w"], keep)
  np.testing.assert_array_equal(np.asarray(optax.apply_updates(params, updates)["w"])[~keep], 0)
  mu = np.asarray(state.inner_state[0].mu["w"])
  assert np.all(mu[~keep] == 0) and np.all(mu[keep] != 0)


def test_movement_accumulates_over_steps():
  """With lr 0 the weights stay 1, so S = -Σ g. The last gradient alone would keep the
  first two columns; the accumulated scores keep the last two."""
  params = {"w": jnp.ones((1, 4))}
  tx = jp.movement_pruning(optax.sgd(0.0), jp.one_shot_schedule(0.5, at_step=2), update_every=2)
  state = tx.init(params)
  for g in ([1.0, 1.0, -1.0, -1.0], [1.0, 1.0, -1.0, -1.0], [-1.0, -1.0, 0.5, 0.5]):
    _, state = tx.update({"w": jnp.array([g])}, state, params)
  np.testing.assert_array_equal(state.scores["w"], [[-1.0, -1.0, 1.5, 1.5]])
  np.testing.assert_array_equal(state.masks["w"], [[False, False, True, True]])


def test_generic_pruning_with_custom_score():
  params = {"w": jnp.array([[1.0, 2.0, 3.0, 4.0]])}
  score = lambda p, *, grads, key, where: jax.tree.map(lambda x: -jnp.abs(x), p)  # keep small
  tx = jp.pruning(score, 0.5)
  _, state = tx.update(params, tx.init(params), params)
  np.testing.assert_array_equal(state.masks["w"], [[True, True, False, False]])


# ----------------------------------------------------------------------------- straight-through

def test_straight_through_gradients_and_revival():
  """The masked forward passes the gradient to pruned weights; a pruned weight that grows past
  the kept ones is back in the mask at the next update, and the params stay dense."""
  masks = {"w": jnp.array([True, False])}
  g = jax.grad(lambda p: jnp.sum(jp.apply_masks_straight_through(p, masks)["w"] ** 2))(
      {"w": jnp.array([3.0, 2.0])})
  np.testing.assert_array_equal(g["w"], [6.0, 0.0])  # d/dw of (masked w)^2 is 2·0 at w1
  g = jax.grad(lambda p: jnp.sum(jp.apply_masks_straight_through(p, masks)["w"] * 5.0))(
      {"w": jnp.array([3.0, 2.0])})
  np.testing.assert_array_equal(g["w"], [5.0, 5.0])

  params = {"w": jnp.array([[3.0, 1.0, 2.0, 0.5]])}
  tx = optax.chain(optax.sgd(1.0), jp.magnitude_pruning(0.5, straight_through=True))
  state = tx.init(params)
  push = {"w": jnp.array([[0.0, -5.0, 0.0, 0.0]])}  # grows w[1] from 1 to 6
  updates, state = tx.update(push, state, params)
  np.testing.assert_array_equal(state[1].masks["w"], [[True, False, True, False]])
  params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params["w"], [[3.0, 6.0, 2.0, 0.5]])  # dense
  _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  np.testing.assert_array_equal(state[1].masks["w"], [[True, True, False, False]])  # revived


def test_end_step_freezes_masks():
  params = {"w": jnp.array([[3.0, 1.0, 2.0, 0.5]])}
  tx = optax.chain(optax.sgd(1.0), jp.magnitude_pruning(0.5, end_step=1, straight_through=True))
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.array([[0.0, -5.0, 0.0, 0.0]])}, state, params)
  params = optax.apply_updates(params, updates)
  _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  np.testing.assert_array_equal(state[1].masks["w"], [[True, False, True, False]])  # frozen


# ----------------------------------------------------------------------------- state access

def test_masks_from_state_nested_and_combined():
  params = _params()
  tx = optax.chain(optax.adam(1e-3), optax.inject_hyperparams(
      jp.magnitude_pruning, static_args=("update_every",))(sparsity=0.5))
  _, state = tx.update(params, tx.init(params), params)
  masks = jp.masks_from_state(state)
  assert _pruned(masks, "a") == 60 and masks["a"]["bias"].shape == ()
  # Two links on different leaves: their masks are ANDed.
  two = optax.chain(jp.magnitude_pruning(0.5, where=lambda p, x: p == "a/kernel"),
                    jp.magnitude_pruning(0.25, where=lambda p, x: p == "b/kernel"))
  _, state = two.update(params, two.init(params), params)
  masks = jp.masks_from_state(state)
  assert _pruned(masks, "a") == 60 and _pruned(masks, "b") == 15
  with pytest.raises(ValueError, match="no jaxprune pruning state"):
    jp.masks_from_state(optax.adam(1e-3).init(params))


def test_replace_masks():
  params = _params()
  tx = optax.chain(optax.sgd(0.1), jp.magnitude_pruning(0.0))
  masks = jp.topk_mask(jp.random_scores(params, jax.random.key(0)), 0.7)
  state = jp.replace_masks(tx.init(params), masks)
  chex.assert_trees_all_equal(jp.masks_from_state(state), masks)
  updates, state = tx.update(params, state, params)
  chex.assert_trees_all_equal(jp.masks_from_state(state), masks)  # sparsity 0 keeps them
  bad = jax.tree.map(lambda m: m, masks)
  bad["a"]["kernel"] = bad["a"]["kernel"][:5]
  with pytest.raises(ValueError, match="a/kernel"):
    jp.replace_masks(state, bad)


def test_replace_masks_in_nnx_optimizer():
  """In an ``nnx.Optimizer``'s opt_state (leaves wrapped in NNX Variables) ``replace_masks`` keeps
  each mask's Variable class and metadata, so the result goes back into the optimizer as it is;
  ``masks_from_state`` gives plain arrays; after one update the weights are exactly 0 where the
  new masks are False."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(12, 10, rngs=rngs)
      self.b = nnx.Linear(10, 6, rngs=rngs)

    def __call__(self, x):
      return self.b(jax.nn.relu(self.a(x)))

  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(optax.adam(1e-3), jp.magnitude_pruning(0.5)),
                            wrt=nnx.Param)
  is_var = lambda x: isinstance(x, nnx.Variable)
  before = jax.tree.structure(nnx.state(optimizer))
  masks = jp.topk_mask(jp.random_scores(nnx.as_pure(nnx.state(model, nnx.Param)),
                                        jax.random.key(1)), 0.7)
  state = jp.replace_masks(optimizer.opt_state, masks)

  old_vars = jax.tree.leaves(optimizer.opt_state[1].masks, is_leaf=is_var)
  new_vars = jax.tree.leaves(state[1].masks, is_leaf=is_var)
  assert [type(v) for v in new_vars] == [nnx.OptVariable] * 4
  assert [v.get_metadata() for v in new_vars] == [v.get_metadata() for v in old_vars]
  assert jax.tree.structure(state) == jax.tree.structure(optimizer.opt_state)
  # A copy: the optimizer's own masks are untouched.
  assert all(bool(jnp.all(m)) for m in jax.tree.leaves(jp.masks_from_state(optimizer.opt_state)))
  found = jp.masks_from_state(state)
  assert [type(m) for m in jax.tree.leaves(found, is_leaf=is_var)] == [type(jnp.ones(()))] * 4
  chex.assert_trees_all_equal(found, masks)

  optimizer.opt_state = state
  assert jax.tree.structure(nnx.state(optimizer)) == before

  @nnx.jit
  def step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)

  step(model, optimizer, jnp.ones((4, 12)))
  assert jax.tree.structure(nnx.state(optimizer)) == before
  chex.assert_trees_all_equal(jp.masks_from_state(optimizer.opt_state), masks)  # 0.7 > 0.5
  for name, pruned in (("a", 84), ("b", 42)):
    kernel = np.asarray(getattr(model, name).kernel[...])
    keep = np.asarray(masks[name]["kernel"])
    assert int((~keep).sum()) == pruned
    np.testing.assert_array_equal(kernel[~keep], 0.0)
    assert np.all(kernel[keep] != 0)
  # In place, into the optimizer's own Variables.
  more = jp.topk_mask(jp.magnitude_scores(nnx.as_pure(nnx.state(model, nnx.Param))), 0.8)
  nnx.update(optimizer.opt_state, nnx.state(jp.replace_masks(optimizer.opt_state, more)))
  assert jax.tree.structure(nnx.state(optimizer)) == before
  chex.assert_trees_all_equal(jp.masks_from_state(optimizer.opt_state), more)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("make, message", [
    (lambda: jp.magnitude_pruning(1.5), "outside"),
    (lambda: jp.magnitude_pruning("0.5"), "sparsity"),
    (lambda: jp.magnitude_pruning(0.5, scope="local"), "scope"),
    (lambda: jp.magnitude_pruning(0.5, distribution="lognormal"), "distribution"),
    (lambda: jp.magnitude_pruning(0.5, scope="global", distribution="erk"), "global"),
    (lambda: jp.magnitude_pruning(0.5, update_every=0), "update_every"),
])
def test_bad_arguments_raise(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_bad_params_raise():
  tx = jp.magnitude_pruning(0.5, where=lambda path, leaf: path == "nothing")
  with pytest.raises(ValueError, match="selects no leaf"):
    tx.init(_params())
  tx = jp.magnitude_pruning(0.5)
  with pytest.raises(ValueError, match="params"):
    tx.update(_params(), tx.init(_params()))


# ----------------------------------------------------------------------------- rewinding

def test_lottery_ticket_round():
  """Train with pruning, rewind to the init, train the next round on the same ticket."""
  init = _params()
  tx = optax.chain(optax.adam(0.05), jp.magnitude_pruning(0.5, scope="global"))
  grads_fn = lambda p: jax.tree.map(lambda x: jnp.sign(x) * 0.1 + x, p)
  trained, state, _ = _run(tx, init, 5, grads_fn)
  masks = jp.masks_from_state(state)
  rewound = jp.rewind(masks, init)
  for k in ("a", "b"):
    m = np.asarray(masks[k]["kernel"])
    np.testing.assert_array_equal(np.asarray(rewound[k]["kernel"])[m],
                                  np.asarray(init[k]["kernel"])[m])
    assert np.all(np.asarray(rewound[k]["kernel"])[~m] == 0)
  chex.assert_trees_all_equal(rewound["a"]["bias"], init["a"]["bias"])
  # Next round: the ticket's masks in a fresh state, then 20% more of what remains.
  nxt = optax.chain(optax.adam(0.05), jp.magnitude_pruning(0.6, scope="global"))
  state = jp.replace_masks(nxt.init(rewound), masks)
  p = rewound
  for _ in range(3):
    updates, state = nxt.update(grads_fn(p), state, p)
    p = optax.apply_updates(p, updates)
  m2 = jp.masks_from_state(state)
  assert not any(np.any(np.asarray(m2[k]["kernel"]) & ~np.asarray(masks[k]["kernel"]))
                 for k in ("a", "b"))
  assert sum(_pruned(m2, k) for k in ("a", "b")) == 108  # round(0.6 · 180)


def test_ticket_masks_monotone_exact():
  trained = _params(3)
  m1 = jp.ticket_masks(trained, 0.2)
  m2 = jp.ticket_masks(jax.tree.map(lambda x: -x * 2, trained), 0.36, masks=m1)
  assert sum(_pruned(m1, k) for k in ("a", "b")) == 36
  assert sum(_pruned(m2, k) for k in ("a", "b")) == round(0.36 * 180)
  for k in ("a", "b"):
    assert not np.any(np.asarray(m2[k]["kernel"]) & ~np.asarray(m1[k]["kernel"]))


# ----------------------------------------------------------------------------- sharded

def test_sharded_global_magnitude_pruning_8_devices():
  """Params sharded over a 4x2 mesh of 8 host devices (Auto axes, and Explicit axes under
  jax.set_mesh) train with global magnitude pruning: exact total count, pruned weights 0, and
  params, masks and Adam moments keep the params' shardings."""
  out = run_with_devices("""
    import contextlib
    import jax, jax.numpy as jnp, numpy as np, optax
    import jaxprune as jp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    jax.config.update("jax_numpy_rank_promotion", "raise")
    specs = {"a": P("data", "model"), "b": P(None, "model"), "c": P("data", None)}
    shapes = {"a": (64, 32), "b": (32, 16), "c": (16, 8)}
    tx = optax.chain(optax.adam(1e-2), jp.magnitude_pruning(
        jp.polynomial_schedule(0.8, begin_step=0, end_step=4), update_every=2, scope="global"))
    loss = lambda p: sum(jnp.sum(jnp.sin(x)) for x in p.values())

    @jax.jit
    def step(params, state):
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      return optax.apply_updates(params, updates), state

    for axis_type in (AxisType.Auto, AxisType.Explicit):
      mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
      ctx = jax.set_mesh(mesh) if axis_type == AxisType.Explicit else contextlib.nullcontext()
      with ctx:
        keys = jax.random.split(jax.random.key(0), 3)
        params = {k: jax.device_put(jax.random.normal(kk, shapes[k]),
                                    NamedSharding(mesh, specs[k]))
                  for k, kk in zip(shapes, keys)}
        state = tx.init(params)
        for _ in range(6):
          params, state = step(params, state)
      masks = jp.masks_from_state(state)
      for k in shapes:
        want = NamedSharding(mesh, specs[k])
        for x in (params[k], masks[k], state[0][0].mu[k]):
          assert x.sharding.is_equivalent_to(want, 2), (k, x.sharding)
        assert np.all(np.asarray(params[k])[~np.asarray(masks[k])] == 0), k
      total = sum(m.size for m in masks.values())
      pruned = sum(int((~np.asarray(m)).sum()) for m in masks.values())
      assert pruned == round(0.8 * total), (pruned, total)
      print(axis_type, len(jax.devices()), pruned, total)
  """)
  assert out.split() == ["AxisType.Auto", "8", "2150", "2688",
                         "AxisType.Explicit", "8", "2150", "2688"], out


# ----------------------------------------------------------------------------- docs

def _doc_blocks():
  text = (pathlib.Path(ROOT) / "docs" / "pruning_while_training.md").read_text()
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_docs_examples_run():
  """Every python block of docs/pruning_while_training.md runs (each in a fresh namespace)."""
  blocks = _doc_blocks()
  assert len(blocks) >= 7
  for i, code in enumerate(blocks):
    namespace = {}
    try:
      exec(compile(code, f"pruning_while_training.md block {i}", "exec"), namespace)
    except Exception as e:  # name the block that failed
      raise AssertionError(f"block {i} failed:\n{code}") from e
