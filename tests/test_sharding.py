"""Masks of sharded parameters: equal to the unsharded masks and sharded like their params.

Runs in a subprocess with 8 host CPU devices, for both ``AxisType.Auto`` and
``AxisType.Explicit`` meshes (``jax.make_mesh`` makes Explicit axes by default).
"""
from conftest import run_with_devices

CODE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import jaxprune as jp
assert jax.device_count() == 8
keys = jax.random.split(jax.random.key(0), 4)
params = {
    "a": jax.random.normal(keys[0], (64, 128)),
    "a2": jax.random.normal(keys[3], (64, 128)),  # with "a": one shared layerwise selection
    "b": jax.random.normal(keys[1], (128, 32)),
    "c": jnp.zeros((16, 64)).at[:, :8].set(1.0),          # ties straddle thresholds
    "bias": jnp.ones(32),
}
specs = {"a": P(None, "x"), "a2": P(None, "x"), "b": P("x", None), "c": P(None, "x"),
         "bias": P()}
ref = {
    "layer": jp.topk_mask(jp.magnitude_scores(params), 0.7),
    "global": jp.topk_mask(jp.magnitude_scores(params), 0.7, scope="global"),
    "ties": jp.topk_mask(jp.magnitude_scores(params), 0.95, scope="global"),
    "channels": jp.topk_mask(jp.magnitude_scores(params), 0.5, structure=jp.channels()),
}
for kind in (AxisType.Auto, AxisType.Explicit):
  mesh = jax.make_mesh((8,), ("x",), axis_types=(kind,))
  with jax.set_mesh(mesh):
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    fns = {
        "layer": lambda p: jp.topk_mask(jp.magnitude_scores(p), 0.7),
        "global": lambda p: jp.topk_mask(jp.magnitude_scores(p), 0.7, scope="global"),
        "ties": lambda p: jp.topk_mask(jp.magnitude_scores(p), 0.95, scope="global"),
        "channels": lambda p: jp.topk_mask(jp.magnitude_scores(p), 0.5,
                                           structure=jp.channels()),
    }
    for name, fn in fns.items():
      masks = jax.jit(fn)(sharded)
      for leaf in ("a", "a2", "b", "c"):
        np.testing.assert_array_equal(np.asarray(masks[leaf]), np.asarray(ref[name][leaf]))
        got = masks[leaf].sharding
        want = sharded[leaf].sharding
        assert got.is_equivalent_to(want, 2), (kind, name, leaf, got, want)
      pruned = jax.jit(jp.apply_masks)(sharded, masks)
      assert pruned["a"].sharding.is_equivalent_to(sharded["a"].sharding, 2)
  print("ok", kind)

# An Explicit mesh used without jax.set_mesh (shardings carried by the arrays alone).
mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
masks = jax.jit(lambda p: jp.topk_mask(jp.magnitude_scores(p), 0.95, scope="global"))(sharded)
for leaf in ("a", "b", "c"):
  np.testing.assert_array_equal(np.asarray(masks[leaf]), np.asarray(ref["ties"][leaf]))
print("ok no-context")
"""


def test_sharded_masks_equal_unsharded_and_keep_sharding():
  out = run_with_devices(CODE)
  assert "ok AxisType.Auto" in out and "ok AxisType.Explicit" in out, out
  assert "ok no-context" in out, out


CODE_COLLECTIVES = r"""
import re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import jaxprune as jp

def collectives(fn, *args):
  # Collectives of the compiled program, split into those reachable from a conditional's branches
  # (the tie-break, which runs for at most one leaf) and all others.
  txt = jax.jit(fn).lower(*args).compile().as_text()
  bodies, name = {}, None
  for line in txt.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line.rstrip())
    if m:
      name = m.group(1)
      bodies[name] = []
    elif name is not None:
      bodies[name].append(line)
  branches = set()
  for lines in bodies.values():
    for line in lines:
      for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
        branches.update(g.strip().lstrip("%") for g in group.split(","))
  todo = list(branches)
  while todo:   # everything the branches call, transitively
    for ref in re.findall(r"%([\w.\-]+)", "\n".join(bodies.get(todo.pop(), []))):
      if ref in bodies and ref not in branches:
        branches.add(ref)
        todo.append(ref)
  count = lambda c: sum(bool(re.search(r"= [^=]*? (all-gather|all-reduce|reduce-scatter|all-to-all"
                                       r"|collective-permute)(-start)?\(", ln))
                        for ln in bodies[c])
  loops = [m for c in bodies if c not in branches for ln in bodies[c]
           for m in re.findall(r" while\(.*body=%([\w.\-]+)", ln)]
  outside = sum(count(c) for c in bodies if c not in branches)
  return outside, [count(b) for b in loops]

mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
n = 8
keys = jax.random.split(jax.random.key(1), n)
params = {f"w{i:02d}": jax.random.normal(keys[i], (32, 64)) for i in range(n)}
params["w03"] = params["w03"].at[3:9].set(jnp.nan)
params["w05"] = jnp.zeros((32, 64)).at[:, :5].set(-0.25)    # ties straddle the threshold
params["w06"] = jnp.round(params["w06"] * 4) / 4
specs = [P(None, "x"), P("x", None), P(None, "y"), P(("x", "y"), None), P(), P("x", "y")]
shardings = {k: NamedSharding(mesh, specs[i % len(specs)]) for i, k in enumerate(params)}
sharded = {k: jax.device_put(v, shardings[k]) for k, v in params.items()}
with jax.set_mesh(mesh):
  for s in (0.3, 0.7, 0.5005, 1.0, 0.0):
    ref = jp.topk_mask(params, s, scope="global")
    fn = lambda p, s: jp.topk_mask(p, s, scope="global")
    masks = jax.jit(fn)(sharded, jnp.float32(s))     # traced sparsity: one compile
    for k in params:
      np.testing.assert_array_equal(np.asarray(masks[k]), np.asarray(ref[k]), err_msg=k)
      assert masks[k].sharding.is_equivalent_to(shardings[k], 2), (k, masks[k].sharding)
  bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), sharded)
  ref = jp.topk_mask(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), 0.6, scope="global")
  got = jax.jit(lambda p: jp.topk_mask(p, 0.6, scope="global"))(bf)
  for k in params:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), err_msg=k)
  vec = jax.device_put(params["w07"].ravel(), NamedSharding(mesh, P(("x", "y"))))
  np.testing.assert_array_equal(np.asarray(jax.jit(jp.lowest_k)(vec, 700)),
                                np.asarray(jp.lowest_k(params["w07"].ravel(), 700)))
  small = {k: sharded[k] for k in list(params)[:4]}
  outside_4, loops_4 = collectives(lambda p: jp.topk_mask(p, 0.5, scope="global"), small)
  outside_n, loops_n = collectives(lambda p: jp.topk_mask(p, 0.5, scope="global"), sharded)
print("outside", outside_4, outside_n, "loops", loops_4, loops_n)
# One psum per radix pass (the loop body) and the per-leaf counts: independent of n. (A third,
# the NaN count, is gone since the passes compare integer keys, where NaN is key 0.)
assert outside_4 == outside_n == 2 and loops_4 == loops_n == [1], (outside_n, loops_n)
print("ok collectives")
"""


def test_global_selection_has_one_collective_per_pass_and_equals_unsharded():
  out = run_with_devices(CODE_COLLECTIVES)
  assert "ok collectives" in out, out
