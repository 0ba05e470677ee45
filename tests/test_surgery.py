"""Tests for jaxprune.surgery: coupled channel groups found by tracing, and shrinking that keeps
the model's function (shrunk output == masked output) on an MLP, a CNN with BatchNorm, a
residual block, a GRU and a transformer block, plus the refusals."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import surgery


def _randn(seed, shape, dtype=np.float32):
  """Normal samples made on the host (jax.random would compile once per shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _members(group):
  return {(m.path, m.axis, m.masked) for m in group.members}


def _by_name(groups):
  return {g.name: g for g in groups}


def _shapes(tree):
  return {jp.tree.path_str(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(v, "shape")}


def _removed(masks, path, axis):
  """Channels of a leaf's axis that a mask removes entirely."""
  m = np.asarray(masks[path]) if isinstance(masks, dict) else masks
  return int((~np.moveaxis(m, axis, 0).reshape(m.shape[axis], -1).any(axis=1)).sum())


def _assert_close(a, b, dtype=jnp.float32):
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                             rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- MLP (pure fn)

def _mlp(dtype=jnp.float32):
  shapes = {"w1": (4, 8), "b1": (8,), "w2": (8, 6), "b2": (6,), "w3": (6, 3), "b3": (3,)}
  params = {k: _randn(i, v).astype(dtype) for i, (k, v) in enumerate(shapes.items())}

  def fn(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"][None])
    h = jax.nn.relu(h @ p["w2"] + p["b2"][None])
    return h @ p["w3"] + p["b3"][None]

  return fn, params


def test_mlp_groups_exact():
  fn, params = _mlp()
  groups = _by_name(surgery.channel_groups(fn, params, jnp.ones((2, 4))))
  assert set(groups) == {"w1:1", "w2:1", "w3:1", "w1:0"}
  assert _members(groups["w1:1"]) == {("b1", 0, False), ("w1", 1, True), ("w2", 0, True)}
  assert _members(groups["w2:1"]) == {("b2", 0, False), ("w2", 1, True), ("w3", 0, True)}
  assert _members(groups["w3:1"]) == {("b3", 0, False), ("w3", 1, True)}
  assert _members(groups["w1:0"]) == {("w1", 0, True)}
  assert groups["w1:1"].prunable and groups["w2:1"].prunable
  assert groups["w1:1"].size == 8 and groups["w2:1"].size == 6
  assert not groups["w3:1"].prunable and groups["w3:1"].fixed
  assert "output" in groups["w3:1"].reasons[0]
  assert not groups["w1:0"].prunable and "input" in groups["w1:0"].reasons[0]


@pytest.fixture(scope="module")
def mlp_half():
  """The MLP, its groups and group masks at sparsity 0.5 (shared: building masks compiles)."""
  fn, params = _mlp()
  groups = surgery.channel_groups(fn, params, jnp.ones((2, 4)))
  return fn, params, groups, surgery.group_masks(groups, params, 0.5)


def _check_mlp(fn, params, masks, sparsity, dtype):
  k1, k2 = round(sparsity * 8), round(sparsity * 6)
  # exact counts: round(s * n) channels removed from every masked member of each group
  assert _removed(masks, "w1", 1) == k1 and _removed(masks, "w2", 0) == k1
  assert _removed(masks, "w2", 1) == k2 and _removed(masks, "w3", 0) == k2
  assert _removed(masks, "w1", 0) == 0 and _removed(masks, "w3", 1) == 0
  assert masks["b1"].shape == () and masks["w3"].shape == (6, 3)
  x = jnp.ones((2, 4), dtype)
  small = surgery.shrink(fn, params, masks, x)
  assert _shapes(small) == {"w1": (4, 8 - k1), "b1": (8 - k1,), "w2": (8 - k1, 6 - k2),
                            "b2": (6 - k2,), "w3": (6 - k2, 3), "b3": (3,)}
  assert all(v.dtype == dtype for v in jax.tree.leaves(small))
  masked = jp.apply_masks(params, masks)
  for seed in range(3):  # other inputs, other batch sizes
    xs = _randn(seed + 10, (seed + 1, 4)).astype(dtype)
    _assert_close(jax.jit(fn)(small, xs), jax.jit(fn)(masked, xs), dtype)
  # the masked model really differs from the dense one (the test is not vacuous)
  assert not np.allclose(jax.jit(fn)(params, x).astype(jnp.float32),
                         jax.jit(fn)(masked, x).astype(jnp.float32))


def test_mlp_shrink_equals_masked(mlp_half):
  fn, params, _, masks = mlp_half
  _check_mlp(fn, params, masks, 0.5, jnp.float32)
  # extra unstructured zeros inside kept channels stay zeros in the smaller arrays
  row = int(np.nonzero(np.asarray(masks["w2"]).any(1))[0][0])
  col = int(np.nonzero(np.asarray(masks["w2"]).any(0))[0][0])
  more = dict(masks, w2=masks["w2"].at[row, col].set(False))
  small = surgery.shrink(fn, params, more, jnp.ones((2, 4)))
  assert small["w2"].shape == (4, 3) and int(jnp.sum(small["w2"] == 0)) == 1
  xs = _randn(7, (5, 4))
  _assert_close(jax.jit(fn)(small, xs), jax.jit(fn)(jp.apply_masks(params, more), xs))


def test_mlp_shrink_bfloat16_quarter():
  fn, params = _mlp(jnp.bfloat16)
  groups = surgery.channel_groups(fn, params, jnp.ones((2, 4), jnp.bfloat16))
  _check_mlp(fn, params, surgery.group_masks(groups, params, 0.25), 0.25, jnp.bfloat16)


def test_group_scores_l2_and_jit(mlp_half):
  fn, params, groups, masks = mlp_half
  scores = surgery.group_scores(groups, params)
  assert set(scores) == {"w1:1", "w2:1"}
  want = jnp.sqrt(jnp.sum(params["w1"] ** 2, 0) + jnp.sum(params["w2"] ** 2, 1))
  np.testing.assert_allclose(scores["w1:1"], want, rtol=1e-6)
  jitted = jax.jit(lambda p: surgery.group_scores(groups, p))(params)
  np.testing.assert_allclose(jitted["w2:1"], scores["w2:1"], rtol=1e-6)
  # custom per-weight scores: sum of |w| over the masked members' slices
  l1 = surgery.group_scores(groups, params, jp.magnitude_scores(params))
  np.testing.assert_allclose(
      l1["w1:1"], jnp.sum(jnp.abs(params["w1"]), 0) + jnp.sum(jnp.abs(params["w2"]), 1),
      rtol=1e-6)
  # the lowest-L2 channels are the ones removed
  removed = np.nonzero(~np.asarray(masks["w1"]).any(0))[0]
  np.testing.assert_array_equal(np.sort(removed), np.sort(np.argsort(np.asarray(want))[:4]))
  # global scope: exactly round(0.5 * 14) = 7 channels over both groups
  gmasks = surgery.group_masks(groups, params, 0.5, scope="global")
  assert _removed(gmasks, "w1", 1) + _removed(gmasks, "w2", 1) == 7


def test_partly_pruned_group_is_an_error():
  fn, params = _mlp()
  x = jnp.ones((2, 4))
  # plain per-leaf channel masks prune w1's columns but not w2's matching rows
  masks = jp.topk_mask(jp.magnitude_scores(params), 0.5, structure=jp.channels())
  with pytest.raises(ValueError, match=r"group 'w1:1' only partly.*w1 axis 1.*w2 axis 0"):
    surgery.shrink(fn, params, masks, x)
  # strict=False keeps such channels: nothing shrinks, the function still matches
  small = surgery.shrink(fn, params, masks, x, strict=False)
  assert _shapes(small) == _shapes(params)
  _assert_close(fn(small, x), fn(jp.apply_masks(params, masks), x))


def test_bad_masks_name_the_path():
  fn, params = _mlp()
  masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
  masks["w2"] = jnp.ones((3, 3), bool)
  with pytest.raises(ValueError, match="w2"):
    surgery.shrink(fn, params, masks, jnp.ones((2, 4)))
  del masks["w2"]
  with pytest.raises(ValueError, match="w2"):
    surgery.shrink(fn, params, masks, jnp.ones((2, 4)))


# ----------------------------------------------------------------------------- NNX models

class CNN(nnx.Module):

  def __init__(self, rngs):
    self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
    self.c2 = nnx.Conv(8, 4, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.bn(self.c1(x)))
    return self.fc(self.c2(x).mean((1, 2)))


class ResMLP(nnx.Module):

  def __init__(self, rngs):
    self.stem = nnx.Linear(4, 8, rngs=rngs)
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.down = nnx.Linear(16, 8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    h = self.stem(x)
    h = h + self.down(jax.nn.relu(self.up(jax.nn.relu(h))))  # residual
    return self.head(jax.nn.relu(h))


class GRUNet(nnx.Module):

  def __init__(self, rngs):
    self.rnn = nnx.RNN(nnx.GRUCell(3, 6, rngs=rngs), rngs=rngs)
    self.fc = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    return self.fc(self.rnn(x)[:, -1])


class TransformerBlock(nnx.Module):

  def __init__(self, rngs):
    self.ln1 = nnx.LayerNorm(8, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=8, qkv_features=8,
                                       decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(8, rngs=rngs)
    self.mlp_in = nnx.Linear(8, 16, rngs=rngs)
    self.mlp_out = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))


def _build(cls, seed=0):
  """The module with non-trivial values everywhere (biases, BatchNorm statistics), so masking
  matters; built abstractly and filled from numpy (no per-shape init compiles)."""
  model = nnx.eval_shape(lambda: cls(nnx.Rngs(0)))
  rng = np.random.default_rng(seed)

  def fill(kp, x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      lo, hi = (0.5, 1.5) if jp.tree.path_str(kp).endswith("var") else (-1.0, 1.0)
      return jnp.asarray(rng.uniform(lo, hi, x.shape).astype(x.dtype))
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key(0)
    return jnp.zeros(x.shape, x.dtype)

  nnx.update(model, jax.tree_util.tree_map_with_path(fill, nnx.state(model)))
  return model


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def _call(model, x):
  """``model(x)`` compiled once per shapes (eager NNX calls compile every op anew)."""
  return _apply(nnx.graphdef(model), nnx.state(model), x)


def _check_module(model, x, groups, sparsity, other, param_masks=False):
  """group_masks -> shrink_module; the new module equals the masked original on ``other``."""
  state = nnx.state(model)
  masks = surgery.group_masks(tuple(groups.values()), state, sparsity)
  # shrink_module takes masks for the whole state or, matched by path, for the Params only
  given = nnx.filter_state(masks, nnx.Param) if param_masks else masks
  small = surgery.shrink_module(model, given, x)
  assert type(small) is type(model)
  masked = nnx.merge(nnx.graphdef(model), jp.apply_masks(state, masks))
  _assert_close(_call(small, other), _call(masked, other))
  assert not np.allclose(_call(model, other), _call(masked, other))  # masking changed it
  return small


def test_cnn_with_batchnorm():
  model = _build(CNN)
  x = _randn(1, (2, 6, 6, 3))
  fn, state = surgery.module_fn(model)
  groups = _by_name(surgery.channel_groups(fn, state, x))
  assert _members(groups["c1/kernel:3"]) == {
      ("bn/bias", 0, False), ("bn/mean", 0, False), ("bn/scale", 0, False),
      ("bn/var", 0, False), ("c1/bias", 0, False), ("c1/kernel", 3, True),
      ("c2/kernel", 2, True)}
  assert _members(groups["c2/kernel:3"]) == {
      ("c2/bias", 0, False), ("c2/kernel", 3, True), ("fc/kernel", 0, True)}
  assert [n for n, g in groups.items() if g.prunable] == ["c1/kernel:3", "c2/kernel:3"]
  assert "window" in groups["c1/kernel:0"].reasons[0]  # spatial kernel axes are no channels
  other = _randn(2, (3, 5, 5, 3))
  small = _check_module(model, x, groups, 0.5, other, param_masks=True)
  assert _shapes(nnx.state(small)) == {
      "bn/bias": (4,), "bn/mean": (4,), "bn/scale": (4,), "bn/var": (4,), "c1/bias": (4,),
      "c1/kernel": (3, 3, 3, 4), "c2/bias": (2,), "c2/kernel": (3, 3, 4, 2), "fc/bias": (2,),
      "fc/kernel": (2, 2)}
  assert (small.c1.out_features, small.bn.num_features, small.c2.in_features,
          small.c2.out_features, small.fc.in_features) == (4, 4, 4, 2, 2)
  assert model.c1.kernel.shape == (3, 3, 3, 8)  # the original is untouched


def test_residual_block_couples_both_sides_of_the_add():
  model = _build(ResMLP)
  x = _randn(1, (2, 4))
  fn, state = surgery.module_fn(model)
  groups = _by_name(surgery.channel_groups(fn, state, x))
  assert _members(groups["stem/kernel:1"]) == {
      ("stem/bias", 0, False), ("stem/kernel", 1, True), ("up/kernel", 0, True),
      ("down/bias", 0, False), ("down/kernel", 1, True), ("head/kernel", 0, True)}
  assert groups["stem/kernel:1"].prunable and groups["up/kernel:1"].prunable
  other = _randn(2, (5, 4))
  small = _check_module(model, x, groups, 0.5, other)
  assert _shapes(nnx.state(small)) == {
      "stem/kernel": (4, 4), "stem/bias": (4,), "up/kernel": (4, 8), "up/bias": (8,),
      "down/kernel": (8, 4), "down/bias": (4,), "head/kernel": (4, 3), "head/bias": (3,)}
  assert (small.stem.out_features, small.up.in_features, small.down.out_features) == (4, 4, 4)


def test_gru_hidden_units_across_gates():
  model = _build(GRUNet)
  x = _randn(1, (2, 4, 3))
  fn, state = surgery.module_fn(model)
  groups = _by_name(surgery.channel_groups(fn, state, x))
  hidden = groups["rnn/cell/dense_i/kernel:1"]
  assert hidden.prunable and hidden.size == 6
  got = sorted((m.path, m.axis, str(m)) for m in hidden.members)
  assert got == sorted([
      ("fc/kernel", 0, "fc/kernel axis 0"),
      ("rnn/cell/dense_h/kernel", 0, "rnn/cell/dense_h/kernel axis 0"),
      *[(f"rnn/cell/{p}", a, f"rnn/cell/{p} axis {a} [{s}:{s + 6}]")
        for p, a in (("dense_h/kernel", 1), ("dense_i/kernel", 1), ("dense_i/bias", 0))
        for s in (0, 6, 12)]])
  other = _randn(2, (3, 7, 3))  # other batch and sequence length
  small = _check_module(model, x, groups, 0.5, other)
  cell = small.rnn.cell
  assert cell.dense_i.kernel.shape == (3, 9) and cell.dense_i.bias.shape == (9,)
  assert cell.dense_h.kernel.shape == (3, 9) and small.fc.kernel.shape == (3, 2)
  assert cell.hidden_features == 3 and cell.dense_h.out_features == 9


class LSTMNet(nnx.Module):

  def __init__(self, rngs):
    self.rnn = nnx.RNN(nnx.OptimizedLSTMCell(3, 5, rngs=rngs), rngs=rngs)
    self.fc = nnx.Linear(5, 2, rngs=rngs)

  def __call__(self, x):
    return self.fc(self.rnn(x)[:, -1])


def test_lstm_hidden_units_across_four_gates():
  model = _build(LSTMNet)
  fn, state = surgery.module_fn(model)
  hidden = [g for g in surgery.channel_groups(fn, state, _randn(1, (2, 4, 3))) if g.prunable]
  assert len(hidden) == 1 and hidden[0].size == 5
  slices = sorted(str(m) for m in hidden[0].members if m.path == "rnn/cell/dense_h/kernel")
  assert slices == sorted(["rnn/cell/dense_h/kernel axis 0"] + [
      f"rnn/cell/dense_h/kernel axis 1 [{s}:{s + 5}]" for s in (0, 5, 10, 15)])


def test_transformer_block_prunes_heads_and_mlp():
  model = _build(TransformerBlock)
  x = _randn(1, (2, 5, 8))
  fn, state = surgery.module_fn(model)
  groups = _by_name(surgery.channel_groups(fn, state, x))
  heads = groups["attn/query/kernel:1"]
  assert heads.prunable and heads.size == 4
  assert {(m.path, m.axis) for m in heads.members} == {
      (f"attn/{p}/{w}", 1 if w == "kernel" else 0) for p in ("query", "key", "value")
      for w in ("kernel", "bias")} | {("attn/out/kernel", 0)}
  assert groups["mlp_in/kernel:1"].prunable
  head_dim = groups["attn/query/kernel:2"]  # q/k head_dim: its size sets the 1/sqrt(d) scale
  assert not head_dim.prunable and not head_dim.fixed
  model_dim = groups["attn/out/kernel:2"]  # the residual stream reaches input and output
  assert not model_dim.prunable and model_dim.fixed
  assert ("ln1/scale", 0, False) in _members(model_dim)
  other = _randn(2, (3, 4, 8))
  small = _check_module(model, x, groups, {"attn/query/kernel:1": 0.5, "mlp_in/kernel:1": 0.5},
                        other)
  shapes = _shapes(nnx.state(small, nnx.Param))
  assert shapes["attn/query/kernel"] == shapes["attn/key/kernel"] == (8, 2, 2)
  assert shapes["attn/value/bias"] == (2, 2) and shapes["attn/out/kernel"] == (2, 2, 8)
  assert shapes["mlp_in/kernel"] == (8, 8) and shapes["mlp_out/kernel"] == (8, 8)
  assert (small.attn.num_heads, small.attn.qkv_features, small.mlp_in.out_features) == (2, 4, 8)


# ----------------------------------------------------------------------------- pure attention

def _group_with(groups, path, axis, without=None):
  found = [g for g in groups
           if any(m.path == path and m.axis == axis for m in g.members)
           and not any(m.path == without for m in g.members)]
  assert len(found) == 1, [str(g) for g in found]
  return found[0]


def test_reshape_into_heads_prunes_whole_heads():
  """q/k/v projections as (d, heads*head_dim) matrices reshaped into (heads, head_dim)."""
  heads, dim, d = 4, 3, 8
  params = {n: _randn(i, (d, heads * dim) if n != "wo" else (heads * dim, d))
            for i, n in enumerate(("wq", "wk", "wv", "wo"))}
  params["g"] = _randn(4, (heads,))  # a per-head gate; its length fixes the head count

  def fn(p, x):
    b, n, _ = x.shape
    h = p["g"].shape[0]
    q, k, v = (jnp.reshape(x @ p[w], (b, n, h, p[w].shape[1] // h)) for w in ("wq", "wk", "wv"))
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", att, v) * jnp.reshape(p["g"], (1, 1, h, 1))
    return jnp.reshape(out, (b, n, -1)) @ p["wo"]

  x = _randn(1, (2, 5, d))
  groups = surgery.channel_groups(fn, params, x)
  head = _group_with(groups, "g", 0)
  assert head.prunable and head.size == heads
  assert {(m.path, m.axis) for m in head.members} == {
      ("g", 0), ("wq", 1), ("wk", 1), ("wv", 1), ("wo", 0)}
  for m in head.members:  # position i of a projection axis belongs to head i // dim
    if m.path != "g":
      np.testing.assert_array_equal(m.index, np.repeat(np.arange(heads), dim))
  qk_dim = _group_with(groups, "wk", 1, without="g")
  assert not qk_dim.prunable and not qk_dim.fixed
  assert any("constant" in r and "sqrt(head_dim)" in r for r in qk_dim.reasons)
  v_dim = _group_with(groups, "wv", 1, without="g")
  assert v_dim.prunable  # the value head_dim sets no constant
  np.testing.assert_array_equal(v_dim.members[-1].index, np.tile(np.arange(dim), heads))
  masks = surgery.group_masks(groups, params, {head.name: 0.5})
  assert _removed(masks, "wq", 1) == 2 * dim and _removed(masks, "wv", 1) == 2 * dim
  small = surgery.shrink(fn, params, masks, x)
  assert _shapes(small) == {"wq": (8, 6), "wk": (8, 6), "wv": (8, 6), "wo": (6, 8), "g": (2,)}
  masked = jp.apply_masks(params, masks)
  xs = _randn(3, (3, 4, d))
  _assert_close(fn(small, xs), fn(masked, xs))


# ----------------------------------------------------------------------------- refusals

def _two_layer(between):
  params = {"w1": _randn(0, (4, 6)), "w2": _randn(1, (6, 3))}
  return (lambda p, x: between(jax.nn.relu(x @ p["w1"])) @ p["w2"]), params


def _hidden_masks(params):
  return {"w1": jnp.ones((4, 6), bool).at[:, 0].set(False),
          "w2": jnp.ones((6, 3), bool).at[0, :].set(False)}


def test_gather_on_hidden_axis_is_refused():
  perm = jnp.array([1, 0, 2, 3, 5, 4])
  fn, params = _two_layer(lambda h: h[:, perm])
  group = _by_name(surgery.channel_groups(fn, params, jnp.ones((2, 4))))["w1:1"]
  assert not group.prunable and not group.fixed
  assert any("gather" in r for r in group.reasons)
  with pytest.raises(ValueError, match=r"group 'w1:1'.*cannot be pruned.*gather"):
    surgery.shrink(fn, params, _hidden_masks(params), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="no channel group"):
    surgery.group_masks(surgery.channel_groups(fn, params, jnp.ones((2, 4))), params, 0.5)


def test_reshape_across_hidden_axis_is_refused():
  params = {"w1": _randn(0, (4, 6, 2)), "w2": _randn(1, (2, 6, 3))}

  def fn(p, x):
    h = jnp.einsum("bi,ijk->bjk", x, p["w1"])       # (b, 6, 2)
    h = jnp.reshape(h, (x.shape[0], 2, 6))          # crosses both axes
    return jnp.einsum("bjk,jkl->bl", h, p["w2"])

  groups = _by_name(surgery.channel_groups(fn, params, jnp.ones((2, 4))))
  assert any("reshaped across" in r for r in groups["w1:1"].reasons)
  masks = {"w1": jnp.ones((4, 6, 2), bool).at[:, 0, :].set(False), "w2": jnp.ones((2, 6, 3), bool)}
  with pytest.raises(ValueError, match=r"group 'w1:1'.*reshaped across"):
    surgery.shrink(fn, params, masks, jnp.ones((2, 4)))


def test_layernorm_over_hidden_axis_is_refused():
  def norm(h):
    mu = h.mean(-1, keepdims=True)
    return (h - mu) / jnp.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5)

  fn, params = _two_layer(norm)
  group = _by_name(surgery.channel_groups(fn, params, jnp.ones((2, 4))))["w1:1"]
  assert not group.prunable
  assert any("summed over by `reduce_sum`" in r for r in group.reasons)
  with pytest.raises(ValueError, match="cannot be pruned"):
    surgery.shrink(fn, params, _hidden_masks(params), jnp.ones((2, 4)))


def test_closed_over_array_is_refused():
  bias = jnp.arange(6.0)
  fn, params = _two_layer(lambda h: h + bias[None])
  group = _by_name(surgery.channel_groups(fn, params, jnp.ones((2, 4))))["w1:1"]
  assert not group.prunable and any("closes over" in r for r in group.reasons)


def test_unknown_where_assumption_is_respected():
  """If the next layer's weights are not masked, the hidden unit's bias leaks: refuse."""
  fn, params = _mlp()
  groups = _by_name(surgery.channel_groups(fn, params, jnp.ones((2, 4)),
                                           where=lambda p, x: p == "w1"))
  assert not groups["w1:1"].prunable
  assert any("dot_general" in r for r in groups["w1:1"].reasons)
  with pytest.raises(ValueError, match="non-float leaf 'n'"):
    surgery.channel_groups(lambda p, x: x @ p["w"], {"w": jnp.ones((2, 2)), "n": jnp.arange(2)},
                           jnp.ones((1, 2)), where=lambda p, x: True)
