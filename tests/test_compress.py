"""jp.compress / jp.decompress: bit-identical round trips for every mask kind and dtype, the
chosen format and its exact size, the size targets of the issue, an orbax save/restore read with
no target, jit, sharded arrays on 8 host devices, and bad input."""
import functools
import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from conftest import run_with_devices

import jaxprune as jp
from jaxprune.compress import FORMATS, Compressed, nbytes, size_summary

DTYPES = ("float32", "bfloat16", "float16")


def _params(dtype="float32", seed=0):
  """An MLP-like tree with special values in the kernels: kept zeros, -0.0, NaN and inf."""
  k = jax.random.split(jax.random.key(seed), 4)
  w1 = jax.random.normal(k[0], (32, 64))
  w1 = w1.at[0, :6].set(jnp.array([0.0, -0.0, jnp.nan, jnp.inf, -jnp.inf, -0.0]))
  return {
      "dense1": {"kernel": w1.astype(dtype), "bias": jnp.ones(64, dtype)},
      "dense2": {"kernel": jax.random.normal(k[1], (64, 16)).astype(dtype),
                 "bias": jnp.zeros(16, dtype)},
      "conv": {"kernel": jax.random.normal(k[2], (3, 3, 8, 16)).astype(dtype)},
      "stacked": {"kernel": jax.random.normal(k[3], (3, 16, 32)).astype(dtype)},  # (L, in, out)
      "step": jnp.array(7, jnp.int32),
  }


def _random_masks(params, sparsity, seed=1):
  """Masks from random scores: NaN, inf and -0.0 weights are kept about as often as not."""
  return jp.topk_mask(jp.random_scores(params, jax.random.key(seed)), sparsity)


def _per_slice(params, sparsity, path=("stacked", "kernel")):
  """Masks of the stacked leaf computed slice by slice (each layer its own count)."""
  masks = jp.topk_mask(jp.magnitude_scores(params), sparsity)
  w = params[path[0]][path[1]]
  per = [jp.topk_mask({"w": jp.magnitude_scores({"w": w[i]})["w"]}, sparsity)["w"]
         for i in range(w.shape[0])]
  masks[path[0]][path[1]] = jnp.stack(per)
  return masks


@functools.lru_cache(maxsize=None)
def _masks_cached(kind):
  return jax.device_get(_make_masks(kind, _params("float32")))


def _masks(kind, params=None):
  """The masks of ``kind``, computed once from the float32 params (the same tree for every
  dtype: only the values' dtype changes)."""
  del params
  return jax.tree.map(jnp.asarray, _masks_cached(kind))


def _make_masks(kind, params):
  scores = jp.magnitude_scores(params)
  if kind == "layerwise_90":
    return jp.topk_mask(scores, 0.9)
  if kind == "layerwise_99":
    return jp.topk_mask(scores, 0.99)
  if kind == "random_80":
    return _random_masks(params, 0.8)
  if kind == "global_90":
    return jp.topk_mask(scores, 0.9, scope="global")
  if kind == "nm_2_4":
    return jp.topk_mask(scores, 0.5, structure=jp.n_of_m(2, 4))
  if kind == "nm_2_8":
    return jp.topk_mask(scores, 0.75, structure=jp.n_of_m(2, 8))
  if kind == "nm_2_4_out_axis":
    return jp.topk_mask(scores, 0.5, structure=jp.n_of_m(2, 4, axis=-1))
  if kind == "blocks":
    return jp.topk_mask(scores, 0.75, structure=jp.blocks((4, 4)))
  if kind == "channels":
    return jp.topk_mask(scores, 0.5, structure=jp.channels())
  if kind == "stacked_per_slice":
    return _per_slice(params, 0.8)
  if kind == "mixed":  # one leaf fully pruned, one fully kept (but a full mask), one unpruned
    m = jp.topk_mask(scores, 0.9)
    m["dense2"]["kernel"] = jnp.zeros((64, 16), bool)
    m["conv"]["kernel"] = jnp.ones((3, 3, 8, 16), bool)
    m["stacked"]["kernel"] = jnp.ones((), bool)
    m["dense1"]["bias"] = jnp.arange(64) % 3 == 0
    return m
  raise ValueError(kind)


