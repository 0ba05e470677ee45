"""jp.sparsify_for_inference: which kernels become sparse, exact stored counts, and x @ kernel
equal to the dense masked matmul (any leading axes, with and without jit) for both formats."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"a": jax.random.normal(k[0], (64, 48)), "b": jax.random.normal(k[1], (48, 16)),
          "conv": jax.random.normal(k[2], (3, 4, 8)), "bias": jnp.ones(16)}


@pytest.mark.parametrize("fmt", ["bcoo", "bcsr"])
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 3)])
def test_matmul_equals_dense_masked_matmul(fmt, lead):
  params = _params()
  masks = jp.topk_mask(jp.magnitude_scores(params), 0.9)
  masks["a"] = masks["a"].at[0, 0].set(True)                # a kept weight ...
  params["a"] = params["a"].at[0, 0].set(0.0)                # ... that is exactly 0
  dense = jp.apply_masks(params, masks)
  sp = jp.sparsify_for_inference(params, masks, min_sparsity=0.8, format=fmt)
  for name in ("a", "b"):
    k = sp[name]
    assert isinstance(k, jp.SparseKernel) and k.format == fmt
    assert k.nse == int(np.count_nonzero(masks[name]))      # kept zeros are stored too
    np.testing.assert_array_equal(np.asarray(k.todense()), np.asarray(dense[name]))
  assert sp["conv"].shape == (3, 4, 8) and not isinstance(sp["conv"], jp.SparseKernel)
  np.testing.assert_array_equal(np.asarray(sp["conv"]), np.asarray(dense["conv"]))
  assert sp["bias"] is params["bias"]
  x = jax.random.normal(jax.random.key(1), lead + (64,))
  f = lambda p, x: (x @ p["a"]) @ p["b"]
  want = np.asarray(f(dense, x))
  for got in (f(sp, x), jax.jit(f)(sp, x)):
    assert got.shape == lead + (16,)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_min_sparsity_keeps_denser_kernels_dense():
  params = _params()
  masks = jp.topk_mask(jp.magnitude_scores(params), {"a": 0.95, "b": 0.5, "conv": 0.9})
  sp = jp.sparsify_for_inference(params, masks, min_sparsity=0.9)
  assert isinstance(sp["a"], jp.SparseKernel) and not isinstance(sp["b"], jp.SparseKernel)
  assert sp["a"].format == "bcsr"                           # the default for float32
  np.testing.assert_array_equal(np.asarray(sp["b"]), np.asarray(jp.apply_masks(params,
                                                                              masks)["b"]))
  everything = jp.sparsify_for_inference(params, masks, min_sparsity=0.0)
  assert isinstance(everything["b"], jp.SparseKernel)


def test_bfloat16_bcoo():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
  masks = jp.topk_mask(jp.magnitude_scores(params), 0.9)
  sp = jp.sparsify_for_inference(params, masks)
  assert sp["a"].format == "bcoo"                           # no CPU CSR kernel for bfloat16
  x = jnp.ones((2, 64), jnp.bfloat16)
  got = x @ sp["a"]
  assert got.dtype == jnp.bfloat16
  want = x @ jp.apply_masks(params, masks)["a"]
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=2e-2, atol=2e-2)


def test_bad_input():
  params = _params()
  masks = jp.topk_mask(jp.magnitude_scores(params), 0.9)
  with pytest.raises(ValueError, match="format must be one of"):
    jp.sparsify_for_inference(params, masks, format="csc")
  with pytest.raises(ValueError, match="min_sparsity must be in"):
    jp.sparsify_for_inference(params, masks, min_sparsity=1.5)
  with pytest.raises(ValueError, match="mask of 'a' is traced"):
    jax.jit(jp.sparsify_for_inference)(params, masks)
  with pytest.raises(ValueError, match="different tree structures"):
    jp.sparsify_for_inference(params, {"a": masks["a"]})
