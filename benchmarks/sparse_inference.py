"""Benchmark 9 — compressed size on disk, and sparse inference against dense on CPU.

**Sizes.** The kernels of an MLP (1024→4096→1024, 8.4M weights) pruned by magnitude at
50/80/90/95/99% (unstructured, one count per leaf) and 2:4, in float32 and bfloat16:

* raw bytes of :func:`jaxprune.compress` (values + packed bitmask, gaps, or N:M indices, the
  cheapest per leaf) against the dense arrays;
* on disk: an orbax checkpoint (``train/checkpointing.py``, which zstd-compresses every array)
  of the compressed tree, of the dense tree with its zeros, and ``gzip -6`` of ``np.savez`` of
  the dense tree. Every size is checked: ``decompress`` of the saved tree equals
  ``apply_masks`` bit for bit.

**Speed.** Two models, float32, jitted, at batch 1 and 64:

* ``mlp``: ``relu(x @ W1 + b1) @ W2 + b2`` with the MLP above;
* ``block``: a pre-LayerNorm transformer block (d_model 512, 8 heads, MLP 2048, GELU) on
  sequences of 16 tokens, so batch 1 is 16 rows of every matmul and batch 64 is 1024 rows. All
  six kernels (q, k, v, out, fc1, fc2) are pruned.

Methods: ``dense`` (the masked kernels as dense arrays: the baseline), ``bcoo`` and ``bcsr``
(:func:`jaxprune.sparsify_for_inference` with ``min_sparsity=0``: ``x @ BCOO(W)``, and
``BCSR(Wᵀ) @ xᵀ`` through XLA:CPU's native CSR kernel), and for 2:4 ``nm_gather``: the compact
N:M form (kept values ``(in/2, out)`` plus their row indices) multiplied by gathering the rows
of ``x`` each kept weight needs (``x[:, idx] · values``, summed over the kept rows). Every
method's output is checked against dense (``max_abs_err``). Timing: ``common.interleaved``; a
method whose single call takes longer than ``--max-call-s`` (default 2 s) is timed once and
marked so, instead of being repeated.

Run: ``python -m benchmarks.sparse_inference [--quick]``.
"""
from __future__ import annotations

import functools
import gzip
import io
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune as jp
from benchmarks import common
from jaxprune.compress import Compressed, nbytes, size_summary

SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.99)
STRUCTURES = [(f"{s:g}", s, None) for s in SPARSITIES] + [("2:4", 0.5, jp.n_of_m(2, 4))]
BATCHES = (1, 64)
SIZES = {
    "full": {"mlp": (1024, 4096, 1024), "block": {"d": 512, "heads": 8, "mlp": 2048, "seq": 16}},
    "quick": {"mlp": (256, 1024, 256), "block": {"d": 128, "heads": 4, "mlp": 512, "seq": 8}},
    "tiny": {"mlp": (32, 64, 32), "block": {"d": 32, "heads": 2, "mlp": 64, "seq": 4}},
}


# ----------------------------------------------------------------------------- models

def mlp_params(sizes, key):
  k = jax.random.split(key, 2)
  d_in, d_h, d_out = sizes
  return {"fc1": {"kernel": jax.random.normal(k[0], (d_in, d_h)) / math.sqrt(d_in),
                  "bias": jnp.full((d_h,), 0.01)},
          "fc2": {"kernel": jax.random.normal(k[1], (d_h, d_out)) / math.sqrt(d_h),
                  "bias": jnp.zeros((d_out,))}}


def mlp_apply(p, x):
  h = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"][None])
  return h @ p["fc2"]["kernel"] + p["fc2"]["bias"][None]


def block_params(cfg, key):
  d, f = cfg["d"], cfg["mlp"]
  k = jax.random.split(key, 6)
  shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "fc1": (d, f), "fc2": (f, d)}
  p = {name: {"kernel": jax.random.normal(kk, s) / math.sqrt(s[0])}
       for kk, (name, s) in zip(k, shapes.items(), strict=True)}
  p["fc1"]["bias"] = jnp.zeros((f,))
  p["fc2"]["bias"] = jnp.zeros((d,))
  p["ln1"] = {"scale": jnp.ones((d,))}
  p["ln2"] = {"scale": jnp.ones((d,))}
  return p


def _ln(x, scale):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + 1e-6) * scale[None, None]