MASK_KINDS = ("layerwise_90", "layerwise_99", "random_80", "global_90", "nm_2_4", "nm_2_8",
              "nm_2_4_out_axis", "blocks", "channels", "stacked_per_slice", "mixed")


def _bits(x):
  a = np.asarray(x)
  return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bit_identical(got, want):
  chex.assert_trees_all_equal_structs(got, want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert np.asarray(g).dtype == np.asarray(w).dtype, (np.asarray(g).dtype, np.asarray(w).dtype)
    assert np.shape(g) == np.shape(w)
    np.testing.assert_array_equal(_bits(g), _bits(w))


def _nodes(small):
  return [x for x in jax.tree.leaves(small, is_leaf=lambda x: isinstance(x, Compressed))
          if isinstance(x, Compressed)]


class RoundTripTest(parameterized.TestCase):

  @parameterized.product(kind=MASK_KINDS, dtype=DTYPES)
  def test_bit_identical_with_and_without_jit(self, kind, dtype):
    params = _params(dtype)
    masks = _masks(kind, params)
    want = jp.apply_masks(params, masks)
    small = jp.compress(params, masks)
    for leaf in jax.tree.leaves(small):
      assert isinstance(leaf, np.ndarray), type(leaf)   # what any checkpointer stores
    assert_bit_identical(jp.decompress(small), want)
    assert_bit_identical(jax.jit(jp.decompress)(small), want)

  @parameterized.product(kind=("layerwise_90", "layerwise_99", "nm_2_4", "nm_2_8", "blocks",
                               "channels", "stacked_per_slice", "mixed"), fmt=FORMATS)
  def test_every_format_that_fits_round_trips(self, kind, fmt):
    params = _params("bfloat16", seed=3)
    masks = _masks(kind, params)
    want = jp.apply_masks(params, masks)
    if fmt == "n_of_m" and not kind.startswith("nm_"):
      with pytest.raises(ValueError, match="no format in .* can store leaf"):
        jp.compress(params, masks, formats=[fmt])
      return
    small = jp.compress(params, masks, formats=[fmt])
    kinds = {x.kind for x in _nodes(small)} - {"zeros"}
    assert kinds <= {fmt}, kinds
    assert_bit_identical(jax.jit(jp.decompress)(small), want)

  def test_special_values_are_kept_bit_for_bit(self):
    w = jnp.array([[0.0, -0.0, jnp.nan, 1.0], [-jnp.inf, 2.0, -0.0, jnp.inf]])
    nan_payload = jnp.asarray(np.array([0x7FC00123], np.uint32).view(np.float32)[0])
    w = w.at[1, 1].set(nan_payload)
    mask = jnp.array([[True, True, True, False], [True, True, False, True]])
    for fmt in ("bitmask", "indices", "dense"):
      small = jp.compress({"w": w}, {"w": mask}, formats=[fmt])
      got = jp.decompress(small)["w"]
      assert_bit_identical(got, jp.apply_masks({"w": w}, {"w": mask})["w"])
      assert _bits(got)[1, 1] == 0x7FC00123 and _bits(got)[0, 1] == 0x80000000
      assert _bits(got)[0, 3] == 0   # pruned: +0.0

  def test_stacked_leaf_global_and_per_slice(self):
    params = _params()
    for masks in (_per_slice(params, 0.8), jp.topk_mask(jp.magnitude_scores(params), 0.8,
                                                          scope="global")):
      small = jp.compress(params, masks)
      assert small["stacked"]["kernel"].shape == (3, 16, 32)
      assert_bit_identical(jp.decompress(small), jp.apply_masks(params, masks))
    # Per slice: every layer kept its own count, and the stored values say so.
    masks = _per_slice(params, 0.8)
    node = jp.compress(params, masks)["stacked"]["kernel"]
    assert node.arrays["values"].shape == (3 * (512 - round(0.8 * 512)),)

  def test_nnx_state_round_trip(self):
    from flax import nnx
    model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)),
                           nnx.Linear(32, 8, rngs=nnx.Rngs(1)))
    state = nnx.state(model, nnx.Param)
    masks = jp.topk_mask(jp.magnitude_scores(state), 0.5, structure=jp.n_of_m(2, 4))
    small = jp.compress(state, masks)
    assert [x.kind for x in _nodes(small)] == ["n_of_m", "n_of_m"]
    assert_bit_identical(jax.jit(jp.decompress)(small), jp.apply_masks(state, masks))


