"""Tests for jaxprune.schedules: values, jit-safety, optax compatibility, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune import schedules as S

STEPS = np.array([0, 1, 5, 9, 10, 11, 50, 99, 100, 101, 1000])


def _eval(schedule, steps=STEPS, jit=False):
  fn = jax.jit(schedule) if jit else schedule
  return np.array([float(fn(jnp.asarray(t, jnp.int32))) for t in steps])


@pytest.mark.parametrize("jit", [False, True])
def test_constant(jit):
  np.testing.assert_array_equal(_eval(S.constant_schedule(0.6), jit=jit),
                                np.full(len(STEPS), np.float32(0.6)))


@pytest.mark.parametrize("jit", [False, True])
def test_one_shot(jit):
  got = _eval(S.one_shot_schedule(0.9, at_step=10), jit=jit)
  want = np.where(STEPS >= 10, np.float32(0.9), 0.0)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("power", [1, 3])
def test_polynomial_is_zhu_gupta(jit, power):
  begin, end, sf, si = 10, 100, 0.9, 0.1
  got = _eval(S.polynomial_schedule(sf, begin_step=begin, end_step=end, initial=si,
                                    power=power), jit=jit)
  frac = np.clip((STEPS - begin) / (end - begin), 0.0, 1.0)
  want = sf + (si - sf) * (1.0 - frac) ** power
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert got[0] == pytest.approx(si) and got[-1] == pytest.approx(sf)


def test_polynomial_is_monotone_and_float32():
  s = S.polynomial_schedule(0.95, begin_step=0, end_step=1000)
  values = np.asarray(jax.vmap(s)(jnp.arange(1200)))
  assert values.dtype == np.float32
  assert np.all(np.diff(values) >= 0)


@pytest.mark.parametrize("jit", [False, True])
def test_iterative_removes_fraction_of_what_remains(jit):
  s = S.iterative_schedule(0.2, rounds=3, every=10, begin_step=5)
  got = _eval(s, steps=[0, 4, 5, 14, 15, 25, 35, 1000], jit=jit)
  want = [0.0, 0.0, 0.2, 0.2, 0.36, 0.488, 0.488, 0.488]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Each round keeps 80% of what the previous round kept.
  kept = 1.0 - np.array(want[2:6])
  np.testing.assert_allclose(kept[1:] / kept[:-1], [1.0, 0.8, 0.8], rtol=1e-6)


def test_schedules_are_optax_schedules():
  """They plug into optax where a schedule is expected (here: inject_hyperparams)."""
  tx = optax.inject_hyperparams(optax.sgd)(
      learning_rate=S.polynomial_schedule(0.5, begin_step=0, end_step=4))
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  seen = []
  for _ in range(5):
    _, state = tx.update(params, state, params)
    seen.append(float(state.hyperparams["learning_rate"]))  # the value update t used
  np.testing.assert_allclose(seen, [0.0, 0.2890625, 0.4375, 0.4921875, 0.5], rtol=1e-6)


@pytest.mark.parametrize("make, message", [
    (lambda: S.constant_schedule(1.5), "sparsity"),
    (lambda: S.constant_schedule(-0.1), "sparsity"),
    (lambda: S.constant_schedule("0.5"), "sparsity"),
    (lambda: S.one_shot_schedule(0.5, at_step=-1), "at_step"),
    (lambda: S.one_shot_schedule(0.5, at_step=1.5), "at_step"),
    (lambda: S.polynomial_schedule(0.9, begin_step=10, end_step=10), "end_step"),
    (lambda: S.polynomial_schedule(1.1, begin_step=0, end_step=10), "final"),
    (lambda: S.polynomial_schedule(0.9, begin_step=0, end_step=10, initial=2.), "initial"),
    (lambda: S.polynomial_schedule(0.9, begin_step=0, end_step=10, power=0), "power"),
    (lambda: S.iterative_schedule(1.2, rounds=3, every=10), "fraction"),
    (lambda: S.iterative_schedule(0.2, rounds=0, every=10), "rounds"),
    (lambda: S.iterative_schedule(0.2, rounds=2, every=0), "every"),
])
def test_bad_arguments_raise(make, message):
  with pytest.raises(ValueError, match=message):
    make()
