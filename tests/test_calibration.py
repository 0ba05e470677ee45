"""jaxprune.calibration: calibrate (the jaxpr walk), Wanda, SparseGPT and sequential pruning."""
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

import jaxprune as jp
from jaxprune.calibration import obs
from tests.conftest import run_with_devices

pytestmark = pytest.mark.usefixtures("fast_compile")


def _correlated_layer(n_in=200, n_out=8, rows=512, seed=0):
  """A linear layer whose inputs are correlated and of very different scales."""
  k = jax.random.split(jax.random.key(seed), 4)
  z = jax.random.normal(k[0], (rows, n_in))
  mix = jnp.eye(n_in) + 0.6 * jax.random.normal(k[1], (n_in, n_in)) / math.sqrt(n_in)
  scales = jnp.exp(1.2 * jax.random.normal(k[2], (n_in,)))
  x = (z @ mix) * scales[None, :]
  w = jax.random.normal(k[3], (n_in, n_out))
  return {"w": w, "b": jnp.zeros(n_out)}, x


def _linear(p, x):
  return x @ p["w"] + p["b"][None, :]


def _err(x, w, w_hat):
  return float(jnp.linalg.norm(x @ w - x @ w_hat))


class ReconstructionTest(parameterized.TestCase):

  @parameterized.named_parameters(("unstructured_50", None), ("nm_2_4", (2, 4)))
  def test_sparsegpt_beats_wanda_beats_magnitude(self, nm):
    params, x = _correlated_layer()
    cal = jp.calibrate(_linear, params, [x[:256], x[256:]])
    st = None if nm is None else jp.n_of_m(*nm)
    mag, _ = jp.prune(params, 0.5, structure=st)
    wan, _ = jp.wanda(params, cal, 0.5, structure=st)
    sgp, _ = jp.sparsegpt(params, cal, 0.5, structure=st)
    e_mag, e_wan, e_sgp = (_err(x, params["w"], q["w"]) for q in (mag, wan, sgp))
    self.assertLess(e_sgp, e_wan)
    self.assertLess(e_wan, e_mag)
    for q in (mag, wan, sgp):
      self.assertEqual(int(jnp.sum(q["w"] == 0)), 200 * 8 // 2)
      np.testing.assert_array_equal(q["b"], params["b"])

  def test_obs_single_weight_matches_closed_form(self):
    """Pruning one weight of one row (the first input) is the OBS update of the paper:
    δ = −w_q / [H⁻¹]_qq · H⁻¹ e_q."""
    params, x = _correlated_layer(n_in=16, n_out=1, rows=128)
    w = params["w"].at[0, 0].set(1e-4)  # the lowest w²/[U]_qq²: pruned first
    h = 2.0 * x.T @ x / x.shape[0]
    new, keep = obs.prune_matrix(w.T, h, jnp.array([1]), block_size=16, dampening=0.0)
    hinv = jnp.linalg.inv(h)
    expected = w[:, 0] - w[0, 0] / hinv[0, 0] * hinv[:, 0]
    self.assertFalse(bool(keep[0, 0]))
    self.assertEqual(int(keep.sum()), 15)
    np.testing.assert_allclose(new[0], expected, rtol=2e-3, atol=2e-5)

  def test_nm_update_does_not_depend_on_block_size(self):
    params, x = _correlated_layer(rows=256)
    cal = jp.calibrate(_linear, params, [x])
    a, ma = jp.sparsegpt(params, cal, 0.5, structure=jp.n_of_m(2, 4), block_size=40)
    b, mb = jp.sparsegpt(params, cal, 0.5, structure=jp.n_of_m(2, 4), block_size=128)
    np.testing.assert_array_equal(ma["w"], mb["w"])
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-4, atol=1e-4)