class FormatTest(parameterized.TestCase):

  def test_chosen_format_and_exact_bytes(self):
    w = _params()["dense1"]["kernel"]                       # 2048 weights, float32
    n = w.size
    cases = {
        "bitmask": jp.topk_mask({"w": w}, 0.8)["w"],        # 410 kept: 1640 + 256 bytes
        "indices": jp.topk_mask({"w": w}, 0.99)["w"],       # 20 kept: 80 + 20 or 40 bytes
        "n_of_m": jp.topk_mask({"w": w}, 0.5, structure=jp.n_of_m(2, 4))["w"],
        "dense": jp.topk_mask({"w": w}, 0.01)["w"],         # a bitmask would be larger
    }
    meta = 4 * (7 + 2)
    for fmt, mask in cases.items():
      k = int(np.count_nonzero(mask))
      small = jp.compress({"w": w}, {"w": mask})
      (row,) = size_summary(small)
      assert row["format"] == fmt, (fmt, row)
      g = small["w"].arrays["gaps"].dtype.itemsize if fmt == "indices" else 0
      want = {"bitmask": 4 * k + n // 8 + meta, "indices": 4 * k + g * k + meta,
              "n_of_m": 4 * k + 2 * k // 8 + meta, "dense": 4 * n}[fmt]
      assert row["stored_bytes"] == want == nbytes(small), (fmt, row, want)
      assert row["dense_bytes"] == 4 * n
    node = jp.compress({"w": w}, {"w": cases["n_of_m"]})["w"]
    assert (node.n, node.m, node.axis) == (2, 4, 0)
    assert node.arrays["values"].shape == (16, 64)          # half the input axis
    assert node.arrays["nm_index"].dtype == np.uint8        # 2 bits per kept weight
    assert node.arrays["nm_index"].shape == (16 * 64 * 2 // 8,)

  def test_fully_pruned_leaf_stores_no_values(self):
    small = jp.compress({"w": jnp.ones((4, 8), jnp.bfloat16)}, {"w": jnp.zeros((), bool)})
    assert small["w"].kind == "zeros" and set(small["w"].arrays) == {"jaxprune_format"}
    assert_bit_identical(jp.decompress(small)["w"], jnp.zeros((4, 8), jnp.bfloat16))
    # Nothing pruned (a full mask): the leaf passes through, whatever the formats allowed.
    w = _params()["dense2"]["kernel"]
    for formats in (FORMATS, ["bitmask"], ["n_of_m"]):
      kept = jp.compress({"w": w}, {"w": jnp.ones(w.shape, bool)}, formats=formats)["w"]
      assert isinstance(kept, np.ndarray)
      np.testing.assert_array_equal(_bits(kept), _bits(w))

  def test_unpruned_leaves_pass_through(self):
    params = _params()
    masks = jp.topk_mask(jp.magnitude_scores(params), 0.9)
    small = jp.compress(params, masks)
    for path in (("dense1", "bias"), ("dense2", "bias")):
      leaf = small[path[0]][path[1]]
      assert isinstance(leaf, np.ndarray)
      np.testing.assert_array_equal(leaf, np.asarray(params[path[0]][path[1]]))
    assert small["step"].dtype == np.int32 and int(small["step"]) == 7

  @parameterized.parameters(
      ("float32", 0.9, None, 0.14),
      ("bfloat16", 0.9, None, 0.19),
      ("float32", 0.5, jp.n_of_m(2, 4), 0.56),
      ("bfloat16", 0.5, jp.n_of_m(2, 4), 0.63),   # 8 + 1 bits per pair of weights of 32
  )
  def test_size_targets_on_prunable_leaves(self, dtype, sparsity, structure, target):
    k = jax.random.split(jax.random.key(0), 3)
    params = {"fc1": {"kernel": jax.random.normal(k[0], (784, 512)).astype(dtype),
                      "bias": jnp.zeros(512, dtype)},
              "fc2": {"kernel": jax.random.normal(k[1], (512, 512)).astype(dtype)},
              "head": {"kernel": jax.random.normal(k[2], (512, 16)).astype(dtype)}}
    masks = jp.topk_mask(jp.magnitude_scores(params), sparsity, structure=structure)
    rows = [r for r in size_summary(jp.compress(params, masks)) if r["format"] != "dense"]
    assert len(rows) == 3
    ratio = sum(r["stored_bytes"] for r in rows) / sum(r["dense_bytes"] for r in rows)
    assert ratio <= target, ratio
    itemsize = jnp.dtype(dtype).itemsize
    kept = 1 - sparsity
    bitmask = (kept * itemsize + 1 / 8) / itemsize   # values + 1 bit per weight
    assert bitmask * 0.9 < ratio <= bitmask * 1.001, (ratio, bitmask)

  def test_n_of_m_detected_along_other_axes_and_groups(self):
    w = _params()["dense2"]["kernel"]                        # (64, 16)
    for structure, want in ((jp.n_of_m(2, 4, axis=-1), (2, 4, 1)),
                            (jp.n_of_m(1, 8), (1, 8, 0)), (jp.n_of_m(4, 16), (4, 16, 0))):
      mask = jp.topk_mask({"w": w}, structure.sparsity, structure=structure)["w"]
      node = jp.compress({"w": w}, {"w": mask})["w"]
      assert node.kind == "n_of_m" and (node.n, node.m, node.axis) == want, node
      k = int(np.count_nonzero(mask))
      assert node.arrays["nm_index"].size == math.ceil(k * (structure.m - 1).bit_length() / 8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_save_and_load_without_target(tmp_path, dtype):
  from orbax.checkpoint import v1 as ocp
  params = _params(dtype)
  masks = _masks("mixed")
  for name, kind in (("nm", "nm_2_4"), ("channels", "channels"), ("sparse", "layerwise_99")):
    masks[name] = _masks(kind)["dense1"]
    params[name] = params["dense1"]
  want = jp.apply_masks(params, masks)
  small = jp.compress(params, masks)
  kinds = {x.kind for x in _nodes(small)}
  assert kinds == {"bitmask", "n_of_m", "indices", "zeros"}, kinds
  path = str(tmp_path / "compressed")
  ocp.save(path, small)
  with warnings.catch_warnings():
    warnings.simplefilter("error")           # no "Sharding info not provided" for numpy leaves
    restored = ocp.load(path)                # the recipe: no target
  assert isinstance(restored["dense1"]["kernel"], dict)
  assert_bit_identical(jp.decompress(restored), want)
  assert_bit_identical(jax.jit(jp.decompress)(jp.as_compressed(restored)), want)
  # With a target (the compressed tree itself, or its abstract form), the nodes come back.
  again = ocp.load(path, small)
  assert isinstance(again["dense1"]["kernel"], Compressed)
  assert_bit_identical(jax.jit(jp.decompress)(again), want)


def test_npz_round_trip_of_leaves(tmp_path):
  params = _params()
  masks = _masks("layerwise_90")
  small = jp.compress(params, masks)
  leaves, treedef = jax.tree.flatten(small)
  path = tmp_path / "c.npz"
  np.savez(path, *leaves)
  with np.load(path) as z:
    loaded = jax.tree.unflatten(treedef, [z[f"arr_{i}"] for i in range(len(leaves))])
  assert_bit_identical(jp.decompress(loaded), jp.apply_masks(params, masks))


class BadInputTest(parameterized.TestCase):

  def test_errors_name_the_leaf(self):
    params = _params()
    masks = _masks("layerwise_90", params)
    with pytest.raises(ValueError, match="different tree structures"):
      jp.compress(params, {"dense1": masks["dense1"]})
    bad = jax.tree.map(lambda x: x, masks)
    bad["conv"]["kernel"] = jnp.ones((3, 3), bool)
    with pytest.raises(ValueError, match="conv/kernel"):
      jp.compress(params, bad)
    with pytest.raises(ValueError, match="unknown formats"):
      jp.compress(params, masks, formats=["zip"])
    with pytest.raises(ValueError, match="traced; compress runs outside jax.jit"):
      jax.jit(jp.compress)(params, masks)

  def test_malformed_restored_nodes(self):
    params = _params()
    small = jp.compress(params, _masks("layerwise_90"), formats=["bitmask"])
    restored = {"w": {k: np.asarray(v) for k, v in small["dense1"]["kernel"].arrays.items()}}
    broken = {"w": dict(restored["w"], jaxprune_format=np.array([99, 0, 0], np.int32))}
    with pytest.raises(ValueError, match="'w/jaxprune_format' is not a jaxprune format"):
      jp.decompress(broken)
    missing = {"w": {k: v for k, v in restored["w"].items() if k != "bits"}}
    with pytest.raises(ValueError, match="lacks arrays \\['bits'\\]"):
      jp.decompress(missing)
    short = {"w": dict(restored["w"], bits=restored["w"]["bits"][:-1])}
    with pytest.raises(ValueError, match="'w/bits' has shape"):
      jp.decompress(short)
    with pytest.raises(ValueError, match="Call jp.as_compressed"):
      jax.jit(jp.decompress)(restored)


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import jaxprune as jp
assert jax.device_count() == 8
k = jax.random.split(jax.random.key(0), 3)
params = {"a": jax.random.normal(k[0], (64, 128)), "b": jax.random.normal(k[1], (128, 32)),
          "c": jax.random.normal(k[2], (4, 32, 64)), "bias": jnp.ones(32)}
specs = {"a": P(None, "x"), "b": P("x", None), "c": P(None, None, "x"), "bias": P()}
scores = jp.magnitude_scores(params)
masks = jp.topk_mask(scores, 0.7)
masks["b"] = jp.topk_mask({"b": scores["b"]}, 0.5, structure=jp.n_of_m(2, 4))["b"]
masks["c"] = jp.topk_mask({"c": scores["c"]}, 0.99)["c"]
want = jax.device_get(jp.apply_masks(params, masks))
x = jax.random.normal(jax.random.key(1), (8, 64))
y_want = np.asarray((x @ want["a"]) @ want["b"])

def check(out):
  for name in params:
    a, b = np.asarray(out[name]), want[name]
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32), err_msg=name)

for kind in (AxisType.Auto, AxisType.Explicit):
  mesh = jax.make_mesh((8,), ("x",), axis_types=(kind,))
  shardings = {n: NamedSharding(mesh, s) for n, s in specs.items()}
  with jax.set_mesh(mesh):
    sharded = {n: jax.device_put(v, shardings[n]) for n, v in params.items()}
    small = jp.compress(sharded, masks)           # gathers each leaf to the host
    assert [type(small[n]).__name__ for n in "abc"] == ["Compressed"] * 3, small
    assert [small[n].kind for n in "abc"] == ["bitmask", "n_of_m", "indices"]
    # Put the compressed arrays on the mesh: N:M values sharded like their kernel, flat
    # arrays split over the devices when they divide evenly, else replicated.
    def place(path, v):
      name = jax.tree_util.keystr(path[:1])[2:-2]
      if name == "b" and path[-1].name == "values":
        return jax.device_put(v, shardings["b"])
      if v.ndim == 1 and v.shape[0] % 8 == 0:
        return jax.device_put(v, NamedSharding(mesh, P("x")))
      return jax.device_put(v, NamedSharding(mesh, P()))
    on_mesh = jax.tree_util.tree_map_with_path(place, small)
    assert not on_mesh["a"].arrays["bits"].sharding.is_fully_replicated
    check(jax.jit(jp.decompress)(on_mesh))
    # Sharded like the original params when asked.
    out = jax.jit(jp.decompress, out_shardings=shardings)(on_mesh)
    check(out)
    for name in params:
      assert out[name].sharding.is_equivalent_to(shardings[name], out[name].ndim), name
    # ...and usable: a sharded matmul on the decompressed kernels.
    y = jax.jit(lambda p, x: jnp.matmul(x @ p["a"], p["b"], out_sharding=P()))(out, x)
    np.testing.assert_allclose(np.asarray(y), y_want, rtol=1e-4, atol=1e-3)
  print("ok", kind)
"""


def test_decompress_on_sharded_arrays_8_devices():
  out = run_with_devices(SHARDED)
  assert "ok AxisType.Auto" in out and "ok AxisType.Explicit" in out, out
