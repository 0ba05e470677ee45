"""One test per failure of issue 13 ("Any model, any framework"): each failed before the fix.

Equinox modules taken for functions; the Equinox layout (``weight`` is ``(out, in, ...)``) read
as Flax's; biases and norm scales of shape ``(C, 1, 1)`` / ``(1, 1, 1, C)`` pruned; NNX trees
rejected next to their own masks; masks lost in ``optax.masked`` / ``multi_transform`` and in
``nnx.state(optimizer)``; and a pruning transform silently defeated by what comes after it.
"""
from __future__ import annotations

import chex
import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune import _checks

pytestmark = pytest.mark.usefixtures("fast_compile")


def _pruned(mask) -> int:
  return int((~np.asarray(mask)).sum())


def _leaves(tree) -> dict:
  return dict(jp.tree.leaves_with_paths(tree))


class CNN(eqx.Module):
  conv: eqx.nn.Conv2d
  lin: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.conv = eqx.nn.Conv2d(4, 8, 3, key=k1)
    self.lin = eqx.nn.Linear(8 * 4 * 4, 12, key=k2)

  def __call__(self, x):
    return self.lin(jax.nn.relu(self.conv(x)).reshape(-1))


def _eqx_params():
  return eqx.filter(CNN(jax.random.key(0)), eqx.is_inexact_array)


# ----------------------------------------------------------------------------- Equinox + ERK


def test_equinox_erk_sparsities_are_a_tree_not_a_function():
  """An eqx.Module is callable: the ERK tree was called as ``(path, leaf) -> sparsity``."""
  params = _eqx_params()
  erk = _leaves(jp.erk_sparsities(params, 0.9))
  masks = jp.topk_mask(jp.magnitude_scores(params), jp.erk_sparsities(params, 0.9))
  for path in ("conv/weight", "lin/weight"):
    n = np.size(_leaves(params)[path])
    assert _pruned(_leaves(masks)[path]) == round(erk[path] * n)


@pytest.mark.parametrize("make", [
    lambda: jp.magnitude_pruning(0.9, distribution="erk", inner_tx=optax.sgd(0.1)),
    lambda: jp.rigl(optax.sgd(0.1), sparsity=0.9, update_every=1, end_step=5),
    lambda: jp.set_training(optax.sgd(0.1), sparsity=0.9, update_every=1, end_step=5),
], ids=["magnitude_erk", "rigl", "set"])
def test_equinox_erk_transforms(make):
  params = _eqx_params()
  erk = _leaves(jp.erk_sparsities(params, 0.9))
  tx = make()
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(jax.tree.map(jnp.sign, params), state, params)
    params = eqx.apply_updates(params, updates)
  masks = _leaves(jp.masks_from_state(state))
  for path, w in _leaves(params).items():
    if path.endswith("weight"):
      assert _pruned(masks[path]) == round(erk[path] * np.size(w)), path
      np.testing.assert_array_equal(np.asarray(w)[~np.asarray(masks[path])], 0.0)
    else:
      assert np.shape(masks[path]) == ()


def test_prune_takes_a_callable_score_tree_as_a_tree():
  params = _eqx_params()
  scores = jax.tree.map(lambda w: -jnp.abs(w), params)   # an eqx.Module: callable
  _, masks = jp.prune(params, 0.5, scores=scores)
  w = np.asarray(params.lin.weight)
  keep = np.asarray(masks.lin.weight)
  assert np.abs(w[keep]).max() <= np.abs(w[~keep]).min()    # the smallest |w| kept


# ----------------------------------------------------------------------------- layouts


def test_equinox_conv_bias_is_not_pruned():
  params = _eqx_params()
  assert params.conv.bias.shape == (8, 1, 1)
  masks = jp.topk_mask(jp.magnitude_scores(params), 0.5)
  assert np.shape(masks.conv.bias) == () and np.shape(masks.lin.bias) == ()
  assert [r["path"] for r in jp.summary(params).rows] == ["conv/weight", "lin/weight"]


def test_equinox_n_of_m_along_the_input_axis():
  params = _eqx_params()
  masks = jp.topk_mask(jp.magnitude_scores(params), 0.5, structure=jp.n_of_m(2, 4))
  conv = np.asarray(masks.conv.weight)                 # (out=8, in=4, 3, 3)
  assert np.all(conv.sum(axis=1) == 2)
  lin = np.asarray(masks.lin.weight)                   # (out=12, in=128)
  assert np.all(lin.reshape(12, 32, 4).sum(axis=-1) == 2)


