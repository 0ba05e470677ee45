"""What the mask engine leaves in a compiled program, and that its tie-break stays exact.

XLA:CPU allocates an executable's temporaries afresh at every call, untaken ``lax.cond``
branches included, and glibc serves a block above its mmap threshold (at most 32 MiB) with fresh
pages: every page the step touches then faults and is zeroed by the kernel. A pruning transform
whose mask-update branch held int32 copies of its leaves (a single-output NaN count that XLA:CPU
does not fuse, the tie-break's cumsums) pushed a 5M-param training step over that line, and a
step that does *not* update its masks cost 1.2-1.5x a plain one. These tests pin the structure
that fixed it (no integer array of a leaf's size anywhere in the program, temporaries within one
leaf), not a timing.
"""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp

pytestmark = pytest.mark.usefixtures("xla_optimized")  # asserts on the optimized program

SHAPES = ((128, 96), (96, 128))
NEVER = 10**9


def _params(shapes=SHAPES):
  return {f"l{i}": {"kernel": jax.random.normal(jax.random.key(i), s), "bias": jnp.zeros(s[-1])}
          for i, s in enumerate(shapes)}


def _materialized(compiled):
  """``(dtype, elements)`` of every instruction outside fusions: the arrays that get buffers."""
  text = compiled.as_text()
  fused = set(re.findall(r"\bfusion\(.*?calls=(%[\w.\-]+)", text))
  out, skip = [], False
  for line in text.splitlines():
    head = re.match(r"^(?:ENTRY )?(%[\w.\-]+) ", line)
    if head:
      skip = head.group(1) in fused
      continue
    m = re.match(r"^\s+(?:ROOT )?%[\w.\-]+ = (\w+)\[([0-9,]*)\]", line)
    if m and not skip:
      dims = [int(d) for d in m.group(2).split(",") if d]
      out.append((m.group(1), math.prod(dims)))
  return out


def _int_arrays_of_leaf_size(compiled, leaf_size):
  return [(t, n) for t, n in _materialized(compiled)
          if t in ("s32", "u32", "s64", "u64") and n >= leaf_size]


