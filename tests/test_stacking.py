"""Stacked layers (``stacked=``): an NNX transformer built with ``nnx.scan`` is pruned exactly
as the same model unrolled, layer by layer, for every allocation and structure."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp

L, D, H = 2, 16, 32
STACKED = {"layers/.*": 0}


class Block(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(2, D, qkv_features=D, decode=False, rngs=rngs)
    self.up = nnx.Linear(D, H, rngs=rngs)
    self.down = nnx.Linear(H, D, rngs=rngs)
    self.norm = nnx.LayerNorm(D, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm(x))
    return x + self.down(jax.nn.gelu(self.up(x)))


class Scanned(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(8, D, rngs=rngs)

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return Block(rngs)

    self.layers = create(rngs)
    self.head = nnx.Linear(D, 4, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.head(body(self.embed(x), self.layers))


class Unrolled(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(8, D, rngs=rngs)
    self.blocks = nnx.List([Block(rngs) for _ in range(L)])
    self.head = nnx.Linear(D, 4, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    for b in self.blocks:
      x = b(x)
    return self.head(x)


@functools.cache
def _models():
  scanned = Scanned(nnx.Rngs(0))
  stacked = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  unrolled = Unrolled(nnx.Rngs(1))
  flat = {"embed": stacked["embed"], "head": stacked["head"],
          "blocks": {i: jax.tree.map(lambda x, i=i: x[i], stacked["layers"]) for i in range(L)}}
  nnx.replace_by_pure_dict(state := nnx.state(unrolled, nnx.Param), flat)
  nnx.update(unrolled, state)
  return scanned, unrolled


def _params():
  scanned, unrolled = _models()
  return (nnx.to_pure_dict(nnx.state(scanned, nnx.Param)),
          nnx.to_pure_dict(nnx.state(unrolled, nnx.Param)))


def _assert_layer_by_layer(m_stacked, m_unrolled):
  assert m_stacked.keys() == {"embed", "layers", "head"}
  for part in ("embed", "head"):
    jax.tree.map(np.testing.assert_array_equal, m_stacked[part], m_unrolled[part])
  leaves_s = jax.tree.leaves_with_path(m_stacked["layers"])
  n_pruned_leaves = 0
  for i in range(L):
    leaves_u = jax.tree.leaves_with_path(m_unrolled["blocks"][i])
    assert [p for p, _ in leaves_s] == [p for p, _ in leaves_u]
    for (p, s), (_, u) in zip(leaves_s, leaves_u):
      if np.ndim(s) == 0:
        assert np.ndim(u) == 0 and bool(u) and bool(s), p
      else:
        n_pruned_leaves += 1
        np.testing.assert_array_equal(np.asarray(s)[i], np.asarray(u), err_msg=f"{p}[{i}]")
  assert n_pruned_leaves >= 3 * L  # e.g. the attention output and the two MLP kernels


def test_models_are_the_same_model():
  scanned, unrolled = _models()
  x = jax.random.normal(jax.random.key(2), (2, 5, 8))
  np.testing.assert_allclose(scanned(x), unrolled(x), rtol=1e-5, atol=1e-5)


STRUCTURES = {
    "unstructured": None,
    "n_of_m": jp.n_of_m(2, 4),
    "channels": jp.channels(),
    "per_output": jp.per_output(),
}


def _mask_fn(name):
  st = STRUCTURES[name]
  where = None  # the default rule, judged per layer for the stacked model
  if name == "n_of_m":  # the kernels whose input axis groups by 4 (in a layer: axis -2)
    where = lambda p, x: p.endswith("kernel") and x.ndim >= 2 and x.shape[-2] % 4 == 0
  return lambda p, s, stk: jp.topk_mask(jp.magnitude_scores(p), s, structure=st, stacked=stk,
                                        where=where)


@functools.cache
def _eager_masks(name):
  """(stacked, unrolled) masks of one structure, eagerly (shared by the jit case)."""
  stacked, unrolled = _params()
  f, s = _mask_fn(name), 0.5 if name == "n_of_m" else 0.7
  return f(stacked, s, jp.stacking.freeze(STACKED)), f(unrolled, s, None)


@pytest.mark.parametrize("name", list(STRUCTURES))
@pytest.mark.parametrize("jit", [False, True])
def test_masks_equal_unrolled_layer_by_layer(name, jit):
  stacked, _ = _params()
  ms, mu = _eager_masks(name)
  if jit:  # jitted, a traced sparsity: the same masks as eagerly, so layer by layer too
    f = jax.jit(_mask_fn(name), static_argnums=2)
    s = jnp.float32(0.5 if name == "n_of_m" else 0.7)
    ms_jit = f(stacked, s, jp.stacking.freeze(STACKED))
    jax.tree.map(np.testing.assert_array_equal, ms_jit, ms)
    ms = ms_jit
  _assert_layer_by_layer(ms, mu)
  if name in ("unstructured", "per_output"):  # exact per layer: round(s·n_slice) in each slice
    k = stacked["layers"]["up"]["kernel"]
    m = np.asarray(ms["layers"]["up"]["kernel"])
    d_in, d_out = k.shape[1:]
    per_layer = round(0.7 * d_in) * d_out if name == "per_output" else round(0.7 * d_in * d_out)
    assert [int((~m[i]).sum()) for i in range(L)] == [per_layer] * L


def test_blocks_and_a_stack_axis_that_is_not_leading():
  stacked, unrolled = _params()
  moved = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1) if x.ndim >= 3 else x, stacked["layers"])
  ax1 = jp.topk_mask(jp.magnitude_scores({"layers": moved}), 0.5, structure=jp.blocks((2, 2)),
                     where=lambda p, x: p.endswith("kernel") and x.ndim == 4,
                     stacked=lambda path, x: 1)["layers"]
  ax0 = jp.topk_mask(jp.magnitude_scores(stacked), 0.5, structure=jp.blocks((2, 2)),
                     where=lambda p, x: p.endswith("kernel") and x.ndim == 4,
                     stacked=STACKED)["layers"]
  q1, q0 = np.asarray(ax1["attn"]["query"]["kernel"]), np.asarray(ax0["attn"]["query"]["kernel"])
  np.testing.assert_array_equal(np.moveaxis(q1, 1, 0), q0)
  mu = jp.topk_mask(jp.magnitude_scores(unrolled), 0.5, structure=jp.blocks((2, 2)),
                    where=lambda p, x: p.endswith("kernel") and x.ndim == 3)
  for i in range(L):
    np.testing.assert_array_equal(q0[i], mu["blocks"][i]["attn"]["query"]["kernel"])


def test_erk_and_global_equal_unrolled():
  stacked, unrolled = _params()
  e_s = jp.erk_sparsities(stacked, 0.8, stacked=STACKED)
  e_u = jp.erk_sparsities(unrolled, 0.8)
  assert e_s["layers"]["up"]["kernel"] == pytest.approx(e_u["blocks"][0]["up"]["kernel"])
  assert e_s["head"]["kernel"] == pytest.approx(e_u["head"]["kernel"])
  ms = jp.topk_mask(jp.magnitude_scores(stacked), e_s, stacked=STACKED)
  mu = jp.topk_mask(jp.magnitude_scores(unrolled), e_u)
  _assert_layer_by_layer(ms, mu)
  # Channels in global scope: a unit is one output channel of one layer, never of all layers.
  gs = jp.topk_mask(jp.magnitude_scores(stacked), 0.6, scope="global",
                    structure=jp.channels(), stacked=STACKED)
  gu = jp.topk_mask(jp.magnitude_scores(unrolled), 0.6, scope="global", structure=jp.channels())
  _assert_layer_by_layer(gs, gu)


def test_summary_reports_each_layer():
  stacked, unrolled = _params()
  ms = jp.topk_mask(jp.magnitude_scores(stacked), 0.7, stacked=STACKED)
  mu = jp.topk_mask(jp.magnitude_scores(unrolled), 0.7)
  rows_s = jp.summary(stacked, ms, stacked=STACKED).rows
  rows_u = jp.summary(unrolled, mu).rows
  assert len(rows_s) == len(rows_u)
  by_path = {r["path"]: r for r in rows_s}
  for r in rows_u:
    parts = r["path"].split("/")
    if parts[0] == "blocks":
      r2 = by_path["/".join(["layers"] + parts[2:]) + f"[{parts[1]}]"]
    else:
      r2 = by_path[r["path"]]
    assert (r2["shape"], r2["kept"], r2["total"]) == (r["shape"], r["kept"], r["total"])


def test_transform_on_the_scanned_model_equals_unrolled():
  """magnitude_pruning (ERK, gradual) through nnx.Optimizer on the scanned model: the same
  masks, layer by layer, as the unrolled model after the same steps."""
  x = jax.random.normal(jax.random.key(3), (4, 5, 8))
  y = jnp.arange(4 * 5).reshape(4, 5) % 4
  sched = jp.polynomial_schedule(0.8, begin_step=0, end_step=4)

  def train(model, stacked):
    tx = optax.chain(optax.adam(1e-2), jp.magnitude_pruning(
        sched, update_every=2, distribution="erk", stacked=stacked))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
      loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
      opt.update(model, nnx.grad(loss)(model))

    for _ in range(6):
      step(model, opt)
    return nnx.to_pure_dict(jp.masks_from_state(opt.opt_state)), model

  scanned, unrolled = _models()
  scanned, unrolled = nnx.clone(scanned), nnx.clone(unrolled)
  ms, scanned = train(scanned, STACKED)
  mu, unrolled = train(unrolled, None)
  _assert_layer_by_layer(ms, mu)
  p = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  k, m = np.asarray(p["layers"]["up"]["kernel"]), np.asarray(ms["layers"]["up"]["kernel"])
  assert np.all(k[~m] == 0)
  erk = jp.erk_sparsities(p, 0.8, stacked=STACKED)["layers"]["up"]["kernel"]
  assert [int((~m[i]).sum()) for i in range(L)] == [round(erk * k[0].size)] * L


def test_bad_stacked_axis_names_the_leaf():
  stacked, _ = _params()
  with pytest.raises(ValueError, match="layers/up/kernel"):
    jp.topk_mask(jp.magnitude_scores(stacked), 0.5, stacked={"layers/up/kernel": 5})
  with pytest.raises(ValueError, match="match no prunable leaf"):
    jp.topk_mask(jp.magnitude_scores(stacked), 0.5, stacked={"nothing/.*": 0})