def test_equinox_channels_remove_output_units():
  params = _eqx_params()
  masks = jp.topk_mask(jp.magnitude_scores(params), 0.5, structure=jp.channels())
  conv = np.asarray(masks.conv.weight).reshape(8, -1)
  lin = np.asarray(masks.lin.weight)
  for units, n in ((conv, 8), (lin, 12)):
    assert np.all(units.all(axis=1) | ~units.any(axis=1))
    assert int((~units.any(axis=1)).sum()) == n // 2
  # per_output: every output unit (row) loses the same count
  masks = jp.topk_mask(jp.magnitude_scores(params), 0.25, structure=jp.per_output())
  assert set((~np.asarray(masks.lin.weight)).sum(axis=1)) == {32}


def test_layout_overrides_per_call_and_per_tree():
  params = _eqx_params()
  scores = jp.magnitude_scores(params)
  per_call = jp.topk_mask(scores, 0.5, structure=jp.n_of_m(2, 4, axis=0))     # along out
  assert np.all(np.asarray(per_call.lin.weight).reshape(3, 4, 128).sum(axis=1) == 2)
  flax_like = jp.topk_mask(scores, 0.5, structure=jp.channels(), layout="flax")
  cols = np.asarray(flax_like.lin.weight)                # channels along -1 now
  assert np.all(cols.all(axis=0) | ~cols.any(axis=0))
  custom = jp.topk_mask(scores, 0.5, structure=jp.channels(),
                        layout=lambda path, leaf: jp.tree.Layout(in_axis=0, out_axis=1))
  chex.assert_trees_all_equal(custom.lin.weight, flax_like.lin.weight)
  same = jp.topk_mask(scores, 0.5, structure=jp.channels(), layout=jp.tree.IN_OUT)
  chex.assert_trees_all_equal(same, flax_like)
  with pytest.raises(ValueError, match="layout must be one of"):
    jp.topk_mask(scores, 0.5, structure=jp.channels(), layout="tensorflow")
  # transforms take it too
  tx = jp.magnitude_pruning(0.5, structure=jp.channels(), layout="flax", inner_tx=optax.sgd(.1))
  _, state = tx.update(scores, tx.init(params), params)
  chex.assert_trees_all_equal(jp.masks_from_state(state).lin.weight, flax_like.lin.weight)


def test_activation_scores_follow_the_layout():
  """Wanda's input norms go along each weight's input axis: 1 for an Equinox (out, in) weight."""
  params = {"lin": {"weight": jnp.ones((3, 2))}, "dense": {"kernel": jnp.ones((2, 3))}}
  norms = {"lin": {"weight": jnp.array([2., 5.])}, "dense": {"kernel": jnp.array([2., 5.])}}
  s = jp.activation_scores(params, norms)
  np.testing.assert_array_equal(s["lin"]["weight"], [[2., 5.]] * 3)
  np.testing.assert_array_equal(s["dense"]["kernel"], [[2.] * 3, [5.] * 3])
  with pytest.raises(ValueError, match="input axis 1 of shape"):
    jp.activation_scores(params, {"lin": {"weight": jnp.ones(3)}, "dense": {"kernel": norms[
        "dense"]["kernel"]}})


def test_layout_names():
  assert jp.tree.default_layout("blocks/0/kernel") == jp.tree.IN_OUT
  assert jp.tree.default_layout("mlp/~/linear_0/w") == jp.tree.IN_OUT
  assert jp.tree.default_layout("layers/0/weight") == jp.tree.OUT_IN
  assert jp.tree.default_layout("cell/weight_ih") == jp.tree.OUT_IN
  assert jp.tree.default_layout("features.0.weight") == jp.tree.OUT_IN          # a state_dict key
  assert jp.tree.default_layout("conv2_d_transpose/w") == jp.tree.Layout(-1, -2)  # Haiku


