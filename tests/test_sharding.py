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
    "b": jax.random.normal(keys[1], (128, 32)),
    "c": jnp.zeros((16, 64)).at[:, :8].set(1.0),          # ties straddle thresholds
    "bias": jnp.ones(32),
}
specs = {"a": P(None, "x"), "b": P("x", None), "c": P(None, "x"), "bias": P()}
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
      for leaf in ("a", "b", "c"):
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