def _step(tx):
  def step(params, opt_state):
    grads = jax.tree.map(jnp.sin, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


def _compile_step(tx, params):
  return jax.jit(_step(tx), donate_argnums=(0, 1)).lower(params, tx.init(params)).compile()


@pytest.mark.parametrize("make_tx", [
    lambda: optax.chain(optax.adam(1e-3), jp.magnitude_pruning(0.9, update_every=NEVER)),
    lambda: optax.chain(optax.adam(1e-3), jp.magnitude_pruning(0.9, update_every=NEVER,
                                                               scope="global")),
    lambda: optax.chain(optax.adam(1e-3), jp.magnitude_pruning(
        0.5, update_every=NEVER, structure=jp.per_output())),
], ids=["layerwise", "global", "per_output"])
def test_no_update_step_holds_no_integer_copy_of_a_leaf(make_tx):
  """The compiled step (its mask-update branch included) has no int32 array of a leaf's size:
  every count is a fused reduction and ties are ordered by a radix select over the position."""
  params = _params()
  compiled = _compile_step(make_tx(), params)
  assert " conditional(" in compiled.as_text()        # the update branch is in the program
  assert _int_arrays_of_leaf_size(compiled, min(math.prod(s) for s in SHAPES)) == []


def test_the_check_sees_an_integer_copy():
  """The helper does find a materialized int32 leaf (a cumsum cannot fuse into anything)."""
  w = jnp.ones(SHAPES[0], bool)
  compiled = jax.jit(lambda m: jnp.cumsum(m.astype(jnp.int32), axis=1) < 5).lower(w).compile()
  assert _int_arrays_of_leaf_size(compiled, math.prod(SHAPES[0]))


@pytest.mark.parametrize("kwargs", [{}, {"scope": "global"}, {"structure": jp.per_output()}],
                         ids=["layerwise", "global", "per_output"])
def test_mask_temporaries_within_one_leaf(kwargs):
  """With the scores as arguments, the whole selection (tie-break branch included) needs less
  scratch memory than one float32 leaf (it was two leaves' worth of int32 before)."""
  scores = {k: v["kernel"] for k, v in _params().items()}
  compiled = jax.jit(lambda s: jp.topk_mask(s, 0.5, **kwargs)).lower(scores).compile()
  largest = max(math.prod(s) for s in SHAPES)
  assert compiled.memory_analysis().temp_size_in_bytes <= 4 * largest


def test_leaves_of_one_shape_share_one_selection_holding_one_leaf_copy():
  """Layerwise leaves of one shape share one selection program (a ``lax.map`` that switches
  to each leaf): its scratch is one copy of a leaf and a little more, whatever the number of
  leaves, and no integer array of a leaf's size exists in a training step that holds it."""
  shape = SHAPES[0]
  temps = []
  for n in (2, 4):
    scores = {f"l{i}": jax.random.normal(jax.random.key(i), shape) for i in range(n)}
    compiled = jax.jit(lambda s: jp.topk_mask(s, 0.5)).lower(scores).compile()
    temps.append(compiled.memory_analysis().temp_size_in_bytes)
  # No growth with the number of leaves (a copy per leaf would add 48 kB per leaf): the temps
  # of 2 and 4 leaves differ only in how XLA packs a few scalars, by well under 1 kB.
  assert abs(temps[1] - temps[0]) < 1024 and max(temps) <= 2 * 4 * math.prod(shape)
  tx = optax.chain(optax.adam(1e-3), jp.magnitude_pruning(0.9, update_every=NEVER))
  compiled = _compile_step(tx, _params((shape,) * 3))
  assert " conditional(" in compiled.as_text()
  assert _int_arrays_of_leaf_size(compiled, math.prod(shape)) == []


@pytest.mark.parametrize("n_leaves", [4, 8])
def test_magnitude_step_holds_no_tree_of_scores(n_leaves):
  """A magnitude step that updates its masks computes ``|w|`` (NaN where already pruned)
  inside the shared selection, one leaf at a time (``_select.elementwise``), so its
  temporaries do not grow with the number of leaves: about 2 leaves' worth, where the scores
  computed as a tree before the selection held all of them (9.0 leaves for 8 leaves)."""
  shape = (256, 256)
  leaf_bytes = 4 * math.prod(shape)
  tx = optax.chain(optax.adam(1e-3), jp.magnitude_pruning(0.9, update_every=1))
  compiled = _compile_step(tx, _params((shape,) * n_leaves))
  assert compiled.memory_analysis().temp_size_in_bytes <= 2.5 * leaf_bytes


def _entry_copies(compiled, dtype="pred"):
  """Shapes of the ``dtype`` copies in the entry computation: copies that run at every call."""
  text = compiled.as_text()
  entry = text[text.index("\nENTRY"):]
  return re.findall(rf"= {dtype}\[([0-9,]+)\]\{{[^}}]*\}} copy\(", entry)


@pytest.mark.parametrize("kwargs", [{}, {"scope": "global"}, {"structure": jp.per_output()}],
                         ids=["layerwise", "global", "per_output"])
def test_step_without_an_update_copies_no_mask(kwargs):
  """A donated step that neither updates nor checks its masks passes them through in place:
  no mask is copied at every call (the former keep / check / check + update ``lax.switch``
  copied each one: 2.0x an adam step on the half-width GPT-2 tree, 1.43x after the change)."""
  tx = optax.chain(optax.adam(1e-3), jp.magnitude_pruning(0.9, update_every=NEVER, **kwargs))
  compiled = _compile_step(tx, _params())
  assert " conditional(" in compiled.as_text()
  assert _entry_copies(compiled) == []


@pytest.mark.parametrize("make_tx", [jp.rigl, jp.set_training], ids=["rigl", "set"])
def test_sparse_training_step_copies_no_optimizer_state(make_tx):
  """RigL/SET reset the grown connections' inner state before the inner update, so adam's
  update fuses as in a plain step and no moment is copied at every call (the reset after it
  made XLA:CPU copy every ``mu`` and ``nu`` leaf: RigL without an update cost 4.7x an adam step
  on the half-width GPT-2 tree, 2.1x after the change)."""
  tx = make_tx(optax.adam(1e-3), sparsity=0.9, update_every=NEVER, end_step=NEVER)
  compiled = _compile_step(tx, _params())
  assert " conditional(" in compiled.as_text()
  assert _entry_copies(compiled, "f32") == []


def test_the_copy_check_sees_a_switch_that_reads_and_passes_the_masks():
  """The helper finds the copy that a branch reading the masks and passing them through
  costs, and none in the nested conds with a freshly written check-only branch."""
  m, p = jnp.ones(SHAPES[0], bool), jnp.ones(SHAPES[0])

  def switch(m, p, i):
    count = lambda m: (m, jnp.sum(~m & (p != 0)))
    return jax.lax.switch(i, [lambda m: (m, jnp.int32(0)), count, lambda m: (~m, 0)], m)

  def nested(m, p, i):
    def check_then(m):
      zero = jnp.minimum(jnp.sum(~m & (p != 0)), 0)
      return jax.lax.cond(i == 2, lambda m: ~m, lambda m: m | (zero != 0), m)
    return jax.lax.cond(i > 0, check_then, lambda m: m, m)

  compile_ = lambda f: jax.jit(f, donate_argnums=0).lower(m, p, 0).compile()
  assert _entry_copies(compile_(switch)) == [",".join(map(str, SHAPES[0]))]
  assert _entry_copies(compile_(nested)) == []


# ----------------------------------------------------------------------------- exactness


def _reference_pruned(flat_scores, k):
  """Indices of the ``k`` lowest of a flat float array: NaN lowest, -0.0 == 0.0, ties by index."""
  x = np.asarray(flat_scores, np.float64)
  nan = np.isnan(x)
  order = np.lexsort((np.arange(x.size), np.where(nan, 0.0, x + 0.0), ~nan))
  out = np.zeros(x.size, bool)
  out[order[:k]] = True
  return out


def _tied(shape, seed, dtype=jnp.float32):
  """Scores with many ties (a few distinct values), a NaN, -0.0 and +0.0."""
  rng = np.random.default_rng(seed)
  x = rng.integers(-2, 3, size=shape).astype(np.float32)
  flat = x.reshape(-1)
  flat[rng.integers(flat.size)] = np.nan
  flat[flat == 0] = rng.choice([0.0, -0.0], size=int(np.sum(flat == 0)))
  return jnp.asarray(x, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(7, 9), (3, 5, 11), (300,)])
