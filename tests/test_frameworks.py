"""Framework conformance suite: the same checks through every framework's own training idiom.

Five frameworks hold the same two-layer MLP (8 -> 16 -> 4) in their own parameter tree:

* ``linen``: Flax Linen, trained with ``flax.training.train_state.TrainState``;
* ``nnx``: Flax NNX, trained with ``nnx.Optimizer`` (params are ``nnx.State`` of ``nnx.Param``);
* ``equinox``: an ``eqx.Module`` (``weight`` is ``(out, in)``), trained with ``eqx.filter`` /
  ``filter_grad`` / ``apply_updates``;
* ``haiku``: ``hk.transform`` + ``apply`` (``w`` is ``(in, out)``);
* ``pytree``: a raw tree of a list of NamedTuples, a tuple holding an int-keyed dict with a
  Python float, a ``None`` leaf, and a bfloat16 layer.

Every check asserts what pruning must do, not that code runs: exact pruned counts, pruned weights
exactly 0 in the trained params, masks with the params' tree (same paths, scalar ``True`` for
biases), N:M groups along each layout's input axis, whole output units for ``channels()``, and a
shrunk model equal to the masked one. The checks: GMP, global scope, ERK, 2:4, channels, RigL,
SET, one-shot ``prune``, ``shrink`` of a pure function.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp

pytestmark = pytest.mark.usefixtures("fast_compile")

X = jax.random.normal(jax.random.key(1), (16, 8))
Y = jax.random.normal(jax.random.key(2), (16, 4))
HIDDEN = 16


def _mse(pred):
  return jnp.mean((pred.astype(jnp.float32) - Y) ** 2)


@dataclasses.dataclass
class Case:
  """One framework: its params, how it trains, and where its weights' axes are."""
  name: str
  params: Any                                  # the framework's own params tree
  kernels: dict[str, tuple[int, int]]          # prunable path -> (in_axis, out_axis)
  train: Callable[[optax.GradientTransformation, int], tuple[Any, Any]]  # -> (params, state)
  fn: Callable[[Any, jax.Array], jax.Array]    # a pure forward for surgery
  fn_params: Any = None                        # the tree ``fn`` takes (default: params)


# ----------------------------------------------------------------------------- linen


def _linen() -> Case:
  import flax.linen as nn
  from flax.training import train_state

  class MLP(nn.Module):
    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, name="out")(nn.relu(nn.Dense(self.hidden, name="hidden")(x)))

  params = MLP().init(jax.random.key(0), X)["params"]

  def train(tx, steps):
    state = train_state.TrainState.create(apply_fn=MLP().apply, params=params, tx=tx)

    @jax.jit
    def step(state):
      grads = jax.grad(lambda p: _mse(state.apply_fn({"params": p}, X)))(state.params)
      return state.apply_gradients(grads=grads)

    for _ in range(steps):
      state = step(state)
    return state.params, state.opt_state

  # The model at the size its params have (Linen checks shapes), so it also runs shrunk.
  fn = lambda p, x: MLP(p["hidden"]["bias"].shape[0]).apply({"params": p}, x)
  return Case("linen", params, {"hidden/kernel": (0, 1), "out/kernel": (0, 1)}, train, fn)


# ----------------------------------------------------------------------------- nnx