def test_haiku_biases_and_batchnorm_scales_of_any_shape_are_not_pruned():
  def forward(x, is_training):
    x = hk.Conv2D(8, 3, data_format="NCHW")(x)             # b: (8, 1, 1)
    x = hk.BatchNorm(True, True, 0.9, data_format="N...C")(x.transpose(0, 2, 3, 1), is_training)
    return hk.Conv2DTranspose(4, 3)(x)                     # w: (3, 3, out=4, in=8)

  f = hk.transform_with_state(forward)
  params, _ = f.init(jax.random.key(0), jnp.ones((1, 3, 6, 6)), True)
  shapes = {p: np.shape(x) for p, x in _leaves(params).items()}
  assert shapes["conv2_d/b"] == (8, 1, 1) and shapes["batch_norm/scale"] == (1, 1, 1, 8)
  masks = jp.topk_mask(jp.magnitude_scores(params), 0.5, structure=jp.channels())
  pruned = [p for p, m in _leaves(masks).items() if np.ndim(m)]
  assert pruned == ["conv2_d/w", "conv2_d_transpose/w"]
  t = np.asarray(_leaves(masks)["conv2_d_transpose/w"])   # output units along axis -2
  units = np.moveaxis(t, -2, 0).reshape(4, -1)
  assert np.all(units.all(axis=1) | ~units.any(axis=1)) and int((~units.any(axis=1)).sum()) == 2


def test_equinox_layernorm_weight_of_any_shape_is_not_pruned():
  model = eqx.nn.Sequential([eqx.nn.Linear(8, 8, key=jax.random.key(0)),
                             eqx.nn.LayerNorm((2, 4))])
  params = eqx.filter(model, eqx.is_inexact_array)
  masks = jp.topk_mask(jp.magnitude_scores(params), 0.5)
  assert [p for p, m in _leaves(masks).items() if np.ndim(m)] == ["layers/0/weight"]


# ----------------------------------------------------------------------------- NNX


class _Net:
  @staticmethod
  def make():
    from flax import nnx

    class Net(nnx.Module):
      def __init__(self, rngs):
        self.a = nnx.Linear(8, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.b = nnx.Linear(16, 4, rngs=rngs)

      def __call__(self, x):
        return self.b(nnx.relu(self.bn(self.a(x))))

    return Net(nnx.Rngs(0))


def test_nnx_state_with_the_masks_from_its_optimizer():
  from flax import nnx
  model = _Net.make()
  optimizer = nnx.Optimizer(model, optax.chain(optax.adam(1e-2), jp.magnitude_pruning(0.5)),
                            wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 8))) ** 2))(model)
  optimizer.update(model, grads)
  params = nnx.state(model, nnx.Param)                 # Variables, no nnx.as_pure
  for source in (optimizer, optimizer.opt_state, nnx.state(optimizer)):
    masks = jp.masks_from_state(source)
    assert jp.tree.paths(masks) == jp.tree.paths(params)
    assert [(r["path"], r["kept"]) for r in jp.summary(params, masks).rows] == [
        ("a/kernel", 64), ("b/kernel", 32)]
    masked = jp.apply_masks(params, masks)
    assert isinstance(masked["a"]["kernel"], nnx.Param)          # the same kind back
    assert float(jp.sparsity(masked)) == 0.5
    assert float(jp.sparsity(params)) == 0.5
  # replace_masks on nnx.state(optimizer) goes back into the optimizer
  fewer = jax.tree.map(lambda m: jnp.ones_like(m), jp.masks_from_state(optimizer))
  nnx.update(optimizer, jp.replace_masks(nnx.state(optimizer), fewer))
  assert all(bool(m.all()) for m in jax.tree.leaves(jp.masks_from_state(optimizer)))


def test_tree_mismatch_message_is_short_and_names_the_path():
  from flax import nnx
  params = nnx.state(_Net.make(), nnx.Param)
  masks = jax.tree.map(lambda x: jnp.ones((), bool), nnx.as_pure(params))
  del masks["b"]["kernel"]
  with pytest.raises(ValueError, match="different tree structures") as err:
    jp.apply_masks(params, masks)
  assert "b/kernel" in str(err.value) and len(str(err.value)) < 300


# ----------------------------------------------------------------------------- masks_from_state


def _params():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {"a": {"kernel": jax.random.normal(k1, (8, 8)), "bias": jnp.zeros(8)},
          "b": {"kernel": jax.random.normal(k2, (8, 4)), "bias": jnp.zeros(4)},
          "c": {"kernel": jax.random.normal(k3, (4, 4))}}


