"""Property tests (hypothesis): every mask is exact on the score type's total order.

Scores are drawn from pools full of edge values (NaN of both signs and a payload, +-inf, +-0.0,
subnormals, neighbours of 1, the largest finite value) with many repeats, so ties straddle the
threshold. Each mask is compared with a NumPy reference: NaN lowest, ``-0.0 == +0.0``, ties in
leaf order then row-major index, exactly ``round(s * n)`` pruned. float32, bfloat16 and float16
run here; float64 (x64 is global state) in a subprocess. Shapes and dtypes are fixed per test so
that compiled programs are reused: compiling dominates.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import draw_from, ref_pruned
from conftest import run_with_devices
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxprune as jp

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
ALL = lambda path, leaf: True


def _pool(dtype) -> np.ndarray:
  """Edge values of ``dtype`` and a few ordinary ones, as an array of ``dtype``."""
  info = jnp.finfo(dtype)
  sub, tiny, eps = float(info.smallest_subnormal), float(info.tiny), float(info.eps)
  vals = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, sub, -sub, 2 * sub, 3 * sub,
          tiny - sub, tiny, -tiny, 1.0, -1.0, 1 + eps, 1 + 2 * eps, 1 - eps / 2, 2.0, -2.0,
          float(info.max), -float(info.max), 0.5, 1e-3]
  rng = np.random.default_rng(0)
  vals += list(rng.normal(size=6))
  out = np.array(vals, np.float64).astype(dtype)
  if jnp.dtype(dtype) == jnp.float32:   # a NaN with a payload
    out = np.append(out, np.array([0x7FC00123], np.uint32).view(np.float32))
  return out


POOLS = {jnp.dtype(d): _pool(d) for d in DTYPES}


def _draw(data, dtype, shape):
  return draw_from(data, POOLS[jnp.dtype(dtype)], shape)


def _split(flat, shapes):
  out, i = [], 0
  for s in shapes:
    n = math.prod(s)
    out.append(flat[i:i + n].reshape(s))
    i += n
  return out


# Leaves of one shape share one compiled selection (``_select.lowest_each``); "d" is alone.
LAYER_SHAPES = {"a": (6, 8), "a2": (6, 8), "b": (3, 4, 5), "b2": (3, 4, 5), "b3": (3, 4, 5),
                "c": (17,), "c2": (17,), "d": (5, 3)}


@jax.jit
def _layerwise_jit(scores, sparsity):
  return jp.topk_mask(scores, sparsity, where=ALL)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@SETTINGS
@given(data=st.data())
def test_layerwise_exact(dtype, use_jit, data):
  scores = {k: _draw(data, dtype, s) for k, s in LAYER_SHAPES.items()}
  ks = {k: data.draw(st.integers(0, math.prod(s))) for k, s in LAYER_SHAPES.items()}
  sparsity = {k: ks[k] / math.prod(s) for k, s in LAYER_SHAPES.items()}
  if use_jit:
    masks = _layerwise_jit(scores, {k: jnp.float32(v) for k, v in sparsity.items()})
  else:
    masks = jp.topk_mask(scores, sparsity, where=ALL)
  for k, s in LAYER_SHAPES.items():
    expected = ~ref_pruned([scores[k]], ks[k]).reshape(s)
    np.testing.assert_array_equal(np.asarray(masks[k]), expected, err_msg=k)


GLOBAL_SHAPES = {"a": (5, 7), "b": (2, 3, 4), "c": (9,)}


@jax.jit
def _global_jit(scores, sparsity):
  return jp.topk_mask(scores, sparsity, scope="global", where=ALL)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtypes", [(jnp.float32,) * 3, (jnp.bfloat16,) * 3,
                                    (jnp.float16,) * 3,
                                    (jnp.float32, jnp.bfloat16, jnp.float16)],
                         ids=["float32", "bfloat16", "float16", "mixed"])
@SETTINGS
@given(data=st.data())
def test_global_exact(dtypes, use_jit, data):
  scores = {k: _draw(data, d, s) for (k, s), d in zip(GLOBAL_SHAPES.items(), dtypes)}
  total = sum(math.prod(s) for s in GLOBAL_SHAPES.values())
  k = data.draw(st.integers(0, total))
  if use_jit:
    masks = _global_jit(scores, jnp.float32(k / total))
  else:
    masks = jp.topk_mask(scores, k / total, scope="global", where=ALL)
  expected = _split(~ref_pruned(list(scores.values()), k), GLOBAL_SHAPES.values())
  for name, e in zip(GLOBAL_SHAPES, expected):
    np.testing.assert_array_equal(np.asarray(masks[name]), e, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@SETTINGS
@given(data=st.data())
def test_per_output_and_lowest_k_exact(dtype, data):
  s = _draw(data, dtype, (5, 4, 3))
  mask = jp.topk_mask({"w": s}, 0.4, structure=jp.per_output(axis=1), where=ALL)["w"]
  moved, got = np.moveaxis(s, 1, -1), np.moveaxis(np.asarray(mask), 1, -1)
  for j in range(4):
    expected = ~ref_pruned([moved[..., j]], round(0.4 * 15)).reshape(5, 3)
    np.testing.assert_array_equal(got[..., j], expected)
  v = _draw(data, dtype, (23,))
  k = data.draw(st.integers(0, 23))
  np.testing.assert_array_equal(np.asarray(jp.lowest_k(v, k)), ref_pruned([v], k))


def _ref_n_of_m(x, n, m):
  """Keep-mask of N:M along axis 0 of ``x`` (2-D): per group of m, prune the m - n lowest."""
  keep = np.zeros(x.shape, bool)
  for g in range(x.shape[0] // m):
    for j in range(x.shape[1]):
      pruned = ref_pruned([x[g * m:(g + 1) * m, j]], m - n)
      keep[g * m:(g + 1) * m, j] = ~pruned
  return keep


@jax.jit
def _nm_jit(scores, sparsity):
  return {f"{n}:{m}": jp.topk_mask(scores, sparsity[f"{n}:{m}"], structure=jp.n_of_m(n, m),
                                   where=ALL)["w"] for n, m in NM}


NM = [(2, 4), (1, 4), (3, 4), (1, 2)]


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@SETTINGS
@given(data=st.data())
def test_n_of_m_exact(dtype, use_jit, data):
  x = _draw(data, dtype, (8, 3))
  if use_jit:
    got = _nm_jit({"w": x}, {f"{n}:{m}": jnp.float32(1 - n / m) for n, m in NM})
  else:
    got = {f"{n}:{m}": jp.topk_mask({"w": x}, 1 - n / m, structure=jp.n_of_m(n, m),
                                    where=ALL)["w"] for n, m in NM}
  for n, m in NM:
    np.testing.assert_array_equal(np.asarray(got[f"{n}:{m}"]), _ref_n_of_m(x, n, m),
                                  err_msg=f"{n}:{m}")


# ----------------------------------------------------------------------------- channels, blocks
# Each unit is m_i * 2**e with small integers m_i (sums of squares stay exact) and its own
# exponent e, from the subnormal range to past the largest finite value, sometimes with a NaN or
# an inf. The reference computes the unit score as the engine's semantics say: the reduction
# with an unbounded exponent (exact here), rounded once to the score type.

EXP_RANGE = {jnp.dtype(jnp.float32): (-149, 124), jnp.dtype(jnp.bfloat16): (-133, 124),
             jnp.dtype(jnp.float16): (-24, 13)}


def _draw_units(data, dtype, n_units, unit_size):
  lo, hi = EXP_RANGE[jnp.dtype(dtype)]
  units, exps = [], []
  for _ in range(n_units):
    e = data.draw(st.sampled_from([lo, lo + 1, lo + 5, -60, -20, 0, 3, hi - 2, hi])
                  | st.integers(lo, hi))
    m = np.array(data.draw(st.lists(st.integers(-7, 7), min_size=unit_size,
                                    max_size=unit_size)), np.float64)
    vals = np.ldexp(m, e)
    special = data.draw(st.sampled_from([None] * 6 + [np.nan, np.inf, -np.inf]))
    if special is not None:
      vals[data.draw(st.integers(0, unit_size - 1))] = special
    units.append(vals.astype(dtype))
    exps.append(e)
  return units


def _ref_unit_score(vals, reduce):
  """The unit's score, float32 (the compute type of bfloat16/float16/float32 scores)."""
  v = np.asarray(vals, np.float64)
  if np.isnan(v).any():
    return np.float32(np.nan)
  if reduce == "max":
    return np.float32(v.max())
  finite = np.isfinite(v)
  if not finite.all():
    return np.float32(np.inf if reduce != "mean" else v[~finite].sum())
  big = np.abs(v).max()
  if big == 0:
    return np.float32(0.0)
  e = math.frexp(big)[1] - 1                        # 2**e <= max|v| < 2**(e+1)
  scaled = np.ldexp(v, -e).astype(np.float32)       # exact: small integers times 2**j
  if reduce == "l2":
    r = np.sqrt(np.float32(np.sum(scaled.astype(np.float64) ** 2)))
  elif reduce == "l1":
    r = np.float32(np.sum(np.abs(scaled.astype(np.float64))))
  else:
    r = np.float32(np.float32(np.sum(scaled.astype(np.float64))) / np.float32(v.size))
  with np.errstate(over="ignore"):    # a score past the largest finite float is inf
    return np.float32(np.ldexp(np.float64(r), e))