class CountsTest(parameterized.TestCase):

  @parameterized.parameters((0.0, 200, "float32"), (0.5, 256, "bfloat16"),
                            (0.6, 200, "float32"), (0.7, 200, "bfloat16"),
                            (0.7, 256, "float32"))
  def test_exact_counts(self, sparsity, n_in, dtype):
    params, x = _correlated_layer(n_in=n_in, rows=300)
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    cal = jp.calibrate(_linear, params, [x.astype(dtype)])
    n = n_in * 8
    new, masks = jp.sparsegpt(params, cal, sparsity)
    self.assertEqual(int(masks["w"].size - masks["w"].sum()), round(sparsity * n))
    self.assertEqual(new["w"].dtype, jnp.dtype(dtype))
    np.testing.assert_array_equal(new["w"], jp.apply_masks(new, masks)["w"])  # exact zeros
    self.assertEqual(masks["b"].shape, ())
    new_w, masks_w = jp.wanda(params, cal, sparsity)
    per_out = round(sparsity * n_in)
    np.testing.assert_array_equal(np.asarray(masks_w["w"]).sum(0), n_in - per_out)
    _, masks_u = jp.wanda(params, cal, sparsity, structure=jp.unstructured())
    self.assertEqual(int(masks_u["w"].size - masks_u["w"].sum()), round(sparsity * n))

  @parameterized.parameters((2, 4), (4, 8))
  def test_n_of_m_groups(self, n, m):
    params, x = _correlated_layer()
    cal = jp.calibrate(_linear, params, [x])
    for method in (jp.wanda, jp.sparsegpt):
      new, masks = method(params, cal, 1 - n / m, structure=jp.n_of_m(n, m))
      groups = np.asarray(masks["w"]).reshape(200 // m, m, 8).sum(axis=1)
      np.testing.assert_array_equal(groups, n)
      np.testing.assert_array_equal(np.asarray(new["w"] != 0) <= np.asarray(masks["w"]), True)

  def test_sparsity_zero_is_identity(self):
    params, x = _correlated_layer()
    cal = jp.calibrate(_linear, params, [x])
    for method in (jp.wanda, jp.sparsegpt):
      new, masks = method(params, cal, 0.0)
      np.testing.assert_array_equal(new["w"], params["w"])
      self.assertTrue(bool(masks["w"].all()))

  def test_jit_equals_eager(self):
    params, x = _correlated_layer(n_in=16, n_out=4, rows=64)
    cal = jp.calibrate(_linear, params, [x])
    for method in (jp.wanda, jp.sparsegpt):
      eager = method(params, cal, 0.5)
      jitted = jax.jit(lambda p, c, method=method: method(p, c, 0.5))(params, cal)
      np.testing.assert_array_equal(eager[1]["w"], jitted[1]["w"])
      np.testing.assert_allclose(eager[0]["w"], jitted[0]["w"], rtol=1e-5, atol=1e-6)


class CalibrateTest(parameterized.TestCase):

  def test_two_layer_mlp_statistics(self):
    k = jax.random.split(jax.random.key(0), 3)
    params = {"l1": {"kernel": jax.random.normal(k[0], (5, 7)), "bias": jnp.ones(7)},
              "l2": {"kernel": jax.random.normal(k[1], (7, 3)), "bias": jnp.ones(3)}}

    def fn(p, x):
      h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"][None, None])
      return h @ p["l2"]["kernel"] + p["l2"]["bias"][None, None]

    xs = [jax.random.normal(jax.random.fold_in(k[2], i), (4, 6, 5)) for i in range(3)]
    cal = jp.calibrate(fn, params, iter(xs))  # a one-pass iterator: batches are not held
    x_all = jnp.concatenate([x.reshape(-1, 5) for x in xs])
    h_all = jax.nn.relu(x_all @ params["l1"]["kernel"] + params["l1"]["bias"][None])
    self.assertEqual(set(cal.grams), {"l1/kernel", "l2/kernel"})
    np.testing.assert_allclose(cal.grams["l1/kernel"], x_all.T @ x_all, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(cal.grams["l2/kernel"], h_all.T @ h_all, rtol=1e-5, atol=1e-4)
    self.assertEqual(int(cal.counts["l2/kernel"]), 72)
    self.assertEqual(cal.layout("l2/kernel").in_axes, (0,))

  def test_transposed_weights_equinox(self):
    mlp = eqx.nn.MLP(8, 3, 8, 1, key=jax.random.key(0))
    fn = lambda m, x: jax.vmap(m)(x)
    x = jax.random.normal(jax.random.key(1), (50, 8))
    cal = jp.calibrate(fn, mlp, [x])
    paths = dict(cal.layouts)
    self.assertEqual(paths["layers/0/weight"].in_axes, (1,))  # (out, in)
    np.testing.assert_allclose(cal.grams["layers/0/weight"], x.T @ x, rtol=1e-5, atol=1e-4)
    new, masks = jp.wanda(mlp, cal, 0.5)
    np.testing.assert_array_equal(np.asarray(masks.layers[0].weight).sum(axis=1), 4)  # per out
    _, masks24 = jp.sparsegpt(mlp, cal, 0.5, structure=jp.n_of_m(2, 4))
    with self.assertRaisesRegex(ValueError, "'layers/0/weight' of shape \\(8, 8\\) has 8 inputs"):
      jp.wanda(mlp, cal, 0.75, structure=jp.n_of_m(2, 16))
    w = np.asarray(masks24.layers[1].weight)                   # (3, 8): groups along axis 1
    np.testing.assert_array_equal(w.reshape(3, 2, 4).sum(-1), 2)

  def test_linen_and_haiku(self):
    import flax.linen as fnn
    import haiku as hk

    x = jax.random.normal(jax.random.key(1), (12, 8))
    linen = fnn.Sequential([fnn.Dense(8), fnn.relu, fnn.Dense(4)])
    variables = linen.init(jax.random.key(0), x)
    cal = jp.calibrate(lambda p, x: linen.apply({"params": p}, x), variables["params"], [x])
    self.assertEqual(set(cal.grams), {"layers_0/kernel", "layers_2/kernel"})
    np.testing.assert_allclose(cal.grams["layers_0/kernel"], x.T @ x, rtol=1e-5, atol=1e-4)
    net = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([8, 4])(x)))
    params = net.init(jax.random.key(0), x)
    cal = jp.calibrate(net.apply, params, [x])
    self.assertEqual(set(cal.grams), {"mlp/~/linear_0/w", "mlp/~/linear_1/w"})
    _, masks = jp.sparsegpt(params, cal, 0.5, structure=jp.n_of_m(2, 4))
    self.assertEqual(float(jp.sparsity(masks)), 0.5)
    self.assertEqual(masks["mlp/~/linear_0"]["b"].shape, ())

  @parameterized.named_parameters(("flax_2d", "flax"), ("equinox_1d", "eqx"))
  def test_convolution_patch_order(self, kind):
    """‖conv(x, W)‖² = tr(WᵀGW) for the kernel's (n_in, n_out) view: the Gram's features are
    in the kernel's axis order."""
    if kind == "flax":
      m = nnx.Conv(3, 5, kernel_size=(3, 2), strides=(2, 1), padding="SAME", rngs=nnx.Rngs(0))
      gd, params, rest = nnx.split(m, nnx.Param, ...)
      fn = lambda p, x: nnx.merge(gd, p, rest)(x)
      x = jax.random.normal(jax.random.key(1), (2, 7, 6, 3))
      path, kernel, bias = "kernel", params["kernel"][...], params["bias"][...][None, None, None]
    else:
      params = eqx.nn.Conv1d(3, 4, 3, padding=1, key=jax.random.key(0))
      fn = lambda m, x: jax.vmap(m)(x)
      x = jax.random.normal(jax.random.key(2), (5, 3, 10))
      path, kernel, bias = "weight", params.weight, params.bias[None]
    cal = jp.calibrate(fn, params, [x])
    w = cal.layout(path).to_matrix(kernel)[0]
    y = fn(params, x) - bias
    np.testing.assert_allclose(jnp.sum(y ** 2), jnp.trace(w.T @ cal.grams[path] @ w),
                               rtol=1e-4)

  def test_small_transformer(self):
    from train import models
    lm = models.DecoderLM(context=8, dim=16, depth=2, num_heads=2, mlp_ratio=2,
                          rngs=nnx.Rngs(0))
    gd, params, rest = nnx.split(lm, nnx.Param, ...)
    fn = lambda p, t: nnx.merge(gd, p, rest)(t)
    tokens = jax.random.randint(jax.random.key(1), (3, 8), 0, 256)
    cal = jp.calibrate(fn, params, [tokens])
    kernels = {f"blocks/{i}/{n}/kernel" for i in range(2)
               for n in ("attn/query", "attn/key", "attn/value", "attn/out", "fc1", "fc2")}
    self.assertEqual(set(cal.grams), kernels | {"head/kernel"})
    self.assertTrue(all(int(c) == 24 for c in cal.counts.values()))
    x = lm.blocks[0].ln1(lm.embed_tokens(tokens)).reshape(-1, 16)
    for n in ("query", "key", "value"):
      np.testing.assert_allclose(cal.grams[f"blocks/0/attn/{n}/kernel"], x.T @ x, rtol=1e-4,
                                 atol=1e-4)
    new, masks = jp.sparsegpt(params, cal, 0.5, structure=jp.n_of_m(2, 4))
    self.assertEqual(masks["embed"]["embedding"].shape, ())    # no statistics: not pruned
    self.assertEqual(masks["blocks"][0]["ln1"]["scale"].shape, ())
    self.assertEqual(float(jp.sparsity(masks)), 0.5)
    logits = nnx.merge(gd, new, rest)(tokens)
    self.assertTrue(bool(jnp.all(jnp.isfinite(logits))))

  def test_stacked_scan_per_slice(self):
    k = jax.random.split(jax.random.key(0), 2)
    params = {"w": jax.random.normal(k[0], (3, 8, 8)) / 3}

    def fn(p, x):
      return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]

    x = jax.random.normal(k[1], (20, 8))
    cal = jp.calibrate(fn, params, [x])
    self.assertEqual(cal.layout("w").stack_axis, 0)
    self.assertEqual(cal.grams["w"].shape, (3, 8, 8))
    h = x
    for layer in range(3):
      np.testing.assert_allclose(cal.grams["w"][layer], h.T @ h, rtol=1e-4, atol=1e-4)
      h = jnp.tanh(h @ params["w"][layer])
    for method in (jp.wanda, jp.sparsegpt):
      new, masks = method(params, cal, 0.6, structure=jp.unstructured())
      np.testing.assert_array_equal(np.asarray(~masks["w"]).sum(axis=(1, 2)), round(0.6 * 64))
    # indexing a layer out of the stack (Python loop) gives the same statistics
    loop = lambda p, x: jnp.tanh(jnp.tanh(jnp.tanh(x @ p["w"][0]) @ p["w"][1]) @ p["w"][2])
    cal_loop = jp.calibrate(loop, params, [x])
    np.testing.assert_allclose(cal_loop.grams["w"], cal.grams["w"], rtol=1e-5, atol=1e-5)

  def test_multi_axis_contraction(self):
    """A LinearGeneral-style kernel (heads, head_dim, out) contracted on two axes."""
    params = {"o": jax.random.normal(jax.random.key(0), (2, 4, 6))}
    fn = lambda p, x: jnp.einsum("bhd,hdo->bo", x, p["o"])
    x = jax.random.normal(jax.random.key(1), (10, 2, 4))
    cal = jp.calibrate(fn, params, [x])
    self.assertEqual(cal.layout("o").in_axes, (0, 1))
    flat = x.reshape(10, 8)
    np.testing.assert_allclose(cal.grams["o"], flat.T @ flat, rtol=1e-5, atol=1e-5)
    _, masks = jp.wanda(params, cal, 0.5)
    np.testing.assert_array_equal(np.asarray(masks["o"]).sum(axis=(0, 1)), 4)

  def test_bad_input(self):
    params, x = _correlated_layer(n_in=8, n_out=4)
    params["emb"] = jnp.ones((5, 6))  # prunable by default, never contracted
    fn = lambda p, x: x @ p["w"] + p["b"][None] + p["emb"].sum()
    cal = jp.calibrate(fn, params, [x])
    with self.assertRaisesRegex(ValueError, "'emb'"):
      jp.wanda(params, cal, 0.5, where=lambda path, leaf: leaf.ndim == 2)
    with self.assertRaisesRegex(ValueError, "'w' of shape \\(8, 4\\) has 8 inputs.*16"):
      jp.sparsegpt(params, cal, 0.875, structure=jp.n_of_m(2, 16))
    with self.assertRaisesRegex(ValueError, "sparsity 0.3"):
      jp.sparsegpt(params, cal, 0.3, structure=jp.n_of_m(2, 4))
    with self.assertRaisesRegex(ValueError, "channels|Channels"):
      jp.sparsegpt(params, cal, 0.5, structure=jp.channels())
    with self.assertRaisesRegex(ValueError, "concrete sparsity.*'w'"):
      jax.jit(lambda s: jp.sparsegpt(params, cal, s))(0.5)
    with self.assertRaisesRegex(ValueError, "at least one batch"):
      jp.calibrate(fn, params, [])
    with self.assertRaisesRegex(ValueError, "outside"):
      jp.wanda(params, cal, 1.5)

  def test_chunked_equals_whole_batches(self):
    """``chunk_size``: the same statistics up to summation order, the same row counts; a batch
    that is not a whole number of chunks is an error naming ``chunk_size``."""
    params, x = _correlated_layer(n_in=8, n_out=4, rows=48)
    fn = lambda p, x: jnp.tanh(x @ p["w"] + p["b"][None])
    whole = jp.calibrate(fn, params, [x, 2 * x])
    chunked = jp.calibrate(fn, params, [x, 2 * x], chunk_size=16)
    np.testing.assert_allclose(chunked.grams["w"], whole.grams["w"], rtol=1e-5)
    self.assertEqual(int(chunked.counts["w"]), 96)
    self.assertEqual(chunked.layout("w"), whole.layout("w"))
    with self.assertRaisesRegex(ValueError, "48 rows.*chunk_size=10"):
      jp.calibrate(fn, params, [x], chunk_size=10)
    with self.assertRaisesRegex(ValueError, "positive int.*0"):
      jp.calibrate(fn, params, [x], chunk_size=0)
    with self.assertRaisesRegex(ValueError, "same leading"):
      jp.calibrate(lambda p, b: fn(p, b[0]) + b[1].sum(), params, [(x, x[:5])], chunk_size=16)