def _train(tx, params, steps=2, **extra):
  """``steps`` updates in one jitted loop (eagerly, every step compiled the wrappers' conds)."""
  def step(_, carry):
    params, state = carry
    updates, state = tx.update(jax.tree.map(jnp.sin, params), state, params, **extra)
    return optax.apply_updates(params, updates), state

  return jax.jit(lambda p, s: jax.lax.fori_loop(0, steps, step, (p, s)))(params, tx.init(params))


def test_masks_from_state_through_masked_and_multi_transform():
  params = _params()
  only_a = lambda p: {k: jax.tree.map(lambda _, k=k: k == "a", v) for k, v in p.items()}
  tx = optax.chain(optax.adam(1e-2), optax.masked(jp.magnitude_pruning(0.5), only_a))
  trained, state = _train(tx, params)
  masks = jp.masks_from_state(state)
  assert jp.tree.paths(masks) == jp.tree.paths(params)
  assert [(r["path"], r["kept"]) for r in jp.summary(trained, masks).rows] == [
      ("a/kernel", 32), ("b/kernel", 32), ("c/kernel", 16)]
  keep = np.asarray(masks["a"]["kernel"])
  np.testing.assert_array_equal(np.asarray(trained["a"]["kernel"])[~keep], 0.0)

  labels = {"a": {"kernel": "x", "bias": "x"}, "b": {"kernel": "y", "bias": "y"},
            "c": {"kernel": "z"}}
  tx = optax.multi_transform({"x": optax.chain(optax.adam(1e-2), jp.magnitude_pruning(0.5)),
                              "y": jp.magnitude_pruning(0.75, inner_tx=optax.sgd(0.1)),
                              "z": optax.sgd(0.1)}, labels)
  trained, state = _train(tx, params)
  masks = jp.masks_from_state(state)
  assert jp.tree.paths(masks) == jp.tree.paths(params)
  assert [(r["path"], r["kept"]) for r in jp.summary(trained, masks).rows] == [
      ("a/kernel", 32), ("b/kernel", 8), ("c/kernel", 16)]
  assert [(r["path"], r["kept"]) for r in jp.summary(trained).rows] == [
      ("a/kernel", 32), ("b/kernel", 8), ("c/kernel", 16)]


@pytest.mark.parametrize("wrap", [
    lambda tx: optax.MultiSteps(tx, every_k_schedule=2),
    lambda tx: optax.chain(optax.adam(1e-2),
                           optax.inject_hyperparams(jp.magnitude_pruning)(sparsity=0.5)),
    lambda tx: optax.apply_if_finite(tx, 3),
    lambda tx: optax.chain(optax.chain(optax.identity(), tx), optax.identity()),
    lambda tx: optax.chain(tx, jp.magnitude_pruning(0.25)),   # two links: merged
], ids=["MultiSteps", "inject_hyperparams", "apply_if_finite", "nested", "two_links"])
def test_masks_from_state_through_wrappers(wrap):
  params = _params()
  tx = wrap(optax.chain(optax.adam(1e-2), jp.magnitude_pruning(0.5)))
  trained, state = _train(tx, params, steps=4)
  masks = jp.masks_from_state(state)
  assert jp.tree.paths(masks) == jp.tree.paths(params)
  assert [_pruned(masks[k]["kernel"]) for k in "abc"] == [32, 16, 8]
  for k in "abc":
    np.testing.assert_array_equal(
        np.asarray(trained[k]["kernel"])[~np.asarray(masks[k]["kernel"])], 0.0)


# ----------------------------------------------------------------------------- misuse


def _jit_train(tx, params, steps, loss=None):
  @jax.jit
  def step(params, state):
    extra = {} if loss is None else {"value": loss}
    model = params.fast if isinstance(params, optax.LookaheadParams) else params
    updates, state = tx.update(jax.tree.map(jnp.sin, model), state, params, **extra)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return jax.block_until_ready(params), state


def _plateau():
  return optax.contrib.reduce_on_plateau(factor=0.5, patience=0, accumulation_size=1)