def _nnx() -> Case:
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, *, rngs):
      self.hidden = nnx.Linear(8, HIDDEN, rngs=rngs)
      self.out = nnx.Linear(HIDDEN, 4, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.hidden(x)))

  def train(tx, steps):
    model = MLP(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
      optimizer.update(model, nnx.grad(lambda m: _mse(m(X)))(model))

    for _ in range(steps):
      step(model, optimizer)
    return nnx.state(model, nnx.Param), optimizer   # the optimizer itself, no nnx.as_pure

  fn, full_state = jp.module_fn(MLP(rngs=nnx.Rngs(0)))
  return Case("nnx", nnx.state(MLP(rngs=nnx.Rngs(0)), nnx.Param),
              {"hidden/kernel": (0, 1), "out/kernel": (0, 1)}, train, fn, full_state)


# ----------------------------------------------------------------------------- equinox


def _equinox() -> Case:
  import equinox as eqx

  class MLP(eqx.Module):
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key):
      k1, k2 = jax.random.split(key)
      self.hidden = eqx.nn.Linear(8, HIDDEN, key=k1)
      self.out = eqx.nn.Linear(HIDDEN, 4, key=k2)

    def __call__(self, x):
      return jax.vmap(lambda v: self.out(jax.nn.relu(self.hidden(v))))(x)

  model = MLP(jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def train(tx, steps):
    m = MLP(jax.random.key(0))
    opt_state = tx.init(eqx.filter(m, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(m, opt_state):
      grads = eqx.filter_grad(lambda m: _mse(m(X)))(m)
      updates, opt_state = tx.update(grads, opt_state, eqx.filter(m, eqx.is_inexact_array))
      return eqx.apply_updates(m, updates), opt_state

    for _ in range(steps):
      m, opt_state = step(m, opt_state)
    return eqx.filter(m, eqx.is_inexact_array), opt_state

  fn = lambda p, x: eqx.combine(p, static)(x)
  return Case("equinox", params, {"hidden/weight": (1, 0), "out/weight": (1, 0)}, train, fn)


# ----------------------------------------------------------------------------- haiku


def _haiku() -> Case:
  import haiku as hk

  @functools.cache
  def transformed(hidden):
    def forward(x):
      return hk.Linear(4, name="out")(jax.nn.relu(hk.Linear(hidden, name="hidden")(x)))
    return hk.without_apply_rng(hk.transform(forward))

  params = transformed(HIDDEN).init(jax.random.key(0), X)

  def train(tx, steps):
    p, opt_state = params, tx.init(params)

    @jax.jit
    def step(p, opt_state):
      grads = jax.grad(lambda p: _mse(transformed(HIDDEN).apply(p, X)))(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state

    for _ in range(steps):
      p, opt_state = step(p, opt_state)
    return p, opt_state

  # Haiku checks parameter shapes: the function builds the model at its params' size.
  fn = lambda p, x: transformed(p["hidden"]["b"].shape[0]).apply(p, x)
  return Case("haiku", params, {"hidden/w": (0, 1), "out/w": (0, 1)}, train, fn)


# ----------------------------------------------------------------------------- raw pytree


class Dense(NamedTuple):
  kernel: jax.Array
  bias: jax.Array


def _pytree() -> Case:
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {
      "blocks": [Dense(jax.random.normal(k1, (8, HIDDEN)) / 3, jnp.zeros(HIDDEN)),
                 Dense((jax.random.normal(k2, (HIDDEN, 4)) / 4).astype(jnp.bfloat16),
                       jnp.zeros(4, jnp.bfloat16))],
      "scales": ({0: 1.0},),          # a Python float under an int key, in a tuple
      "unused": None,
  }

  def fn(p, x):
    h = jax.nn.relu(x @ p["blocks"][0].kernel + p["blocks"][0].bias[None])
    out = h @ p["blocks"][1].kernel.astype(jnp.float32) + p["blocks"][1].bias[None]
    return out * p["scales"][0][0]

  def train(tx, steps):
    def step(_, carry):
      p, opt_state = carry
      grads = jax.grad(lambda p: _mse(fn(p, X)))(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state

    # All steps in one program: a loop of jitted steps would compile three times, as the
    # Python float (weak-typed) comes back from the first step, and its Adam moments from the
    # second, as float32 arrays.
    return jax.jit(lambda p, s, n: jax.lax.fori_loop(0, n, step, (p, s)))(
        params, tx.init(params), steps)

  return Case("pytree", params, {"blocks/0/kernel": (0, 1), "blocks/1/kernel": (0, 1)},
              train, fn)


FRAMEWORKS = {"linen": _linen, "nnx": _nnx, "equinox": _equinox, "haiku": _haiku,
              "pytree": _pytree}


@pytest.fixture(params=list(FRAMEWORKS), scope="module")
def case(request) -> Case:
  return FRAMEWORKS[request.param]()


# ----------------------------------------------------------------------------- checks


def _leaves(tree) -> dict[str, Any]:
  return dict(jp.tree.leaves_with_paths(tree))


def _check(case: Case, params, masks, pruned: dict[str, int]) -> dict[str, np.ndarray]:
  """Masks have the params' tree; each kernel has exactly ``pruned[path]`` pruned weights, all
  exactly 0 in ``params``; every other leaf's mask is scalar True. Returns the kernel masks."""
  assert jp.tree.paths(masks) == jp.tree.paths(params) == jp.tree.paths(case.params)
  p, m = _leaves(params), _leaves(masks)
  out = {}
  for path in p:
    mask = np.asarray(m[path])
    if path not in case.kernels:
      assert mask.shape == () and bool(mask), path       # biases and scalars: not pruned
      continue
    w = np.asarray(p[path]).astype(np.float32)
    assert mask.shape == w.shape and mask.dtype == bool, path
    assert int((~mask).sum()) == pruned[path], (path, int((~mask).sum()), pruned[path])
    np.testing.assert_array_equal(w[~mask], 0.0, err_msg=path)
    out[path] = mask
  return out


def _sizes(case: Case) -> dict[str, int]:
  return {p: int(np.size(x)) for p, x in _leaves(case.params).items() if p in case.kernels}


def _trained(case: Case, tx, steps: int):
  params, state = case.train(tx, steps)
  return params, jp.masks_from_state(state)


def test_default_where_selects_the_weights(case):
  masks = jp.topk_mask(jp.magnitude_scores(case.params), 0.5)
  assert [p for p, m in jp.tree.leaves_with_paths(masks) if np.ndim(m)] == list(case.kernels)


def test_gmp(case):
  tx = jp.magnitude_pruning(jp.polynomial_schedule(0.75, begin_step=0, end_step=4),
                            update_every=2, inner_tx=optax.adam(1e-2))
  params, masks = _trained(case, tx, 6)
  _check(case, params, masks, {p: round(0.75 * n) for p, n in _sizes(case).items()})
  assert float(jp.sparsity(masks)) == pytest.approx(0.75, abs=1e-6)


def test_global(case):
  tx = jp.magnitude_pruning(0.6, scope="global", inner_tx=optax.adam(1e-2))
  params, masks = _trained(case, tx, 3)
  sizes = _sizes(case)
  got = {p: int((~np.asarray(m)).sum()) for p, m in _leaves(masks).items() if p in sizes}
  assert sum(got.values()) == round(0.6 * sum(sizes.values()))
  _check(case, params, masks, got)


def test_erk(case):
  erk = _leaves(jp.erk_sparsities(case.params, 0.8))
  tx = jp.magnitude_pruning(0.8, distribution="erk", inner_tx=optax.adam(1e-2))
  params, masks = _trained(case, tx, 3)
  _check(case, params, masks, {p: round(float(erk[p]) * n) for p, n in _sizes(case).items()})


def test_two_of_four_along_the_input_axis(case):
  tx = jp.magnitude_pruning(0.5, structure=jp.n_of_m(2, 4), inner_tx=optax.adam(1e-2))
  params, masks = _trained(case, tx, 3)
  kept = _check(case, params, masks, {p: n // 2 for p, n in _sizes(case).items()})
  for path, mask in kept.items():
    in_axis = case.kernels[path][0]
    groups = np.moveaxis(mask, in_axis, -1).reshape(-1, mask.shape[in_axis] // 4, 4)
    assert np.all(groups.sum(axis=-1) == 2), path


def test_channels_remove_output_units(case):
  tx = jp.magnitude_pruning(0.5, structure=jp.channels(), inner_tx=optax.adam(1e-2))
  params, masks = _trained(case, tx, 3)
  sizes = _sizes(case)
  shapes = {p: np.shape(x) for p, x in _leaves(case.params).items()}
  kept = _check(case, params, masks, {p: n // 2 for p, n in sizes.items()})
  for path, mask in kept.items():
    out_axis = case.kernels[path][1]
    units = np.moveaxis(mask, out_axis, 0).reshape(shapes[path][out_axis], -1)
    assert np.all(units.all(axis=1) | ~units.any(axis=1)), path    # whole output units
    assert int((~units.any(axis=1)).sum()) == shapes[path][out_axis] // 2, path


def test_rigl_erk(case):
  erk = _leaves(jp.erk_sparsities(case.params, 0.75))
  tx = jp.rigl(optax.adam(1e-2), sparsity=0.75, update_every=2, end_step=10, key=0)
  params, masks = _trained(case, tx, 5)
  _check(case, params, masks, {p: round(float(erk[p]) * n) for p, n in _sizes(case).items()})


def test_set(case):
  tx = jp.set_training(optax.sgd(0.1), sparsity=0.5, update_every=1, end_step=10,
                       distribution="uniform", key=0)
  params, masks = _trained(case, tx, 4)
  _check(case, params, masks, {p: n // 2 for p, n in _sizes(case).items()})


def test_one_shot_prune_returns_the_same_kind(case):
  pruned, masks = jp.prune(case.params, 0.5)
  assert jax.tree.structure(pruned) == jax.tree.structure(case.params)
  _check(case, pruned, masks, {p: n // 2 for p, n in _sizes(case).items()})
  rows = jp.summary(case.params, masks).rows     # the framework's tree with its masks
  assert [(r["path"], r["total"] - r["kept"]) for r in rows] == [
      (p, n // 2) for p, n in _sizes(case).items()]


def test_shrink_pure_function(case):
  params = case.params if case.fn_params is None else case.fn_params
  groups = [g for g in jp.channel_groups(case.fn, params, X) if g.prunable]
  assert len(groups) == 1                            # the hidden units
  masks = jp.group_masks(groups, params, 0.5)
  small = jp.shrink(case.fn, params, masks, X)
  kernels = list(case.kernels)
  shape = {p: np.shape(x) for p, x in _leaves(small).items()}
  assert shape[kernels[0]][case.kernels[kernels[0]][1]] == HIDDEN // 2
  assert shape[kernels[1]][case.kernels[kernels[1]][0]] == HIDDEN // 2
  np.testing.assert_allclose(np.asarray(case.fn(small, X), np.float32),
                             np.asarray(case.fn(jp.apply_masks(params, masks), X), np.float32),
                             rtol=2e-2, atol=2e-2)