class SequentialTest(parameterized.TestCase):

  def test_blocks_see_pruned_outputs_and_stacked_equals_list(self):
    def block(p, x):
      return x + jnp.tanh(x @ p["w1"]) @ p["w2"]

    keys = jax.random.split(jax.random.key(0), 6)
    blocks = [{"w1": jax.random.normal(keys[2 * i], (8, 16)) / 3,
               "w2": jax.random.normal(keys[2 * i + 1], (16, 8)) / 4} for i in range(3)]
    xs = [jax.random.normal(jax.random.fold_in(keys[0], i), (32, 8)) for i in range(2)]
    seen = []

    def method(params, cal, sparsity, **kw):
      seen.append(cal)
      return jp.sparsegpt(params, cal, sparsity, **kw)

    pruned, masks = jp.sequential(block, blocks, xs, method, 0.5)
    # block 1 was calibrated on block 0's outputs AFTER pruning
    h = [block(pruned[0], x) for x in xs]
    expected = jp.calibrate(block, blocks[1], h)
    np.testing.assert_allclose(seen[1].grams["w1"], expected.grams["w1"], rtol=1e-5,
                               atol=1e-4)
    self.assertEqual([int(m["w1"].sum()) for m in masks], [64, 64, 64])
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
    pruned_s, masks_s = jp.sequential(block, stacked, xs, "sparsegpt", 0.5)
    for i in range(3):
      np.testing.assert_array_equal(masks_s["w2"][i], masks[i]["w2"])
      np.testing.assert_allclose(pruned_s["w1"][i], pruned[i]["w1"], rtol=1e-5, atol=1e-6)
    _, masks_w = jp.sequential(block, blocks, xs, "wanda", 0.5,
                               structure=jp.n_of_m(2, 4))
    self.assertEqual(float(jp.sparsity(masks_w)), 0.5)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "method"):
      jp.sequential(lambda p, x: x, [{"w": jnp.ones((2, 2))}], [jnp.ones((1, 2))], "obs")
    with self.assertRaisesRegex(ValueError, "axis 0"):
      jp.sequential(lambda p, x: x, {"a": jnp.ones((2, 2)), "b": jnp.ones((3, 2))},
                    [jnp.ones((1, 2))])


