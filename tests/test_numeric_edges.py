"""Never silently wrong: the numeric edges of selection (issue 14), one test per finding.

float64 under x64 compares in 64 bits; subnormal scores are not flushed to 0; a traced NaN or
out-of-range sparsity, or one N:M cannot give, is an error when the program runs; non-finite
training never prunes more than ``round(s * n)``; channel and block scores of tiny or huge
weights neither under- nor overflow; and every bad argument says what is wrong.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_with_devices

import jaxprune as jp
from jaxprune import _checks, _floats

RUNTIME = _checks.RUNTIME_ERRORS  # JaxRuntimeError, or ValueError from the C++ fast path


# ----------------------------------------------------------------------------- 4. float64


def test_float64_scores_compare_in_float64():
  out = run_with_devices("""
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np, jaxprune as jp
w = jnp.array([[1 + 3e-10, 1 + 2e-10, 1 + 1e-10, 1.0]])
keep = np.array([[True, True, False, False]])
_, masks = jp.prune({"w": w}, 0.5)
np.testing.assert_array_equal(masks["w"], keep)
np.testing.assert_array_equal(jax.jit(lambda s: jp.topk_mask(s, 0.5))({"w": w})["w"], keep)
# float64 subnormals, and a float32 leaf in the same global threshold (widened exactly).
x = jnp.array([[5e-324, 0.0, 1e-310, -0.0]])
np.testing.assert_array_equal(jp.topk_mask({"w": x}, 0.5)["w"], [[True, False, True, False]])
tree = {"a": jnp.array([[1e-40, 0.0, 2e-40, 3e-45]], jnp.float32),
        "b": jnp.array([[1e-41, 5e-41]], jnp.float64)}
