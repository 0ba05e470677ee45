"""The DESIGN.md rules for masks: exact counts, ties, NaN, tree shape, structures, bad input."""
import logging
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import jaxprune as jp

SHAPES = ((4, 5), (3, 3, 8), (64, 32))
SPARSITIES = (0.0, 0.3, 0.9, 1.0)


def _random(shape, dtype="float32", seed=0):
  return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def _pruned(mask):
  return int(np.size(mask) - np.count_nonzero(np.asarray(mask)))


class LayerwiseTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(shape=SHAPES, dtype=("float32", "bfloat16"), sparsity=SPARSITIES)
  def test_exact_count_and_largest_kept(self, shape, dtype, sparsity):
    w = _random(shape, dtype)
    masks = self.variant(lambda p: jp.topk_mask(jp.magnitude_scores(p), sparsity))({"w": w})
    m = np.asarray(masks["w"])
    n = math.prod(shape)
    self.assertEqual(m.dtype, np.bool_)
    self.assertEqual(m.shape, shape)
    self.assertEqual(_pruned(m), round(sparsity * n))
    a = np.abs(np.asarray(w.astype(jnp.float32)))
    if 0 < m.sum() < n:
      self.assertGreaterEqual(a[m].min(), a[~m].max())

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.0, 0.37, 0.5, 1.0)
  def test_ties_pruned_in_index_order(self, sparsity):
    z = jnp.zeros((10, 10))
    m = np.asarray(self.variant(lambda p: jp.topk_mask(p, sparsity))({"w": z})["w"]).ravel()
    k = round(sparsity * 100)
    np.testing.assert_array_equal(m, np.arange(100) >= k)

  def test_constant_leaf_three_dims_ties_follow_row_major_order(self):
    m = np.asarray(jp.topk_mask({"w": jnp.ones((2, 3, 4))}, 0.5)["w"])
    np.testing.assert_array_equal(m.ravel(), np.arange(24) >= 12)

  def test_partial_ties_straddling_threshold(self):
    w = jnp.array([[5., 1., 1.], [1., 0.5, 9.]])
    m = np.asarray(jp.topk_mask({"w": w}, 0.5)["w"]).ravel()
    # 0.5 first, then two of the three 1.0s in index order (positions 1 and 2); position 3 kept
    np.testing.assert_array_equal(m, [True, False, False, True, False, True])

  def test_nan_pruned_first_and_infinities_ordered(self):
    w = jnp.array([[jnp.inf, jnp.nan], [-jnp.inf, 0.0], [-0.0, 1.0]])
    m = np.asarray(jp.topk_mask({"w": w}, 1 / 6)["w"]).ravel()
    np.testing.assert_array_equal(m, [True, False, True, True, True, True])
    m = np.asarray(jp.topk_mask({"w": w}, 2 / 6)["w"]).ravel()
    np.testing.assert_array_equal(m, [True, False, False, True, True, True])
    # -0.0 equals +0.0: ties in index order
    m = np.asarray(jp.topk_mask({"w": w}, 3 / 6)["w"]).ravel()
    np.testing.assert_array_equal(m, [True, False, False, False, True, True])

  def test_same_result_with_traced_sparsity(self):
    p = {"a": _random((64, 32)), "b": _random((16, 8), seed=1)}
    eager = jp.topk_mask(p, 0.6)
    traced = jax.jit(lambda p, s: jp.topk_mask(p, s))(p, jnp.float32(0.6))
    chex.assert_trees_all_equal(eager, traced)

  def test_mask_tree_matches_params_with_scalar_true(self):
    p = {"dense": {"kernel": _random((8, 4)), "bias": jnp.ones(4)}, "step": jnp.int32(3)}
    masks = jp.topk_mask(jp.magnitude_scores(p), 0.5)
    self.assertEqual(jax.tree.structure(masks), jax.tree.structure(p))
    self.assertEqual(masks["dense"]["bias"].shape, ())
    self.assertTrue(bool(masks["dense"]["bias"]))
    self.assertEqual(masks["step"].shape, ())
    self.assertEqual(masks["dense"]["kernel"].shape, (8, 4))

  def test_sparsity_zero_is_identity(self):
    p = {"w": _random((6, 6))}
    out, masks = jp.prune(p, 0.0)
    np.testing.assert_array_equal(out["w"], p["w"])
    self.assertTrue(bool(np.all(masks["w"])))


class GlobalTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(sparsity=SPARSITIES, dtype=("float32", "bfloat16"))
  def test_exact_total_and_one_threshold(self, sparsity, dtype):
    p = {"a": _random((16, 8), dtype), "b": _random((4, 4, 3), dtype, 1) * 3,
         "c": _random((32, 2), dtype, 2) * 0.1, "bias": jnp.ones(8)}
    masks = self.variant(lambda p: jp.topk_mask(jp.magnitude_scores(p), sparsity,
                                                scope="global"))(p)
    n = 128 + 48 + 64
    self.assertEqual(sum(_pruned(masks[k]) for k in "abc"), round(sparsity * n))
    kept = np.concatenate([np.abs(np.asarray(p[k], np.float32))[np.asarray(masks[k])]
                           for k in "abc"])
    dropped = np.concatenate([np.abs(np.asarray(p[k], np.float32))[~np.asarray(masks[k])]
                              for k in "abc"])
    if kept.size and dropped.size:
      self.assertGreaterEqual(kept.min(), dropped.max())
    self.assertEqual(masks["bias"].shape, ())

  def test_global_ties_across_leaves_in_leaf_order(self):
    p = {"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 2))}
    m = jp.topk_mask(p, 0.75, scope="global")  # 9 of 12: all of a, then 3 of b
    self.assertEqual(_pruned(m["a"]), 6)
    np.testing.assert_array_equal(np.asarray(m["b"]).ravel(), [False] * 3 + [True] * 3)

  def test_global_channels(self):
    p = {"a": jnp.array([[1., 5.], [1., 5.]]), "b": jnp.array([[2., 0.1, 3.]])}
    m = jp.topk_mask(p, 0.4, scope="global", structure=jp.channels())  # 2 of 5 channels
    np.testing.assert_array_equal(m["a"][0], [False, True])
    np.testing.assert_array_equal(m["b"][0], [True, False, True])

  def test_global_needs_one_sparsity(self):
    with self.assertRaisesRegex(ValueError, "one sparsity"):
      jp.topk_mask({"w": jnp.ones((2, 2))}, {"w": 0.5}, scope="global")
    with self.assertRaisesRegex(ValueError, "layerwise"):
      jp.topk_mask({"w": jnp.ones((4, 2))}, 0.5, scope="global", structure=jp.n_of_m(2, 4))


def _hlo_max_elements(compiled) -> int:
  best = 0
  for dims in re.findall(r"\b(?:f32|f16|bf16|s32|u32|u16|pred|s8|u8)\[([0-9,]+)\]",
                         compiled.as_text()):
    best = max(best, math.prod(int(d) for d in dims.split(",")))
  return best


def test_global_scope_builds_no_buffer_of_total_size():
  """Inspect the compiled HLO: no array in the program is as large as all scores together.

  The naive method (concatenate + argsort) has an array of N elements; ours counts per leaf.
  XLA's memory analysis also shows the temporaries stay within one copy of the scores (the
  fori_loop state), far below the sort's.
  """
  leaves = {f"l{i}": _random((50, 40), seed=i) for i in range(20)}
  total, largest = 20 * 2000, 2000
  ours = jax.jit(lambda p: jp.topk_mask(p, 0.9, scope="global")).lower(leaves).compile()

  def naive(p):
    flat = jnp.concatenate([x.ravel() for x in jax.tree.leaves(p)])
    order = jnp.argsort(flat)
    keep = jnp.zeros(flat.shape, bool).at[order[round(0.9 * flat.size):]].set(True)
    return keep

  theirs = jax.jit(naive).lower(leaves).compile()
  assert _hlo_max_elements(theirs) >= total          # the check can see a concatenation
  # ... and ours has nothing beyond one leaf (plus the padding of a cumsum's reduce-window)
  assert _hlo_max_elements(ours) <= 2 * largest
  temp_ours = ours.memory_analysis().temp_size_in_bytes
  temp_naive = theirs.memory_analysis().temp_size_in_bytes
  assert temp_ours <= 4 * total + 64 * 1024, temp_ours
  assert temp_ours < temp_naive


class StructureTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(nm=((2, 4), (1, 4), (4, 8)), dtype=("float32", "bfloat16"))
  def test_n_of_m_exactly_n_largest_per_group(self, nm, dtype):
    n, m = nm
    w = _random((16, 6), dtype)
    mask = self.variant(lambda p: jp.topk_mask(jp.magnitude_scores(p), 1 - n / m,
                                               structure=jp.n_of_m(n, m)))({"w": w})["w"]
    groups = np.asarray(mask).reshape(16 // m, m, 6)
    np.testing.assert_array_equal(groups.sum(axis=1), n)
    a = np.abs(np.asarray(w, np.float32)).reshape(16 // m, m, 6)
    kept_min = np.where(groups, a, np.inf).min(axis=1)
    dropped_max = np.where(groups, -np.inf, a).max(axis=1)
    assert np.all(kept_min >= dropped_max)

  def test_n_of_m_ties_and_other_axis(self):
    mask = jp.topk_mask({"w": jnp.ones((3, 8))}, 0.5, structure=jp.n_of_m(2, 4, axis=-1))["w"]
    np.testing.assert_array_equal(np.asarray(mask)[0], [False, False, True, True] * 2)

  def test_n_of_m_rejects_wrong_sparsity_and_shape(self):
    with self.assertRaisesRegex(ValueError, "'w'.*not a multiple of 4"):
      jp.topk_mask({"w": jnp.ones((6, 2))}, 0.5, structure=jp.n_of_m(2, 4))
    with self.assertRaisesRegex(ValueError, "sparsity 0.9 was asked for leaf 'w'"):
      jp.topk_mask({"w": jnp.ones((8, 2))}, 0.9, structure=jp.n_of_m(2, 4))
    with self.assertRaisesRegex(ValueError, "0 <= n <= m"):
      jp.n_of_m(5, 4)

  @parameterized.parameters(0.25, 0.5, 0.75)
  def test_channels_whole_columns_lowest_norm(self, sparsity):
    w = _random((8, 12)) * jnp.arange(1, 13, dtype=jnp.float32)[None, :]
    m = np.asarray(jp.topk_mask({"w": w}, sparsity, structure=jp.channels())["w"])
    col_kept = m.all(axis=0)
    assert np.all(m.all(axis=0) | ~m.any(axis=0))   # each column all kept or all pruned
    self.assertEqual(int((~col_kept).sum()), round(sparsity * 12))
    norms = np.linalg.norm(np.asarray(w), axis=0)
    assert norms[col_kept].min() >= norms[~col_kept].max()

  def test_channels_conv_kernel_and_axis_error(self):
    w = _random((3, 3, 4, 10))
    m = np.asarray(jp.topk_mask({"w": w}, 0.3, structure=jp.channels())["w"])
    self.assertEqual(int((~m.all(axis=(0, 1, 2))).sum()), 3)
    with self.assertRaisesRegex(ValueError, "axis 4 is out of range for leaf 'w'"):
      jp.topk_mask({"w": w}, 0.3, structure=jp.channels(axis=4))

  def test_heads_as_channels_of_reshaped_kernel(self):
    q = _random((16, 4, 8))  # (d_model, heads, head_dim)
    m = np.asarray(jp.topk_mask({"q": q}, 0.5, structure=jp.channels(axis=-2))["q"])
    heads_kept = m.all(axis=(0, 2))
    self.assertEqual(int(heads_kept.sum()), 2)
    assert np.all(m.all(axis=(0, 2)) | ~m.any(axis=(0, 2)))

  def test_blocks_exact_units(self):
    w = _random((8, 12))
    m = np.asarray(jp.topk_mask({"w": w}, 0.5, structure=jp.blocks((2, 3)))["w"])
    units = m.reshape(4, 2, 4, 3)
    assert np.all(units.all(axis=(1, 3)) | ~units.any(axis=(1, 3)))
    self.assertEqual(int((~units.all(axis=(1, 3))).sum()), 8)
    with self.assertRaisesRegex(ValueError, "does not tile leaf 'w'"):
      jp.topk_mask({"w": w}, 0.5, structure=jp.blocks((3, 3)))

  @parameterized.parameters(0.0, 0.25, 0.5, 1.0)
  def test_per_output_same_count_per_column(self, sparsity):
    w = _random((12, 5)) * jnp.array([[1., 10., 100., 0.1, 1.]])
    m = np.asarray(jp.topk_mask({"w": w}, sparsity, structure=jp.per_output())["w"])
    np.testing.assert_array_equal((~m).sum(axis=0), round(sparsity * 12))


class AllocationTest(parameterized.TestCase):

  def test_erk_weighted_sparsity_and_dense_small_layers(self):
    p = {"big": jnp.zeros((512, 512)), "mid": jnp.zeros((512, 64)), "tiny": jnp.zeros((4, 2)),
         "bias": jnp.zeros(64)}
    s = jp.erk_sparsities(p, 0.9)
    sizes = {"big": 512 * 512, "mid": 512 * 64, "tiny": 8}
    weighted = sum(s[k] * n for k, n in sizes.items()) / sum(sizes.values())
    self.assertAlmostEqual(weighted, 0.9, places=9)
    self.assertEqual(s["bias"], 0.0)
    assert s["big"] > s["mid"] > s["tiny"]
    s99 = jp.erk_sparsities(p, 0.99)
    self.assertEqual(s99["tiny"], 0.0)  # would exceed density 1: kept dense, scale re-solved
    weighted = sum(s99[k] * n for k, n in sizes.items()) / sum(sizes.values())
    self.assertAlmostEqual(weighted, 0.99, places=9)
    masks = jp.topk_mask(jp.magnitude_scores(p), s)
    for k, n in sizes.items():
      self.assertEqual(_pruned(masks[k]), round(s[k] * n))

  def test_regex_dict_and_callable(self):
    p = {"enc": {"kernel": _random((10, 10))}, "dec": {"kernel": _random((10, 10))}}
    m = jp.topk_mask(p, {r"enc/.*": 0.3, r".*": 0.8})
    self.assertEqual(_pruned(m["enc"]["kernel"]), 30)
    self.assertEqual(_pruned(m["dec"]["kernel"]), 80)
    m = jp.topk_mask(p, lambda path, leaf: 0.1 if path.startswith("dec") else 0.5)
    self.assertEqual(_pruned(m["dec"]["kernel"]), 10)
    with self.assertRaisesRegex(ValueError, r"patterns \['head/.*'\] match no prunable leaf"):
      jp.topk_mask(p, {"head/.*": 0.5})

  def test_tree_of_sparsities(self):
    p = {"a": _random((4, 5)), "b": _random((5, 4))}
    m = jp.topk_mask(p, {"a": 0.5, "b": 0.25})
    self.assertEqual((_pruned(m["a"]), _pruned(m["b"])), (10, 5))


class BadInputTest(parameterized.TestCase):

  def test_sparsity_out_of_range_names_leaf(self):
    p = {"layer": {"kernel": jnp.ones((2, 2))}}
    with self.assertRaisesRegex(ValueError, "1.5 for leaf 'layer/kernel' is outside"):
      jp.topk_mask(p, 1.5)
    with self.assertRaisesRegex(ValueError, "-0.1 for leaf 'layer/kernel'"):
      jp.topk_mask(p, {"layer": {"kernel": -0.1}})

  def test_where_selects_nothing_or_non_float(self):
    with self.assertRaisesRegex(ValueError, "selects no leaf"):
      jp.topk_mask({"b": jnp.ones(3)}, 0.5)
    with self.assertRaisesRegex(ValueError, "non-float leaf 'idx'"):
      jp.topk_mask({"idx": jnp.ones((3, 3), jnp.int32)}, 0.5, where=lambda p, x: True)

  def test_masks_and_params_must_match(self):
    p = {"w": jnp.ones((2, 3))}
    with self.assertRaisesRegex(ValueError, "different tree structures"):
      jp.apply_masks(p, {"v": jnp.ones((2, 3), bool)})
    with self.assertRaisesRegex(ValueError, "mask for 'w' has shape \\(3, 2\\)"):
      jp.apply_masks(p, {"w": jnp.ones((3, 2), bool)})
    with self.assertRaisesRegex(ValueError, "mask for 'w' must be bool"):
      jp.apply_masks(p, {"w": jnp.ones((2, 3))})

  def test_unknown_scope(self):
    with self.assertRaisesRegex(ValueError, "scope must be"):
      jp.topk_mask({"w": jnp.ones((2, 2))}, 0.5, scope="per-layer")


class ApplyMeasureTest(parameterized.TestCase):

  def test_apply_masks_uses_where_not_multiply(self):
    p = {"w": jnp.array([[jnp.nan, jnp.inf], [1., 2.]]), "b": jnp.ones(2)}
    m = {"w": jnp.array([[False, False], [True, True]]), "b": jnp.bool_(True)}
    out = jp.apply_masks(p, m)
    np.testing.assert_array_equal(out["w"], [[0., 0.], [1., 2.]])
    self.assertIs(out["b"], p["b"])

  def test_apply_masks_keeps_dtype_and_jits(self):
    p = {"w": _random((4, 4), "bfloat16")}
    m = jp.topk_mask(p, 0.5)
    out = jax.jit(jp.apply_masks)(p, m)
    self.assertEqual(out["w"].dtype, jnp.bfloat16)
    self.assertEqual(int((np.asarray(out["w"], np.float32) == 0).sum()), 8)

  def test_sparsity_of_params_and_masks(self):
    p = {"w": jnp.array([[0., 1.], [0., 0.]]), "b": jnp.zeros(2)}
    self.assertEqual(float(jp.sparsity(p)), 0.75)
    masks = jp.topk_mask(_random((10, 10)), 0.3)
    self.assertAlmostEqual(float(jax.jit(jp.sparsity)({"m": masks, "s": jnp.bool_(True)})), 0.3)

  def test_summary_rows_and_table(self):
    p = {"a": jnp.array([[0., 1.], [2., 3.]]), "b": jnp.ones((3, 3)), "bias": jnp.ones(3)}
    s = jp.summary(p)
    self.assertEqual([r["path"] for r in s.rows], ["a", "b"])
    self.assertEqual(s.totals()["kept"], 12)
    lines = str(s).splitlines()
    self.assertEqual(len({len(line) for line in lines}), 1)  # aligned
    self.assertIn("total", lines[-1])
    masks = jp.topk_mask(p, 0.5)
    self.assertEqual(jp.summary(p, masks).totals()["kept"], 2 + 5)
    self.assertIn("| path", s.to_markdown())


class ScoresTest(parameterized.TestCase):

  def test_random_scores_deterministic_and_per_leaf(self):
    p = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))}
    s1 = jp.random_scores(p, jax.random.key(0))
    s2 = jp.random_scores(p, jax.random.key(0))
    chex.assert_trees_all_equal(s1, s2)
    assert not np.array_equal(s1["a"], s1["b"])
    m = jp.topk_mask(s1, 0.5)
    self.assertEqual(_pruned(m["a"]), 8)

  def test_saliency_and_movement(self):
    p, g = {"w": jnp.array([[1., -2.]])}, {"w": jnp.array([[3., 0.5]])}
    np.testing.assert_array_equal(jp.saliency_scores(p, g)["w"], [[3., 1.]])
    s = jp.movement_scores(p, g)
    np.testing.assert_array_equal(s["w"], [[-3., 1.]])
    np.testing.assert_array_equal(jp.movement_scores(p, g, accumulated=s)["w"], [[-6., 2.]])
    with self.assertRaisesRegex(ValueError, "different tree structures"):
      jp.saliency_scores(p, {"v": g["w"]})

  def test_activation_scores_wanda(self):
    w = jnp.array([[1., -1.], [2., 2.], [-4., 0.5]])       # (in=3, out=2)
    norms = {"w": jnp.array([1., 0.25, 2.])}
    s = jp.activation_scores({"w": w}, norms)["w"]
    np.testing.assert_allclose(s, [[1., 1.], [0.5, 0.5], [8., 1.]])
    m = jp.topk_mask({"w": s}, 1 / 3, structure=jp.per_output())["w"]
    np.testing.assert_array_equal(m, [[True, True], [False, False], [True, True]])
    with self.assertRaisesRegex(ValueError, "input_norms for 'w' must be a vector of length 3"):
      jp.activation_scores({"w": w}, {"w": jnp.ones(2)})

  def test_nnx_state_paths_drop_value(self):
    from flax import nnx
    model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    masks = jp.topk_mask(jp.magnitude_scores(state), 0.5)
    self.assertEqual([r["path"] for r in jp.summary(state, masks).rows], ["kernel"])
    self.assertEqual(_pruned(jax.tree.leaves(masks)[1]), 12)
    pruned = jp.apply_masks(state, masks)
    nnx.update(model, pruned)
    self.assertEqual(int((model.kernel[...] == 0).sum()), 12)