CH_SHAPES = {"a": (5, 6), "b": (3, 4)}      # channels along the last axis
REDUCES = ("l2", "l1", "max", "mean")


def _channel_masks(scores, layer_sparsity, global_sparsity):
  out = {}
  for reduce in REDUCES:
    st_ = jp.channels(reduce=reduce)
    out[reduce, "layerwise"] = jp.topk_mask(scores, layer_sparsity, structure=st_, where=ALL)
    out[reduce, "global"] = jp.topk_mask(scores, global_sparsity, structure=st_,
                                         scope="global", where=ALL)
  return out


_channel_masks_jit = jax.jit(_channel_masks)


@pytest.mark.parametrize("dtype,use_jit", [(jnp.float32, False)] + [(d, True) for d in DTYPES],
                         ids=["float32-eager", "float32-jit", "bfloat16-jit", "float16-jit"])
@settings(SETTINGS, max_examples=30)
@given(data=st.data())
def test_channels_exact(dtype, use_jit, data):
  """Every reduce, layerwise and global, on units from subnormal to overflowing."""
  scores, units = {}, {}
  for name, (rows, cols) in CH_SHAPES.items():
    units[name] = _draw_units(data, dtype, cols, rows)
    scores[name] = np.stack(units[name], axis=1)
  ks = {n: data.draw(st.integers(0, s[1])) for n, s in CH_SHAPES.items()}
  total = sum(s[1] for s in CH_SHAPES.values())
  kg = data.draw(st.integers(0, total))
  layer_sp = {n: ks[n] / s[1] for n, s in CH_SHAPES.items()}
  if use_jit:
    got = _channel_masks_jit(scores, {n: jnp.float32(v) for n, v in layer_sp.items()},
                             jnp.float32(kg / total))
  else:
    got = _channel_masks(scores, layer_sp, kg / total)
  for reduce in REDUCES:
    unit_scores = {n: np.array([_ref_unit_score(u, reduce) for u in units[n]], np.float32)
                   for n in CH_SHAPES}
    pruned = {"global": _split(ref_pruned(list(unit_scores.values()), kg),
                               [(s[1],) for s in CH_SHAPES.values()]),
              "layerwise": [ref_pruned([unit_scores[n]], ks[n]) for n in CH_SHAPES]}
    for scope, per_leaf in pruned.items():
      for (name, shape), p in zip(CH_SHAPES.items(), per_leaf):
        np.testing.assert_array_equal(np.asarray(got[reduce, scope][name]),
                                      np.broadcast_to(~p[None, :], shape),
                                      err_msg=f"{name} {reduce} {scope}")