m = jp.topk_mask(tree, 0.5, scope="global")
np.testing.assert_array_equal(m["a"], [[True, False, True, False]])
np.testing.assert_array_equal(m["b"], [[False, True]])
# N:M and channels keep float64 too.
nm = jp.topk_mask({"w": w.T}, 0.5, structure=jp.n_of_m(2, 4))["w"]
np.testing.assert_array_equal(nm, keep.T)
ch = jp.topk_mask({"w": jnp.stack([w[0], w[0]])}, 0.5, structure=jp.channels())["w"][0]
np.testing.assert_array_equal(ch, keep[0])
print("ok float64")
""", num_devices=1)
  assert "ok float64" in out


# ----------------------------------------------------------------------------- 5. subnormals


@pytest.mark.parametrize("use_jit", [False, True])
def test_subnormal_scores_are_not_zero(use_jit):
  w = np.array([[9.8e-40, 1.8e-42, 0.0, -0.0]], np.float32)      # built on the host: exact
  fn = jp.topk_mask
  if use_jit:
    fn = jax.jit(jp.topk_mask, static_argnames="scope")
  np.testing.assert_array_equal(fn({"w": w}, 0.5)["w"], [[True, True, False, False]])
  g = fn({"a": w, "b": np.array([[1e-41, 3e-45]], np.float32)}, 0.5, scope="global")
  np.testing.assert_array_equal(g["a"], [[True, True, False, False]])
  np.testing.assert_array_equal(g["b"], [[True, False]])


def test_subnormals_in_bfloat16_n_of_m_and_lowest_k():
  b = np.array([[1e-39], [0.0], [5e-40], [-0.0]], np.float32).astype(jnp.bfloat16)
  np.testing.assert_array_equal(jp.topk_mask({"w": b}, 0.5)["w"][:, 0], [True, False, True, False])
  nm = jp.topk_mask({"w": b}, 0.5, structure=jp.n_of_m(2, 4))["w"][:, 0]
  np.testing.assert_array_equal(nm, [True, False, True, False])
  v = np.array([3e-45, 0.0, 1e-44, -1e-45], np.float32)
  np.testing.assert_array_equal(jp.lowest_k(v, 2), [False, True, False, True])


# ----------------------------------------------------------------------------- 6. traced NaN


@pytest.mark.parametrize("bad", [np.nan, 1.5, -0.25])
def test_traced_bad_sparsity_is_an_error(bad):
  w = {"w": jnp.arange(8.0).reshape(2, 4)}
  for scope in ("layerwise", "global"):
    fn = jax.jit(lambda s, scope=scope: jp.topk_mask(w, s, scope=scope))
    np.testing.assert_array_equal(fn(jnp.float32(0.5))["w"].sum(), 4)
    with pytest.raises(RUNTIME, match=r"sparsity .* is outside \[0, 1\]"):
      jax.block_until_ready(fn(jnp.float32(bad)))
  per_leaf = jax.jit(lambda s: jp.topk_mask(w, {"w": s}))
  with pytest.raises(RUNTIME, match=r"for leaf 'w' is outside \[0, 1\]"):
    jax.block_until_ready(per_leaf(jnp.float32(bad)))


def test_traced_nan_in_erk_and_schedules_is_an_error():
  params = {"a": jnp.ones((8, 8)), "b": jnp.ones((8, 2))}
  erk = jax.jit(lambda s: jp.erk_sparsities(params, s))
  assert abs(float(erk(jnp.float32(0.5))["a"]) - jp.erk_sparsities(params, 0.5)["a"]) < 1e-6
  with pytest.raises(RUNTIME, match="sparsity nan"):
    jax.block_until_ready(erk(jnp.float32(jnp.nan)))
  # A schedule returning NaN, and an injected NaN hyperparameter, inside a jitted step.
  sched = lambda c: jnp.where(c >= 2, jnp.nan, 0.25)
  tx = optax.chain(optax.sgd(0.1), jp.magnitude_pruning(sched))
  step = jax.jit(lambda p, s: tx.update(p, s, p))
  state = tx.init(params)
  for _ in range(2):  # the updates are applied, as a training loop does
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  # Both the schedule's check and topk_mask's fire; either message names the NaN sparsity.
  with pytest.raises(RUNTIME, match=r"the sparsity schedule returned nan at step 2|sparsity nan"):
    jax.block_until_ready(step(params, state))
  inj = optax.inject_hyperparams(jp.magnitude_pruning)(sparsity=0.5)
  state = inj.init(params)
  state.hyperparams["sparsity"] = jnp.asarray(jnp.nan)
  with pytest.raises(RUNTIME, match="sparsity nan"):
    jax.block_until_ready(jax.jit(lambda p, s: inj.update(p, s, p))(params, state))


def test_traced_nan_drop_fraction_is_an_error():
  params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
  tx = jp.rigl(optax.sgd(0.1), sparsity=0.5, update_every=1, end_step=10,
               drop_fraction=lambda c: jnp.where(c >= 1, jnp.nan, 0.3), distribution="uniform")
  step = jax.jit(lambda p, s: tx.update(p, s, p))
  updates, state = step(params, tx.init(params))
  params = optax.apply_updates(params, updates)  # as a training loop does
  with pytest.raises(RUNTIME, match=r"drop_fraction nan at step 1 is outside \[0, 1\]"):
    jax.block_until_ready(step(params, state))


def test_eager_bad_schedule_raises_at_once():
  tx = jp.magnitude_pruning(lambda c: 1.25)
  params = {"w": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match=r"schedule returned 1.25 at step 0"):
    tx.update(params, tx.init(params), params)


# ----------------------------------------------------------------------------- 7. N:M


def test_n_of_m_traced_sparsity_it_cannot_give_is_an_error():
  w = {"w": jnp.arange(16.0).reshape(4, 4)}
  fn = jax.jit(lambda s: jp.topk_mask(w, s, structure=jp.n_of_m(2, 4)))
  assert int(fn(jnp.float32(0.5))["w"].sum()) == 8
  assert int(fn(jnp.float32(0.0))["w"].sum()) == 16
  with pytest.raises(RUNTIME, match=r"n_of_m\(2, 4\) gives sparsity 0.5 only, but sparsity 0.9"):
    jax.block_until_ready(fn(jnp.float32(0.9)))


def test_n_of_m_accepts_its_sparsity_rounded_to_the_value_type():
  w = {"w": jnp.arange(9.0).reshape(3, 3)}                 # one group of 3 per column
  st = jp.n_of_m(1, 3)
  s16 = jnp.asarray(2 / 3, jnp.bfloat16)                    # 0.66796875
  assert int(jp.topk_mask(w, s16, structure=st)["w"].sum()) == 3
  assert int(jax.jit(lambda s: jp.topk_mask(w, s, structure=st))(s16)["w"].sum()) == 3
  with pytest.raises(ValueError, match="gives sparsity 0.666667 only"):
    jp.topk_mask(w, 0.67, structure=st)


def test_gmp_ramp_with_n_of_m_errors_instead_of_jumping():
  params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
  ramp = jp.polynomial_schedule(0.5, begin_step=0, end_step=4)
  tx = optax.chain(optax.sgd(0.1), jp.magnitude_pruning(ramp, structure=jp.n_of_m(2, 4)))
  step = jax.jit(lambda p, s: tx.update(p, s, p))
  _, state = step(params, tx.init(params))                         # step 0: sparsity 0
  with pytest.raises(RUNTIME, match="not a gradual ramp"):
    jax.block_until_ready(step(params, state))                     # step 1: 0.289...
  # A schedule that jumps reaches exactly 2:4.
  tx = optax.chain(optax.sgd(0.0), jp.magnitude_pruning(jp.one_shot_schedule(0.5, 2),
                                                        structure=jp.n_of_m(2, 4)))
  state, p = tx.init(params), params
  for _ in range(3):
    u, state = jax.jit(lambda p, s: tx.update(p, s, p))(p, state)
    p = optax.apply_updates(p, u)
  assert float(jp.sparsity(p)) == 0.5


# ----------------------------------------------------------------------------- 8. non-finite


def test_nan_params_never_prune_more_than_round_s_n():
  params = {"w": jnp.arange(16.0, 0.0, -1.0).reshape(4, 4)}   # smallest last: pruned first
  sched = jp.polynomial_schedule(0.75, begin_step=0, end_step=3)
  tx = optax.chain(optax.sgd(0.0), jp.magnitude_pruning(sched))
  step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.zeros_like, p), s, p))
  state = tx.init(params)
  for t in range(5):
    if t == 2:   # half the weights blow up; 8 already pruned ones sit at higher indices
      params = {"w": params["w"].at[:2].set(jnp.nan)}
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
    masks = jp.masks_from_state(state)["w"]
    expected = round(float(sched(t)) * 16)
    assert int((~masks).sum()) == expected, t
    if t >= 1:
      assert not masks[2:].any()       # what was pruned stays pruned
  pruned = ~jp.masks_from_state(state)["w"]
  assert jnp.all(jp.apply_masks(params, {"w": ~pruned})["w"][pruned] == 0)   # NaN ones too


def test_apply_if_finite_recipe_keeps_pruned_weights_exactly_zero():
  params = {"w": jnp.arange(1.0, 17.0).reshape(4, 4)}
  sched = jp.polynomial_schedule(0.75, begin_step=0, end_step=3)
  tx = optax.apply_if_finite(optax.chain(optax.sgd(0.1), jp.magnitude_pruning(sched)),
                             max_consecutive_errors=10)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  for t in range(7):
    g = jax.tree.map(jnp.ones_like, params)
    if t in (1, 2):
      g = {"w": g["w"].at[0, 3].set(jnp.nan).at[3, 3].set(jnp.inf)}
    u, state = step(params, state, g)
    params = optax.apply_updates(params, u)
    assert bool(jnp.all(jnp.isfinite(params["w"])))
    masks = jp.masks_from_state(state)["w"]
    np.testing.assert_array_equal(params["w"] == 0, ~masks)      # pruned <=> exactly 0
  assert int((~masks).sum()) == 12


def test_channel_with_nan_weight_does_not_unprune_others():
  params = {"w": jnp.array([[4.0, 3.0, 2.0, 1.0]] * 3)}
  tx = optax.chain(optax.sgd(0.0), jp.magnitude_pruning(
      lambda c: jnp.where(c == 0, 0.25, 0.5), structure=jp.channels()))
  step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.zeros_like, p), s, p))
  u, state = step(params, tx.init(params))
  params = optax.apply_updates(params, u)                    # channel 3 pruned
  params = {"w": params["w"].at[0, 0].set(jnp.nan)}          # channel 0 turns NaN
  u, state = step(params, state)
  masks = jp.masks_from_state(state)["w"][0]
  assert int((~masks).sum()) == 2 and not masks[3]


# ----------------------------------------------------------------------------- 9. channels


@pytest.mark.parametrize("scale", [1e-21, 1e-30, 1e-40, 1e-44, 1e30, 1e37])
@pytest.mark.parametrize("reduce", ["l2", "l1", "mean", "max"])
def test_channel_scores_of_tiny_and_huge_weights(scale, reduce):
  w = (np.array([[1.0, 3.0, 2.0]] * 4) * scale).astype(np.float32)   # host: exact subnormals
  keep = jp.topk_mask({"w": w}, 1 / 3, structure=jp.channels(reduce=reduce))["w"][0]
  np.testing.assert_array_equal(keep, [False, True, True])


@pytest.mark.parametrize("scale", [1e-21, 1e-30, 1e-40, 1e30])
def test_block_scores_of_tiny_and_huge_weights(scale):
  w = (np.kron(np.array([[1.0, 3.0], [2.0, 4.0]]), np.ones((2, 2))) * scale).astype(np.float32)
  keep = jp.topk_mask({"w": w}, 0.5, structure=jp.blocks((2, 2)))["w"][::2, ::2]
  np.testing.assert_array_equal(keep, [[False, True], [False, True]])


def test_channel_scores_equal_the_plain_formula_where_it_is_in_range():
  """Bit for bit what the plain formula gives under jit (eager, XLA:CPU sums in another order,
  so the old eager scores differed from the jitted ones; now both are the jitted ones)."""
  w = jax.random.normal(jax.random.key(1), (64, 32))
  plain = {"l2": lambda x, a: jnp.sqrt(jnp.sum(jnp.square(x), axis=a)),
           "l1": lambda x, a: jnp.sum(jnp.abs(x), axis=a),
           "mean": lambda x, a: jnp.mean(x, axis=a), "max": lambda x, a: jnp.max(x, axis=a)}
  for reduce, f in plain.items():
    for axis in (0, 1):
      got = jp.channels(axis=axis, reduce=reduce).unit_scores(w)
      np.testing.assert_array_equal(got, jax.jit(f, static_argnums=1)(w, 1 - axis))
      np.testing.assert_array_equal(got, jax.jit(jp.channels(axis, reduce).unit_scores)(w))
  blocks = jax.jit(lambda x: plain["l2"](x.reshape(16, 4, 8, 4), (1, 3)))(w)
  np.testing.assert_array_equal(jp.blocks((4, 4)).unit_scores(w), blocks)
  big = np.full((4, 2), 3e38, np.float32)
  assert np.all(np.isinf(jp.channels().unit_scores(big)))       # the norm is past float32
  tiny = np.array([[1e-45, 1e-45], [0.0, 3e-45]], np.float32)
  np.testing.assert_array_equal(jp.channels().unit_scores(tiny),
                                np.array([1e-45, 3e-45], np.float32))


def test_exact_ldexp_matches_numpy_on_random_bits():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
  x = x[np.isfinite(x)]
  k = rng.integers(-300, 300, x.size).astype(np.int32)
  got = np.asarray(jax.jit(_floats.ldexp)(x, k))
  with np.errstate(over="ignore"):
    ref = np.ldexp(x.astype(np.float64), k).astype(np.float32)
  np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


# ----------------------------------------------------------------------------- clear errors


def test_erk_gives_empty_leaves_zero():
  params = {"w": jnp.ones((4, 4)), "e": jnp.ones((0, 4))}
  s = jp.erk_sparsities(params, 0.5)
  assert s["e"] == 0.0 and s["w"] == 0.5
  assert float(jax.jit(lambda s: jp.erk_sparsities(params, s))(jnp.float32(0.5))["e"]) == 0.0
  assert jp.topk_mask(params, s)["e"].shape == (0, 4)


def test_non_scalar_sparsity_names_the_argument():
  w = {"w": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match=r"got an array of shape \(2,\)"):
    jp.topk_mask(w, jnp.array([0.5, 0.5]))
  with pytest.raises(ValueError, match=r"sparsity for leaf 'w' must be .* shape \(2,\)"):
    jp.topk_mask(w, {"w": jnp.array([0.5, 0.5])})
  with pytest.raises(ValueError, match=r"shape \(2,\)"):
    jp.erk_sparsities(w, jnp.array([0.5, 0.5]))
  with pytest.raises(ValueError, match=r"schedule must return a scalar"):
    tx = jp.magnitude_pruning(lambda c: jnp.array([0.5, 0.5]))
    tx.update(w, tx.init(w), w)


def test_bad_structure_and_blocks():
  w = {"w": jnp.ones((4, 4))}
  for bad in ((), (0, 2), (2.0, 2), None):
    with pytest.raises(ValueError, match=r"blocks\(shape\) needs a non-empty tuple of ints"):
      jp.blocks(bad)
  with pytest.raises(ValueError, match=re.escape("'N:M' is jp.n_of_m(N, M)")):
    jp.topk_mask(w, 0.5, structure="2:4")
  with pytest.raises(ValueError, match=r"structure must be jp.unstructured\(\)"):
    jp.magnitude_pruning(0.5, structure="2:4")


def test_invalid_regex_key_names_the_pattern():
  with pytest.raises(ValueError, match=r"sparsity pattern 'w\(' is not a valid regular"):
    jp.topk_mask({"w": jnp.ones((4, 4))}, {"w(": 0.5})


@pytest.mark.parametrize("value", [2.5, 0, -1, True, "2"])
def test_update_every_must_be_a_positive_int(value):
  with pytest.raises(ValueError, match="update_every must be an int >= 1"):
    jp.magnitude_pruning(0.5, update_every=value)
  with pytest.raises(ValueError, match="update_every must be an int >= 1"):
    jp.rigl(optax.sgd(0.1), sparsity=0.5, update_every=value, end_step=10)
  with pytest.raises(ValueError, match="end_step must be an int >= 1"):
    jp.set_training(optax.sgd(0.1), sparsity=0.5, update_every=1, end_step=value)
  jp.magnitude_pruning(0.5, update_every=jnp.int32(3))      # integer arrays pass