def test_eager_masks_compile_one_program_per_leaf_not_per_op(caplog):
  """An eager ``topk_mask`` runs the library's jitted per-leaf programs only: no one-op program
  (an eager op compiles one per shape: an eager N:M mask took ~14x its jitted time)."""
  scores = {"a": jax.random.normal(jax.random.key(0), (28, 12)),   # shapes no other test uses
            "b": jax.random.normal(jax.random.key(1), (12, 52))}
  jax.block_until_ready(scores)

  def compiled(**kwargs):
    caplog.clear()
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
      masks = jp.topk_mask(scores, 0.5, **kwargs)
    names = re.findall(r"Finished XLA compilation of (jit\(\w+\))", caplog.text)
    return masks, sorted(names)

  masks, names = compiled(structure=jp.n_of_m(2, 4))
  assert names == ["jit(_n_of_m_keep)"] * 2
  assert [_pruned(masks[k]) for k in "ab"] == [28 * 12 // 2, 12 * 52 // 2]
  masks, names = compiled()
  assert names == ["jit(_expand_keep)"] * 2 + ["jit(_lowest)"] * 2
  assert [_pruned(masks[k]) for k in "ab"] == [28 * 12 // 2, 12 * 52 // 2]
  assert compiled()[1] == []   # and the second call compiles nothing