def test_sharded_calibration_equals_unsharded():
  """8 host devices: data-parallel batches on an Explicit mesh (replicated params), and an
  Auto (4, 2) mesh with model-sharded params; the same statistics and masks as on 1 device."""
  out = run_with_devices("""
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_disable_most_optimizations", True)
    import jaxprune as jp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from jaxprune.calibration import collect
    k = jax.random.split(jax.random.key(0), 4)
    # both kernels of one shape: one pruning program per mesh for the two
    params = {"l1": jax.random.normal(k[0], (16, 16)), "b1": jnp.zeros(16),
              "l2": jax.random.normal(k[1], (16, 16))}
    fn = lambda p, x: jnp.tanh(x @ p["l1"] + p["b1"]) @ p["l2"]
    xs = [jax.random.normal(jax.random.fold_in(k[2], i), (64, 16)) for i in range(3)]
    cal1 = jp.calibrate(fn, params, xs)
    m1 = [jp.wanda(params, cal1, 0.5)[1], jp.sparsegpt(params, cal1, 0.5)[1]]

    def check(cal, masks):
      for p in cal1.grams:
        np.testing.assert_allclose(cal.grams[p], cal1.grams[p], rtol=1e-5, atol=1e-4)
        assert int(cal.counts[p]) == int(cal1.counts[p]) == 192
      for a, b in zip(m1, masks):
        for p in ("l1", "l2"):
          np.testing.assert_array_equal(np.asarray(a[p]), np.asarray(b[p]))

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
      ps = jax.device_put(params, NamedSharding(mesh, P()))
      xss = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in xs]
      cal8 = jp.calibrate(fn, ps, xss)
      per_batch, _ = collect.batch_programs(fn, None)
      hlo = per_batch.lower(ps, xss[0]).compile().as_text()
      check(cal8, [jp.wanda(ps, cal8, 0.5)[1], jp.sparsegpt(ps, cal8, 0.5)[1]])
    print("REDUCTIONS", sum(hlo.count(s) for s in ("all-reduce(", "all-reduce-start(")))

    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    ps = {"l1": jax.device_put(params["l1"], NamedSharding(mesh, P(None, "model"))),
          "b1": jax.device_put(params["b1"], NamedSharding(mesh, P("model"))),
          "l2": jax.device_put(params["l2"], NamedSharding(mesh, P("model", None)))}
    xss = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in xs]
    cal8 = jp.calibrate(fn, ps, xss)
    check(cal8, [jp.wanda(ps, cal8, 0.5)[1], jp.sparsegpt(ps, cal8, 0.5)[1]])
  """)
  # data parallel: both kernels' Gram matrices are reduced over the shards in one collective
  assert "REDUCTIONS 1" in out, out