@pytest.mark.parametrize("tx, loss", [
    (optax.chain(optax.adam(1e-2), jp.magnitude_pruning(0.5), optax.clip_by_global_norm(1e-3)),
     None),
    (optax.chain(optax.adam(1e-2), jp.magnitude_pruning(0.5), _plateau()), 1.0),
    (optax.chain(jp.magnitude_pruning(0.5), optax.adam(1e-2)), None),
    (optax.chain(jp.rigl(optax.adam(1e-2), sparsity=0.5, update_every=2, end_step=9,
                         distribution="uniform"), optax.scale(0.5)), None),
    (optax.lookahead(optax.chain(optax.adam(1e-2), jp.magnitude_pruning(0.5)), 2, 0.5), None),
], ids=["clip_after", "reduce_on_plateau_after", "link_first", "rigl_then_scale",
        "link_in_lookahead"])
def test_misplaced_transform_raises_with_the_fix(tx, loss):
  params = _params()
  if "lookahead" in repr(tx.init):
    params = optax.LookaheadParams.init_synced(params)
  with pytest.raises(_checks.RUNTIME_ERRORS, match=r"inner_tx=optax\.chain") as err:
    _jit_train(tx, params, 6, loss)
  assert "are not 0 in the params" in str(err.value)


def test_wrapper_form_cannot_be_misplaced():
  """The primary form: everything inside inner_tx, pruned weights exactly 0 at every step."""
  params = _params()
  tx = jp.magnitude_pruning(jp.polynomial_schedule(0.75, begin_step=0, end_step=4),
                            update_every=2, inner_tx=optax.chain(
                                optax.clip_by_global_norm(1e-3), optax.adam(1e-2), _plateau()))
  trained, state = _jit_train(tx, params, 8, loss=1.0)
  masks = jp.masks_from_state(state)
  for k, n in (("a", 64), ("b", 32), ("c", 16)):
    assert _pruned(masks[k]["kernel"]) == round(0.75 * n)
    np.testing.assert_array_equal(
        np.asarray(trained[k]["kernel"])[~np.asarray(masks[k]["kernel"])], 0.0)


@pytest.mark.parametrize("make", [
    lambda inner: jp.magnitude_pruning(0.5, inner_tx=inner),
    lambda inner: jp.rigl(inner, sparsity=0.5, update_every=2, end_step=9,
                          distribution="uniform"),
], ids=["magnitude", "rigl"])
def test_lookahead_inside_the_wrapper_prunes_fast_and_slow(make):
  params = optax.LookaheadParams.init_synced(_params())
  tx = make(optax.lookahead(optax.adam(1e-2), sync_period=2, slow_step_size=0.5))

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.tree.map(jnp.sin, params.fast), state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(5):
    params, state = step(params, state)
  masks = jp.masks_from_state(state)
  assert jp.tree.paths(masks) == jp.tree.paths(params.fast)
  for k, n in (("a", 64), ("b", 32), ("c", 16)):
    keep = np.asarray(masks[k]["kernel"])
    assert _pruned(keep) == n // 2
    for weights in (params.fast, params.slow):
      np.testing.assert_array_equal(np.asarray(weights[k]["kernel"])[~keep], 0.0)


def test_misplacement_check_under_vmap_and_scan():
  """A whole RigL step vmapped over 4 seeds: fine when placed right, loud when not; the same
  inside lax.scan (gradient accumulation)."""
  params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}

  def steps(tx):
    def run(key):
      p = {"w": params["w"] + jax.random.normal(key, (8, 8)) * 0.1}
      state = tx.init(p)

      def body(carry, _):
        p, state = carry
        updates, state = tx.update(jax.tree.map(jnp.sin, p), state, p)
        return (optax.apply_updates(p, updates), state), None

      (p, state), _ = jax.lax.scan(body, (p, state), None, length=5)
      return p, jp.masks_from_state(state)
    return jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(1), 4))

  good = jp.rigl(optax.adam(1e-2), sparsity=0.5, update_every=2, end_step=9,
                 distribution="uniform", key=0)
  p, masks = jax.block_until_ready(steps(good))
  assert [int(s) for s in (~np.asarray(masks["w"])).sum(axis=(1, 2))] == [32] * 4
  np.testing.assert_array_equal(np.asarray(p["w"])[~np.asarray(masks["w"])], 0.0)
  with pytest.raises(_checks.RUNTIME_ERRORS, match="jaxprune.rigl"):
    jax.block_until_ready(steps(optax.chain(good, optax.scale(0.5))))