@jax.jit
def _blocks_jit(x, sparsity):
  return jp.topk_mask({"w": x}, sparsity, structure=jp.blocks((2, 2)), where=ALL)["w"]


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@settings(SETTINGS, max_examples=30)
@given(data=st.data())
def test_blocks_exact(dtype, use_jit, data):
  units = _draw_units(data, dtype, 6, 4)          # 2 x 3 blocks of 2 x 2 in a (4, 6) leaf
  x = np.zeros((4, 6), dtype)
  ref = np.zeros((2, 3), np.float32)
  for b, u in enumerate(units):
    i, j = divmod(b, 3)
    x[2 * i:2 * i + 2, 2 * j:2 * j + 2] = u.reshape(2, 2)
    ref[i, j] = _ref_unit_score(u, "l2")
  k = data.draw(st.integers(0, 6))
  if use_jit:
    mask = _blocks_jit(x, jnp.float32(k / 6))
  else:
    mask = jp.topk_mask({"w": x}, k / 6, structure=jp.blocks((2, 2)), where=ALL)["w"]
  keep = ~ref_pruned([ref], k).reshape(2, 3)
  np.testing.assert_array_equal(np.asarray(mask), np.kron(keep, np.ones((2, 2), bool)))


# ----------------------------------------------------------------------------- float64 (x64)