@pytest.mark.parametrize("sparsity", [0.13, 0.5, 0.77])
def test_layerwise_ties_match_reference(shape, sparsity, dtype):
  s = _tied(shape, seed=sum(shape), dtype=dtype)
  mask = jax.jit(lambda s: jp.topk_mask({"w": s}, sparsity, where=lambda p, x: True))(s)["w"]
  k = round(sparsity * s.size)
  expected = ~_reference_pruned(np.asarray(s.astype(jnp.float32)).reshape(-1), k)
  np.testing.assert_array_equal(np.asarray(mask).reshape(-1), expected)


@pytest.mark.parametrize("sparsity", [0.2, 0.45, 0.8])
def test_global_ties_match_reference(sparsity):
  leaves = {"a": _tied((6, 7), 1), "b": _tied((4, 3, 5), 2), "c": _tied((9, 2), 3)}
  masks = jax.jit(lambda s: jp.topk_mask(s, sparsity, scope="global",
                                         where=lambda p, x: True))(leaves)
  flat = np.concatenate([np.asarray(v).reshape(-1) for v in jax.tree.leaves(leaves)])
  expected = ~_reference_pruned(flat, round(sparsity * flat.size))
  got = np.concatenate([np.asarray(m).reshape(-1) for m in jax.tree.leaves(masks)])
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_per_output_ties_match_reference(axis):
  s = _tied((5, 6, 4), 4)
  mask = jax.jit(lambda s: jp.topk_mask({"w": s}, 0.5, structure=jp.per_output(axis=axis),
                                        where=lambda p, x: True))(s)["w"]
  moved = np.moveaxis(np.asarray(s), axis, -1)
  got = np.moveaxis(np.asarray(mask), axis, -1)
  n = moved[..., 0].size
  for j in range(moved.shape[-1]):
    expected = ~_reference_pruned(moved[..., j].reshape(-1), round(0.5 * n))
    np.testing.assert_array_equal(got[..., j].reshape(-1), expected)


