"""Tests for benchmarks/surgery_speed.py on tiny sizes: the shrunk MLP, CNN and transformer
block have exactly the expected parameter counts and shapes, equal the masked dense models, and
the benchmark's FLOP count (its "ideal" speed-up) is exact."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import surgery_speed as bench


def _randn(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _kept(n, s):
  return n - round(s * n)


def _mlp_params(sizes):
  return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=False))


def _cnn_params(channels, in_features=3, classes=10):
  widths = (in_features, *channels)
  convs = sum(9 * a * b + b for a, b in zip(widths[:-1], widths[1:], strict=False))
  return convs + 2 * sum(channels) + channels[-1] * classes + classes  # BN scale + bias: Params


def _block_params(d, heads, head_dim, hidden):
  qkv = 3 * (d * heads * head_dim + heads * head_dim)
  out = heads * head_dim * d + d
  return 4 * d + qkv + out + d * hidden + hidden + hidden * d + d


MLP = (4, 8, 8, 3)
CNN = (4, 8, 8)
BLOCK = (8, 4, 16)  # d_model, heads (head_dim 2), MLP hidden

CASES = {
    "mlp": (lambda r: bench.mlp(MLP, rngs=r), (3, 4),
            lambda s: _mlp_params((MLP[0], _kept(MLP[1], s), _kept(MLP[2], s), MLP[3]))),
    "cnn": (lambda r: bench.CNN(CNN, rngs=r), (2, 6, 6, 3),
            lambda s: _cnn_params(tuple(_kept(c, s) for c in CNN))),
    "transformer": (lambda r: bench.TransformerBlock(*BLOCK, rngs=r), (2, 5, 8),
                    lambda s: _block_params(8, _kept(4, s), 2, _kept(16, s))),
}


def _out(model, x):
  f, state = bench.forward(model)
  return np.asarray(jax.jit(f)(state, x))


@pytest.mark.parametrize("name", list(CASES))
def test_shrunk_models_have_expected_params_and_equal_outputs(name):
  make, shape, expected = CASES[name]
  model = bench.build(make)
  assert bench.param_count(model) == expected(0.0)
  x = _randn(0, shape)
  other = _randn(1, (shape[0] + 1, *shape[1:]))  # another batch size too
  groups = None
  for s in bench.SPARSITIES:
    small, masks, groups = bench.shrink_model(model, s, x, groups)
    assert bench.param_count(small) == expected(s)
    masked = bench.masked_model(model, masks)
    np.testing.assert_allclose(_out(small, other), _out(masked, other), rtol=1e-5, atol=1e-5)
    assert not np.allclose(_out(model, other), _out(masked, other))  # pruning changed it
  if name == "transformer":
    assert (small.attn.num_heads, small.mlp_in.out_features) == (1, 4)
    assert small.attn.query.kernel.shape == (8, 1, 2)
  if name == "cnn":
    assert [c.out_features for c in small.convs] == [1, 2, 2]
    assert small.norms[1].mean.shape == (2,)  # BatchNorm statistics shrink with their conv


def test_matmul_flops_counts_dots_and_convs():
  assert bench.matmul_flops(lambda a, b: a @ b, jnp.ones((4, 3)), jnp.ones((3, 5))) == 120
  conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  f, state = bench.forward(conv)
  # 2 * output elements (2*6*6*4) * kernel entries per output (3*3*3)
  assert bench.matmul_flops(f, state, jnp.ones((2, 6, 6, 3))) == 2 * (2 * 6 * 6 * 4) * 27


def test_bench_problem_rows():
  problem = bench.Problem("mlp", lambda r: bench.mlp(MLP, rngs=r), (2, 4))
  rows = {r["variant"]: r for r in bench.bench_problem(problem, repeats=5, warmup=0,
                                                       sample_s=1e-4)}
  assert list(rows) == ["dense", "50%", "75%"]
  macs = lambda h1, h2: 2 * 2 * (4 * h1 + h1 * h2 + h2 * 3)
  assert rows["dense"]["matmul_flops"] == macs(8, 8)
  assert rows["50%"]["ideal"] == pytest.approx(macs(8, 8) / macs(4, 4))
  assert rows["75%"]["ideal"] == pytest.approx(macs(8, 8) / macs(2, 2))
  assert rows["75%"]["params"] == _mlp_params((4, 2, 2, 3))
  for r in rows.values():
    assert len(r["samples_s"]) == 5 and r["speedup"] > 0
  # the smaller model's checkpoint is smaller on disk
  assert rows["75%"]["checkpoint_bytes"] < rows["50%"]["checkpoint_bytes"] < rows["dense"][
      "checkpoint_bytes"]