CODE_X64 = r'''
import sys
sys.path.insert(0, "tests")
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st
import jaxprune as jp
from _reference import draw_from as draw, ref_pruned

info = jnp.finfo(jnp.float64)
sub, tiny, eps = float(info.smallest_subnormal), float(info.tiny), float(info.eps)
POOL64 = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, sub, -sub, 2 * sub, tiny,
                   tiny - sub, 1e-310, 1.0, 1 + eps, 1 + 2 * eps, 1 + 3e-10, 1 + 2e-10,
                   1 + 1e-10, -1.0, float(info.max), 1e-40, 2e-40, 0.5], np.float64)
POOL32 = np.array([np.nan, 0.0, -0.0, 1e-40, 2e-40, 1e-45, 1.0, 1 + 2**-23, -1.0, np.inf,
                   0.5], np.float32)

ALL = lambda p, x: True
glob = jax.jit(lambda s, sp: jp.topk_mask(s, sp, scope="global", where=ALL))
layer = jax.jit(lambda s, sp: jp.topk_mask(s, sp, where=ALL))

@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def check(data):
  a = draw(data, POOL64, (6, 7))
  b = draw(data, POOL32, (4, 5))
  c = draw(data, POOL64, (13,))
  k = data.draw(st.integers(0, 42))
  for masks in (jp.topk_mask({"a": a}, k / 42, where=ALL), layer({"a": a}, k / 42)):
    np.testing.assert_array_equal(np.asarray(masks["a"]), ~ref_pruned([a], k).reshape(6, 7))
  # Two float64 leaves of one shape: one shared selection, each leaf its own k.
  a2, k2 = draw(data, POOL64, (6, 7)), data.draw(st.integers(0, 42))
  pair, sp = {"a": a, "a2": a2}, {"a": k / 42, "a2": k2 / 42}
  for masks in (jp.topk_mask(pair, sp, where=ALL), layer(pair, sp)):
    for name, x, kx in (("a", a, k), ("a2", a2, k2)):
      np.testing.assert_array_equal(np.asarray(masks[name]), ~ref_pruned([x], kx).reshape(6, 7))
  kc = data.draw(st.integers(0, 13))
  np.testing.assert_array_equal(np.asarray(jp.lowest_k(c, kc)), ref_pruned([c], kc))
  kg = data.draw(st.integers(0, 62))
  tree = {"a": a, "b": b}
  for masks in (jp.topk_mask(tree, kg / 62, scope="global", where=ALL), glob(tree, kg / 62)):
    expected = ~ref_pruned([a, b], kg)
    np.testing.assert_array_equal(np.asarray(masks["a"]).ravel(), expected[:42])
    np.testing.assert_array_equal(np.asarray(masks["b"]).ravel(), expected[42:])
  nm = np.asarray(jp.topk_mask({"w": a[:4]}, 0.5, structure=jp.n_of_m(2, 4), where=ALL)["w"])
  for j in range(7):
    np.testing.assert_array_equal(nm[:, j], ~ref_pruned([a[:4, j]], 2))

check()
print("ok x64 properties")
'''


def test_float64_exact_under_x64():
  """float64 scores compare in 64 bits (near-ties 1e-10 apart, float64 subnormals), alone,
  mixed with float32 in global scope, in N:M and in lowest_k, with and without jit."""
  assert "ok x64 properties" in run_with_devices(CODE_X64, num_devices=1)