def test_chunked_results_are_the_same_bits_on_8_devices_as_on_1():
  """With ``chunk_size``, calibration and sequential SparseGPT (masks and updated weights,
  through LayerNorm blocks whose forward passes are run on the pruned weights) are bit-identical
  on 1 device, 8 data-parallel devices (Explicit mesh) and a (4, 2) Auto mesh with
  model-sharded params."""
  run_with_devices("""
    import jax, jax.numpy as jnp, numpy as np
    import jaxprune as jp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    def block(p, x):
      h = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)
      return x + jax.nn.gelu(h @ p["w1"]) @ p["w2"]
    k = jax.random.split(jax.random.key(0), 8)
    blocks = [{"w1": jax.random.normal(k[2 * i], (16, 32)) / 4,
               "w2": jax.random.normal(k[2 * i + 1], (32, 16)) / 6} for i in range(2)]
    xs = [jax.random.normal(jax.random.fold_in(k[6], i), (64, 16)) for i in range(2)]
    cal1 = jp.calibrate(block, blocks[0], xs, chunk_size=4)
    seq1 = jp.sequential(block, blocks, xs, "sparsegpt", 0.5, chunk_size=4)

    def same(a, b):
      la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
      assert len(la) == len(lb) > 0
      for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
      bs = jax.device_put(blocks, NamedSharding(mesh, P()))
      xss = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in xs]
      same(jp.calibrate(block, bs[0], xss, chunk_size=4).grams, cal1.grams)
      same(jp.sequential(block, bs, xss, "sparsegpt", 0.5, chunk_size=4), seq1)
      try:
        jp.calibrate(block, bs[0], xss, chunk_size=16)  # 8 rows per device
        raise AssertionError("no error")
      except ValueError as e:
        assert "8 device(s)" in str(e) and "chunk_size=16" in str(e), e

    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    b0 = {"w1": jax.device_put(blocks[0]["w1"], NamedSharding(mesh, P(None, "model"))),
          "w2": jax.device_put(blocks[0]["w2"], NamedSharding(mesh, P("model", None)))}
    xss = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in xs]
    same(jp.calibrate(block, b0, xss, chunk_size=4).grams, cal1.grams)
  """)