def block_apply(p, x, heads):
  b, t, d = x.shape
  rows = _ln(x, p["ln1"]["scale"]).reshape(b * t, d)
  split = lambda y: y.reshape(b, t, heads, d // heads)
  q, k, v = (split(rows @ p[n]["kernel"]) for n in ("q", "k", "v"))
  att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads), axis=-1)
  mix = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b * t, d)
  h = x + (mix @ p["o"]["kernel"]).reshape(b, t, d)
  rows = _ln(h, p["ln2"]["scale"]).reshape(b * t, d)
  y = jax.nn.gelu(rows @ p["fc1"]["kernel"] + p["fc1"]["bias"][None])
  return h + (y @ p["fc2"]["kernel"] + p["fc2"]["bias"][None]).reshape(b, t, d)


@jax.tree_util.register_pytree_node_class
class NMKernel:
  """A 2:4 (N:M) kernel in compact form: kept values ``(in·n/m, out)`` and their row indices;
  ``x @ k`` gathers the rows of ``x`` each kept weight multiplies."""

  def __init__(self, values, rows):
    self.values, self.rows = values, rows

  def tree_flatten(self):
    return (self.values, self.rows), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(*children)

  def __rmatmul__(self, x):
    return jnp.einsum("bjo,jo->bo", x[:, self.rows], self.values)