def test_lowest_k_ties_match_reference():
  s = _tied((33, 17), 5)
  for k in (0, 1, 100, 300, s.size):
    got = np.asarray(jax.jit(jp.lowest_k)(s, k)).reshape(-1)
    np.testing.assert_array_equal(got, _reference_pruned(np.asarray(s).reshape(-1), k))


def _shifted_unless_masked(m, x):
  return jnp.where(m, x - 1.0, jnp.nan)


@pytest.mark.parametrize("jit", [False, True])
def test_elementwise_scores_select_exactly_what_their_values_select(jit):
  """``lowest_each`` given scores as ``Elementwise(fn, *operands)`` (computed inside the shared
  selection and the final passes) marks exactly what it marks given ``fn(*operands)``: leaves
  of one shape sharing a program, one alone of its shape, a 1-D leaf, many ties and NaNs."""
  from jaxprune._select import lowest_each
  from jaxprune._select.elementwise import Elementwise
  shapes = [(7, 9), (7, 9), (7, 9), (3, 5, 11), (300,)]
  xs = [_tied(s, seed=i) for i, s in enumerate(shapes)]
  ms = [jnp.asarray(np.random.default_rng(10 + i).random(s) < 0.8) for i, s in enumerate(shapes)]
  ks = [0, 17, 63, 80, 151]

  def lazy(xs, ms):
    return lowest_each([Elementwise(_shifted_unless_masked, m, x) for m, x in zip(ms, xs)], ks)

  run = jax.jit(lazy) if jit else lazy
  got = run(xs, ms)
  for x, m, k, g in zip(xs, ms, ks, got, strict=True):
    values = np.asarray(_shifted_unless_masked(m, x)).reshape(-1)
    np.testing.assert_array_equal(np.asarray(g).reshape(-1), _reference_pruned(values, k))


@pytest.mark.parametrize("k", [0, 40, 97, 200, 316])
def test_elementwise_scores_select_exactly_in_global_scope(k):
  """``lowest`` (one threshold over all arrays) given ``Elementwise`` scores marks exactly
  what it marks given their values: every pass, the tie-break included (whole leaves of one
  shape sharing it, a 1-D leaf with its own), computes them from the operands."""
  from jaxprune._select import lowest
  from jaxprune._select.elementwise import Elementwise
  shapes = [(7, 9), (7, 9), (5, 11), (60,)]
  xs = [_tied(s, seed=20 + i) for i, s in enumerate(shapes)]
  ms = [jnp.asarray(np.random.default_rng(30 + i).random(s) < 0.7) for i, s in enumerate(shapes)]
  got = jax.jit(lambda xs, ms: lowest(
      [Elementwise(_shifted_unless_masked, m, x) for m, x in zip(ms, xs)], k))(xs, ms)
  flat = np.concatenate([np.asarray(_shifted_unless_masked(m, x)).reshape(-1)
                         for m, x in zip(ms, xs)])
  np.testing.assert_array_equal(np.concatenate([np.asarray(g).reshape(-1) for g in got]),
                                _reference_pruned(flat, k))
