"""The conformance suite that every public pruning transform passes (STYLE.md section 7).

Each case below is one public transform (and the variants whose behaviour differs: global scope,
straight-through). Every case must:
  * train to exactly its target sparsity, with pruned weights exactly 0 after many Adam steps,
    in float32 and bfloat16, keeping the dtypes, with no second trace of the jitted step and
    with unknown extra keyword arguments accepted;
  * work inside optax.inject_hyperparams (a traced sparsity schedule, or a traced drop fraction
    for SET/RigL) and give the same result as the plain transform;
  * keep its state stable through lax.cond, optax.MultiSteps and optax.tree.map_params;
  * run through nnx.Optimizer(model, tx, wrt=nnx.Param);
  * round-trip through an orbax V1 save/load to an equal state with an identical continuation.
tests/test_mnist1d_pruning.py trains an MLP on MNIST-1D with every case to a stated accuracy.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune import fixed_masks, schedules, sparse_training, transforms
from jaxprune.group_pruning import __all__ as GROUP_PRUNING_ALL  # (jp.group_pruning: function)

LR = 1e-2
TARGET = 0.75
EVERY = 2
SCHEDULE = schedules.polynomial_schedule(TARGET, begin_step=0, end_step=8)  # at TARGET from 8 on
END_STEP = 16  # SET/RigL stop moving connections here
STEPS = 20


def _my_score(params, *, grads, key, where):
  """A custom criterion for the generic ``pruning``: |w| + |g| (uses the raw gradient)."""
  del key, where  # scores of leaves that are not pruned are ignored
  return jax.tree.map(lambda p, g: jnp.abs(p).astype(jnp.float32) + jnp.abs(g).astype(jnp.float32),
                      params, grads)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  make: Callable[[object], optax.GradientTransformation]     # sparsity (or schedule) -> tx
  inject: Callable[[], optax.GradientTransformation]          # the same, via inject_hyperparams
  kind: str = "layerwise"   # "layerwise", "global", "ste" (dense params) or "sparse" (SET/RigL)
  factory: str = ""         # the public factory it covers


def _inject(factory, *args, static=("update_every",), **kwargs):
  return optax.inject_hyperparams(factory, static_args=static, hyperparam_dtype=jnp.float32)(
      *args, **kwargs)


# Integer arguments go in static_args: inject_hyperparams would store them as weakly typed
# int32 arrays that come back strongly typed after one step, which retraces a jitted step.
SPARSE_STATIC = ("update_every", "end_step", "key")


def _adam():
  return optax.adam(LR)


def _ticket(params):
  """The masks keep_masks holds: TARGET of each kernel pruned by magnitude."""
  return jp.topk_mask(jp.magnitude_scores(params), TARGET)


@functools.cache
def _groups():
  """The channel groups of the test MLP (traced once): its 16 hidden units."""
  return jp.surgery.channel_groups(_logits, _params(), X)


CASES = [
    Case("magnitude",
         lambda s: optax.chain(_adam(), jp.magnitude_pruning(s, update_every=EVERY)),
         lambda: optax.chain(_adam(), _inject(jp.magnitude_pruning, sparsity=SCHEDULE,
                                              update_every=EVERY)),
         factory="magnitude_pruning"),
    Case("magnitude_global",
         lambda s: optax.chain(_adam(), jp.magnitude_pruning(s, update_every=EVERY,
                                                             scope="global")),
         lambda: optax.chain(_adam(), _inject(jp.magnitude_pruning, sparsity=SCHEDULE,
                                              update_every=EVERY, scope="global")),
         kind="global", factory="magnitude_pruning"),
    Case("magnitude_straight_through",
         lambda s: optax.chain(_adam(), jp.magnitude_pruning(s, update_every=EVERY,
                                                             straight_through=True)),
         lambda: optax.chain(_adam(), _inject(jp.magnitude_pruning, sparsity=SCHEDULE,
                                              update_every=EVERY, straight_through=True)),
         kind="ste", factory="magnitude_pruning"),
    Case("random",
         lambda s: optax.chain(_adam(), jp.random_pruning(s, key=3, update_every=EVERY)),
         lambda: optax.chain(_adam(), _inject(jp.random_pruning, sparsity=SCHEDULE, key=3,
                                              update_every=EVERY,
                                              static=("update_every", "key"))),
         factory="random_pruning"),
    Case("saliency",
         lambda s: jp.saliency_pruning(_adam(), s, update_every=EVERY),
         lambda: _inject(jp.saliency_pruning, _adam(), sparsity=SCHEDULE, update_every=EVERY),
         factory="saliency_pruning"),
    Case("movement",
         lambda s: jp.movement_pruning(_adam(), s, update_every=EVERY),
         lambda: _inject(jp.movement_pruning, _adam(), sparsity=SCHEDULE, update_every=EVERY),
         factory="movement_pruning"),
    Case("generic_pruning",
         lambda s: jp.pruning(_my_score, s, inner_tx=_adam(), update_every=EVERY),
         lambda: _inject(jp.pruning, _my_score, sparsity=SCHEDULE, inner_tx=_adam(),
                         update_every=EVERY, static=("update_every", "score_fn")),
         factory="pruning"),
    Case("set",
         lambda s: jp.set_training(_adam(), sparsity=TARGET, update_every=EVERY,
                                   end_step=END_STEP, key=1),
         lambda: _inject(jp.set_training, _adam(), sparsity=TARGET, update_every=EVERY,
                         end_step=END_STEP, key=1, drop_fraction=optax.constant_schedule(0.3),
                         static=SPARSE_STATIC),
         kind="sparse", factory="set_training"),
    Case("rigl",
         lambda s: jp.rigl(_adam(), sparsity=TARGET, update_every=EVERY, end_step=END_STEP,
                           key=1),
         lambda: _inject(jp.rigl, _adam(), sparsity=TARGET, update_every=EVERY,
                         end_step=END_STEP, key=1, drop_fraction=optax.constant_schedule(0.3),
                         static=SPARSE_STATIC),
         kind="sparse", factory="rigl"),
    # 16 hidden units, 12 removed at 0.75: exactly 0.75 of each kernel's rows or columns.
    Case("group",
         lambda s: optax.chain(_adam(), jp.group_pruning(_groups(), s, update_every=EVERY)),
         lambda: optax.chain(_adam(), _inject(jp.group_pruning, _groups(), sparsity=SCHEDULE,
                                              update_every=EVERY)),
         factory="group_pruning"),
    # Fixed masks (a lottery ticket at TARGET, made once by init): exact from the first step on.
    Case("keep_masks",
         lambda s: optax.chain(_adam(), jp.keep_masks(_ticket)),
         lambda: optax.chain(_adam(), _inject(jp.keep_masks, masks=_ticket, static=("masks",))),
         kind="fixed", factory="keep_masks"),
]
BY_NAME = {c.name: c for c in CASES}
NAMES = [c.name for c in CASES]


def test_every_public_transform_is_covered():
  public = {n for n in (transforms.__all__ + sparse_training.__all__ + GROUP_PRUNING_ALL
                        + fixed_masks.__all__)
            if n.endswith("pruning") or n in ("rigl", "set_training", "keep_masks")}
  assert public == {c.factory for c in CASES}


# ----------------------------------------------------------------------------- model and data

def _params(dtype=jnp.float32, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
      "dense1": {"kernel": jax.random.normal(k1, (8, 16), dtype) * 0.5,
                 "bias": jnp.zeros((16,), dtype)},
      "dense2": {"kernel": jax.random.normal(k2, (16, 4), dtype) * 0.5,
                 "bias": jnp.zeros((4,), dtype)},
  }


KERNELS = ("dense1", "dense2")
X = jax.random.normal(jax.random.key(7), (32, 8))
Y = jnp.arange(32) % 4


def _logits(params, x):
  h = jax.nn.relu(x @ params["dense1"]["kernel"] + params["dense1"]["bias"][None])
  return h @ params["dense2"]["kernel"] + params["dense2"]["bias"][None]


def _loss(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(_logits(params, x), y).mean()


TRACES: collections.Counter = collections.Counter()  # (name, variant) -> times traced


def _step_fn(case, tx, tag):
  def step(params, state, x, y):
    TRACES[tag] += 1  # runs only while jax traces the function
    def loss(p):
      if case.kind == "ste":  # the mask in the forward pass, dense gradients
        p = jp.apply_masks_straight_through(p, jp.masks_from_state(state))
      return _loss(p, x, y)
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params, unknown_extra_arg=jnp.ones(()))
    return optax.apply_updates(params, updates), state, updates
  return step


@functools.cache
def _runner(name, variant="plain"):
  """(tx, jitted step) for a case, cached so that tests share one compilation per variant.

  ``"plain"``: the transform as built by ``case.make``; ``"multisteps_inject"``: the
  ``inject_hyperparams`` version inside ``optax.MultiSteps(every_k_schedule=2)``.
  """
  case = BY_NAME[name]
  if variant == "plain":
    tx = case.make(SCHEDULE)
  else:
    tx = optax.MultiSteps(case.inject(), every_k_schedule=2)
  return tx, jax.jit(_step_fn(case, tx, (name, variant)))


def _train(name, params, steps, variant="plain", state=None, every_step=None):
  tx, step = _runner(name, variant)
  state = tx.init(params) if state is None else state
  for t in range(steps):
    params, state, updates = step(params, state, X, Y)
    if every_step is not None:
      every_step(t, params, state, updates)
  return params, state


# ----------------------------------------------------------------------------- expectations

def _expected_pruned(case, params):
  """Pruned count per kernel (layerwise/ste/sparse) or in total (global) at the target."""
  if case.kind == "global":
    return round(sum(params[k]["kernel"].size for k in KERNELS) * TARGET)
  if case.kind == "sparse":
    erk = jp.erk_sparsities(params, TARGET)
    return {k: round(erk[k]["kernel"] * params[k]["kernel"].size) for k in KERNELS}
  return {k: round(TARGET * params[k]["kernel"].size) for k in KERNELS}


def _check_exact(case, params, masks):
  expected = _expected_pruned(case, params)
  pruned = {k: int(np.sum(~np.asarray(masks[k]["kernel"]))) for k in KERNELS}
  if case.kind == "global":
    assert sum(pruned.values()) == expected, pruned
  else:
    assert pruned == expected
  for k in KERNELS:  # biases are not pruned: their mask is the scalar True
    assert np.shape(masks[k]["bias"]) == () and bool(masks[k]["bias"])


def _check_pruned_are_zero(case, params, masks):
  effective = jp.apply_masks(params, masks) if case.kind == "ste" else params
  for k in KERNELS:
    w = np.asarray(effective[k]["kernel"].astype(jnp.float32))
    m = np.asarray(masks[k]["kernel"])
    assert np.all(w[~m] == 0.0), f"{k}: pruned weights are not exactly 0"
    assert np.count_nonzero(w[m]) >= 0.8 * m.sum(), f"{k}: kept weights were zeroed"


def _avals(tree):
  return jax.tree.map(lambda x: (np.shape(x), jnp.result_type(x), getattr(x, "weak_type", False)),
                      tree)


# ----------------------------------------------------------------------------- the checks

@pytest.mark.parametrize("name", NAMES)
def test_trains_to_exact_sparsity(name):
  """Exact counts, exact zeros after many Adam steps, dtypes kept, fixed state, one trace."""
  case = BY_NAME[name]
  params = _params()
  tx, _ = _runner(name)
  init_avals = _avals(tx.init(params))

  def check(t, params, state, updates):
    assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)
    assert _avals(state) == init_avals, "the state's shapes/dtypes changed with the step"
    if case.kind in ("sparse", "fixed") or t >= 8:  # SET/RigL/fixed: exact from step one on
      _check_exact(case, params, jp.masks_from_state(state))

  params, state = _train(name, params, STEPS, every_step=check)
  assert TRACES[(name, "plain")] == 1, "the jitted step was traced more than once"
  masks = jp.masks_from_state(state)
  _check_pruned_are_zero(case, params, masks)
  assert all(m.dtype == jnp.bool_ for m in jax.tree.leaves(masks))
  if case.kind == "ste":  # straight-through: the params themselves stay dense
    assert all(np.count_nonzero(np.asarray(params[k]["kernel"])) == params[k]["kernel"].size
               for k in KERNELS)


@pytest.mark.parametrize("name", NAMES)
def test_multisteps_and_inject_hyperparams(name):
  """Inside optax.MultiSteps, with a traced hyperparameter from inject_hyperparams (the sparsity
  schedule; for SET/RigL the drop fraction), training is exact and equals the plain transform:
  MultiSteps averages two identical gradients (same batch, params unchanged in between)."""
  case = BY_NAME[name]
  p_plain, s_plain = _train(name, _params(), STEPS)
  params, state = _train(name, _params(), 2 * STEPS, variant="multisteps_inject")
  assert TRACES[(name, "multisteps_inject")] == 1
  assert int(state.gradient_step) == STEPS
  masks = jp.masks_from_state(state)
  _check_exact(case, params, masks)
  _check_pruned_are_zero(case, params, masks)
  chex.assert_trees_all_equal(masks, jp.masks_from_state(s_plain))
  chex.assert_trees_all_close(params, p_plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_state_is_stable_through_lax_cond(name):
  """lax.cond(update or skip) type-checks: the updated state has the avals of the initial one."""
  tx, _ = _runner(name)
  params = _params()
  state = tx.init(params)
  grads = jax.grad(_loss)(params, X, Y)

  def maybe_update(pred, state):
    return jax.lax.cond(pred, lambda s: tx.update(grads, s, params)[1], lambda s: s, state)

  out = jax.eval_shape(maybe_update, True, state)  # raises if the branches' types differ
  assert _avals(out) == _avals(state)


@pytest.mark.parametrize("name", NAMES)
def test_tree_map_params(name):
  """optax.tree.map_params (which inits with a placeholder) sees the masks as param trees."""
  tx, _ = _runner(name)
  state = tx.init(_params())
  marked = optax.tree.map_params(tx, lambda _: "param", state, transform_non_params=lambda _: "x")
  found = [s for s in jax.tree.leaves(marked, is_leaf=transforms._is_pruning_state)
           if transforms._is_pruning_state(s)]
  assert len(found) == 1
  assert set(jax.tree.leaves(found[0].masks)) == {"param"}
  assert found[0].count == "x"
  chex.assert_trees_all_equal(optax.tree.map_params(tx, lambda x: x, state), state)


@pytest.mark.parametrize("name", NAMES)
def test_nnx_optimizer_bfloat16(name):
  """A bfloat16 Flax NNX model trains through nnx.Optimizer(model, tx, wrt=nnx.Param)."""
  from flax import nnx

  case = BY_NAME[name]

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.dense1 = nnx.Linear(8, 16, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=rngs)
      self.dense2 = nnx.Linear(16, 4, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=rngs)

    def __call__(self, x):
      return self.dense2(jax.nn.relu(self.dense1(x)))

  model = MLP(nnx.Rngs(0))
  opt = nnx.Optimizer(model, case.make(SCHEDULE), wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(model, opt, x, y):
    traces.append(1)
    def loss(m):
      logits = m(x.astype(jnp.bfloat16)).astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = nnx.grad(loss)(model)
    return opt.update(model, grads, unknown_extra_arg=1.0)

  for _ in range(12):
    updates = step(model, opt, X, Y)
  assert len(traces) == 1
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert {str(p.dtype) for p in jax.tree.leaves(params)} == {"bfloat16"}
  assert {str(u.dtype) for u in jax.tree.leaves(updates)} == {"bfloat16"}
  masks = jp.masks_from_state(opt.opt_state)
  masks = {k: {"kernel": masks[k]["kernel"], "bias": masks[k]["bias"]} for k in KERNELS}
  _check_exact(case, params, masks)
  _check_pruned_are_zero(case, params, masks)


def test_orbax_round_trip(tmp_path):
  """An orbax V1 save/load of every case's state (one checkpoint) gives an equal state and an
  identical continuation."""
  from orbax.checkpoint import v1 as ocp

  trained = {name: _train(name, _params(), 9) for name in NAMES}
  states = {name: state for name, (_, state) in trained.items()}
  ocp.save(tmp_path / "states", states)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=sharding), states)
  restored = ocp.load(tmp_path / "states", abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(states)
  chex.assert_trees_all_equal(restored, states)
  chex.assert_trees_all_equal_dtypes(restored, states)
  # Continue from both with the same compiled step (restored arrays are committed to a device,
  # which would only make jit compile the same step again).
  restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored)
  for name, (params, state) in trained.items():
    p1, s1 = _train(name, params, 6, state=state)
    p2, s2 = _train(name, params, 6, state=restored[name])
    chex.assert_trees_all_equal(p1, p2)
    chex.assert_trees_all_equal(s1, s2)