def nm_kernels(params, masks, m_group=4):
  """Every pruned kernel of an N:M mask as :class:`NMKernel`, from jp.compress's arrays."""
  small = jp.compress(params, masks, formats=("n_of_m",))
  def conv(node, mask):
    if not isinstance(node, Compressed):
      return jnp.asarray(node)
    mg = np.asarray(mask).reshape(node.shape[0] // m_group, m_group, node.shape[1])
    pos = np.argsort(~mg, axis=1, kind="stable")[:, :node.n, :]
    rows = (pos + m_group * np.arange(mg.shape[0])[:, None, None]).reshape(-1, node.shape[1])
    return NMKernel(jnp.asarray(node.arrays["values"]), jnp.asarray(rows.astype(np.int32)))
  return jax.tree.map(conv, small, masks, is_leaf=lambda x: isinstance(x, Compressed))


# ----------------------------------------------------------------------------- sizes

def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _bits(x):
  a = np.asarray(x)
  return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def size_rows(sizes, tmp, structures=STRUCTURES):
  from train import checkpointing
  base = mlp_params(sizes, jax.random.key(0))
  rows = []
  for dtype in ("float32", "bfloat16"):
    params = jax.tree.map(lambda x, dt=dtype: np.asarray(x.astype(dt)), base)
    for name, s, st in structures:
      masks = jp.topk_mask(jp.magnitude_scores(params), s, structure=st)
      dense = jax.tree.map(np.asarray, jp.apply_masks(params, masks))
      small = jp.compress(params, masks)
      tag = f"{dtype}-{name}"
      checkpointing.save_tree(os.path.join(tmp, f"c-{tag}"), small)
      checkpointing.save_tree(os.path.join(tmp, f"d-{tag}"), dense)
      back = jp.decompress(checkpointing.load_tree(os.path.join(tmp, f"c-{tag}")))
      exact = all(np.array_equal(_bits(a), _bits(b)) for a, b in
                  zip(jax.tree.leaves(back), jax.tree.leaves(dense), strict=True))
      buf = io.BytesIO()
      np.savez(buf, *jax.tree.leaves(dense))
      gz = len(gzip.compress(buf.getvalue(), compresslevel=6))
      kernels = [r for r in size_summary(small)
                 if r["path"].endswith("kernel")]
      raw_dense = sum(r["dense_bytes"] for r in kernels)
      raw_small = sum(r["stored_bytes"] for r in kernels)
      c_disk = _dir_bytes(os.path.join(tmp, f"c-{tag}"))
      d_disk = _dir_bytes(os.path.join(tmp, f"d-{tag}"))
      rows.append({
          "kind": "size", "dtype": dtype, "structure": name, "sparsity": s,
          "formats": sorted({r["format"] for r in kernels}),
          "kernel_dense_bytes": raw_dense, "kernel_compressed_bytes": raw_small,
          "kernel_ratio": raw_small / raw_dense,
          "tree_dense_bytes": nbytes(dense), "tree_compressed_bytes": nbytes(small),
          "disk_dense_orbax_bytes": d_disk, "disk_compressed_orbax_bytes": c_disk,
          "disk_ratio_vs_dense_orbax": c_disk / d_disk,
          "dense_npz_gzip_bytes": gz, "disk_ratio_vs_gzip": c_disk / gz,
          "round_trip_exact": exact,
      })
      common.log(f"size {tag}: kernels {raw_small / raw_dense:.3f}x, on disk "
                 f"{c_disk / d_disk:.3f}x dense orbax, {c_disk / gz:.3f}x gzip, exact={exact}")
  return rows


# ----------------------------------------------------------------------------- speed

def _methods(params, masks, structure_name):
  dense = jp.apply_masks(params, masks)
  out = {"dense": dense,
         "bcoo": jp.sparsify_for_inference(params, masks, min_sparsity=0.0, format="bcoo"),
         "bcsr": jp.sparsify_for_inference(params, masks, min_sparsity=0.0, format="bcsr")}
  if structure_name == "2:4":
    out["nm_gather"] = nm_kernels(params, masks)
  return out


def speed_rows(sizes, *, repeats, max_call_s, structures=STRUCTURES):
  rows = []
  models = {
      "mlp": (mlp_params(sizes["mlp"], jax.random.key(1)), mlp_apply,
              lambda b, key: jax.random.normal(key, (b, sizes["mlp"][0]))),
      "block": (block_params(sizes["block"], jax.random.key(2)),
                lambda p, x: block_apply(p, x, sizes["block"]["heads"]),
                lambda b, key: jax.random.normal(key, (b, sizes["block"]["seq"],
                                                       sizes["block"]["d"]))),
  }
  for model, (params, apply, make_x) in models.items():
    fwd = jax.jit(apply)
    for name, s, st in structures:
      masks = jp.topk_mask(jp.magnitude_scores(params), s, structure=st)
      trees = _methods(params, masks, name)
      for batch in BATCHES:
        x = make_x(batch, jax.random.key(3))
        compiled = {m: fwd.lower(t, x).compile() for m, t in trees.items()}
        fns = {m: functools.partial(compiled[m], trees[m], x) for m in trees}
        ref = np.asarray(fns["dense"]())
        scale = float(np.abs(ref).max())
        once, err = {}, {}
        for m, fn in fns.items():
          start = time.perf_counter()
          out = jax.block_until_ready(fn())
          if m != "dense" and time.perf_counter() - start > max_call_s:
            once[m] = time.perf_counter() - start
          err[m] = float(np.abs(np.asarray(out) - ref).max())
        timed = {m: fn for m, fn in fns.items() if m not in once}
        t = common.interleaved(timed, repeats=repeats, warmup=1)
        dense_s = t["dense"].median
        for m in fns:
          row = {"kind": "speed", "model": model, "structure": name, "sparsity": s,
                 "batch": batch, "method": m, "max_abs_err": err[m],
                 "output_scale": scale}
          if m in once:
            row.update({"timed": "once", "median_s": once[m], "ratio_vs_dense": once[m] / dense_s})
          else:
            row.update({"timed": "interleaved", **t[m].as_dict(),
                        "ratio_vs_dense": common.ratio(t, m, "dense")})
          assert err[m] <= 1e-4 * max(scale, 1.0), (model, name, batch, m, err[m])
          rows.append(row)
        common.log(f"{model} {name} batch {batch}: " + ", ".join(
            f"{r['method']} {r['ratio_vs_dense']:.2f}x" for r in rows[-len(fns):]))
  return rows


# ----------------------------------------------------------------------------- tables

def _size_table(rows):
  cols = [("dtype", "dtype", str), ("structure", "sparsity", str),
          ("formats", "format", lambda f: "+".join(f)),
          ("kernel_ratio", "kernels: compressed ÷ dense bytes", lambda x: f"{x:.3f}"),
          ("disk_dense_orbax_bytes", "dense+zeros, orbax (zstd)", common.fmt_bytes),
          ("dense_npz_gzip_bytes", "dense+zeros, npz + gzip", common.fmt_bytes),
          ("disk_compressed_orbax_bytes", "compressed, orbax", common.fmt_bytes),
          ("disk_ratio_vs_dense_orbax", "÷ dense orbax", lambda x: f"{x:.3f}"),
          ("disk_ratio_vs_gzip", "÷ gzip", lambda x: f"{x:.3f}")]
  return common.markdown_table(rows, cols)


def _speed_table(rows, model, structures=STRUCTURES):
  names = [n for n, _, _ in structures]
  out = []
  for batch in BATCHES:
    for method in ("bcoo", "bcsr", "nm_gather"):
      sel = {r["structure"]: r for r in rows if r["model"] == model and r["batch"] == batch
             and r["method"] == method}
      if not sel:
        continue
      row = {"batch": str(batch), "method": method}
      for n in names:
        if n in sel:
          r = sel[n]
          mark = "≥" if r["timed"] == "once" else ""
          row[n] = f"{mark}{r['ratio_vs_dense']:.2f}×" + (" **faster**" if
                                                          r["ratio_vs_dense"] < 1 else "")
      dense = [r for r in rows if r["model"] == model and r["batch"] == batch
               and r["method"] == "dense" and r["structure"] == names[0]]
      row["dense"] = common.fmt_seconds(dense[0]["median_s"]) if dense else None
      out.append(row)
  cols = [("batch", "batch", str), ("method", "method", str)] + [
      (n, n if ":" in n else f"{float(n):.0%}", str) for n in names] + [
      ("dense", "dense time (50% row)", str)]
  return common.markdown_table(out, cols)


def main(argv=None):
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--max-call-s", type=float, default=2.0,
                 help="a method whose one call takes longer is timed once, not repeated")
  p.add_argument("--sizes", choices=sorted(SIZES), default=None,
                 help="model sizes (default: quick with --quick, else full)")
  p.add_argument("--structures", nargs="+", choices=[n for n, _, _ in STRUCTURES],
                 default=None, help="sparsities / structures to run (default: all)")
  args = p.parse_args(argv)
  sizes = SIZES[args.sizes or ("quick" if args.quick else "full")]
  repeats = args.repeats or (5 if args.quick else 7)
  structures = [t for t in STRUCTURES if args.structures is None or t[0] in args.structures]
  with tempfile.TemporaryDirectory() as tmp:
    sizes_out = size_rows(sizes["mlp"], tmp, structures)
  speed = speed_rows(sizes, repeats=repeats, max_call_s=args.max_call_s, structures=structures)
  rows = sizes_out + speed
  block = sizes["block"]
  notes = [
      "Sizes: the MLP's two kernels (its biases pass through); 'kernels' is raw array bytes "
      "(what np.savez writes), the rest is on disk. orbax zstd-compresses every array, so its "
      "dense checkpoint already squeezes the zeros; the compressed one is smaller still, by "
      "less than the raw ratio says.",
      "Speed: ratio of the sparse forward pass to the dense one (<1: sparse is faster), median "
      "of paired per-round ratios; '≥' marks a method timed once because one call took over "
      f"{args.max_call_s:g} s.",
      f"block = pre-LN transformer block, d_model {block['d']}, {block['heads']} heads, MLP "
      f"{block['mlp']}, {block['seq']} tokens per sequence: batch 1 is {block['seq']} rows per "
      f"matmul, batch 64 is {64 * block['seq']}.",
      "bcoo = x @ BCOO(W) (gather + scatter-add per kept weight); bcsr = BCSR(Wᵀ) @ xᵀ through "
      "XLA:CPU's cpu_csr_sparse_dense_ffi; nm_gather = 2:4 values (in/2, out) times the rows of "
      "x they need (x[:, idx]), summed.",
  ]
  tables = ["### File sizes (MLP kernels " + "×".join(map(str, sizes["mlp"])) + ")",
            _size_table(sizes_out),
            "### Inference time ÷ dense: MLP " + "→".join(map(str, sizes["mlp"])),
            _speed_table(speed, "mlp", structures),
            f"### Inference time ÷ dense: transformer block (d {block['d']}, "
            f"{block['seq']} tokens)",
            _speed_table(speed, "block", structures)]
  config = {"quick": args.quick, "repeats": repeats, "sizes": sizes, "batches": BATCHES,
            "structures": [n for n, _, _ in structures], "max_call_s": args.max_call_s}
  common.write_results("sparse_inference", title="Compressed export and sparse inference",
                       rows=rows, tables=tables, config=config, notes=notes,
                       out_dir=args.out_dir)
  print("\n\n".join(tables))
  return rows


if __name__ == "__main__":
  main()
