"""Benchmark 9 — pruning at real model scale: compile time, run time and step overhead on trees
shaped like GPT-2 small (148 leaves, 124M params, 50 prunable), ViT-B/16 (200 leaves, 86M, 112
prunable) and ResNet-50 (161 leaves, 25.6M, 54 prunable), float32, random values.

Part 1, compile: process CPU seconds of ``jit(f).lower(...).compile()`` on abstract arrays, one
fresh process per measurement, for a plain ``optax.adam`` step (the baseline), the same step
chained with ``magnitude_pruning(0.9, update_every=100)`` (layerwise and global), RigL, and a
standalone ``topk_mask`` (global, layerwise); then the leaf-count sweep (10 / 50 / 150 [/ 500]
leaves of ~20M params in total) with the slope of CPU seconds per leaf.

Part 2, run time (one process, interleaved, see ``benchmarks/common.py``) on the GPT-2 tree at
``--width`` (1.0 is GPT-2 small): masks (global, layerwise) against the one-pass floor
(``|p| > c`` per leaf) and against concatenate + argsort; then training steps (``adam`` on given
gradients; params and optimizer state donated, as a training loop does) with and without a
mask update, for magnitude (layerwise, global, ERK, 2:4), RigL, SET and
:func:`jaxprune.keep_masks`, as ratios to the plain adam step.

Targets (issue 12): compile ≤ 1.5× the plain step, linear in leaves with a per-leaf cost ≤ 3×
adam's; masks ≤ 8× the floor; a mask-update step ≤ 3× plain (RigL/SET ≤ 4×); no-update steps
≤ 1.03× (magnitude) and ≤ 1.05× (RigL, SET); keep_masks ≤ 1.03×.

Run: ``python -m benchmarks.model_scale [--quick] [--leaves 10 50 150 500]``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common

SPARSITY = 0.9
NEVER = 10**9


# ----------------------------------------------------------------------------- trees


def _dense(d_in, d_out):
  return {"kernel": (d_in, d_out), "bias": (d_out,)}


def _ln(d):
  return {"scale": (d,), "bias": (d,)}


def gpt2_shapes(width: float = 1.0, layers: int = 12) -> dict:
  """GPT-2 small's leaf shapes (d_model 768·width): 12·layers + 4 leaves."""
  d, vocab = max(8, int(768 * width)), max(64, int(50257 * width))
  blocks = {f"h{i}": {"ln_1": _ln(d), "attn": {"c_attn": _dense(d, 3 * d),
                                               "c_proj": _dense(d, d)},
                      "ln_2": _ln(d), "mlp": {"c_fc": _dense(d, 4 * d),
                                              "c_proj": _dense(4 * d, d)}}
            for i in range(layers)}
  return {"wte": (vocab, d), "wpe": (max(16, int(1024 * width)), d), **blocks, "ln_f": _ln(d)}


def vit_shapes(width: float = 1.0, layers: int = 12) -> dict:
  """ViT-B/16's leaf shapes (16 per layer, 8 more)."""
  d = max(8, int(768 * width))
  h, hd = 12, max(1, d // 12)
  blocks = {f"block{i}": {
      "ln1": _ln(d),
      "attn": {"query": {"kernel": (d, h, hd), "bias": (h, hd)},
               "key": {"kernel": (d, h, hd), "bias": (h, hd)},
               "value": {"kernel": (d, h, hd), "bias": (h, hd)},
               "out": {"kernel": (h, hd, d), "bias": (d,)}},
      "ln2": _ln(d), "mlp": {"fc1": _dense(d, 4 * d), "fc2": _dense(4 * d, d)}}
      for i in range(layers)}
  return {"patch": {"kernel": (16, 16, 3, d), "bias": (d,)}, "cls": (1, 1, d),
          "pos": (1, 197, d), **blocks, "ln": _ln(d), "head": _dense(d, 1000)}


def resnet50_shapes(width: float = 1.0) -> dict:
  """ResNet-50's leaf shapes: 53 convolutions with batch norm, and the classifier."""
  c = lambda n: max(1, int(n * width))
  tree = {"stem": {"conv": {"kernel": (7, 7, 3, c(64))}, "bn": _ln(c(64))}}
  cin = c(64)
  for s, (blocks, w) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
    for b in range(blocks):
      blk = {"conv1": {"kernel": (1, 1, cin, c(w))}, "bn1": _ln(c(w)),
             "conv2": {"kernel": (3, 3, c(w), c(w))}, "bn2": _ln(c(w)),
             "conv3": {"kernel": (1, 1, c(w), c(4 * w))}, "bn3": _ln(c(4 * w))}
      if b == 0:
        blk["proj"] = {"kernel": (1, 1, cin, c(4 * w))}
        blk["proj_bn"] = _ln(c(4 * w))
      tree[f"stage{s}_block{b}"] = blk
      cin = c(4 * w)
  tree["fc"] = _dense(cin, 1000)
  return tree


def sweep_shapes(n_leaves: int, total: int = 20_000_000) -> dict:
  """``n_leaves`` kernels of ~``total / n_leaves`` params each (400 rows)."""
  cols = max(1, round(total / n_leaves / 400))
  return {f"w{i:03d}": (400, cols) for i in range(n_leaves)}


TREES = {"gpt2": gpt2_shapes, "vit_b16": vit_shapes, "resnet50": resnet50_shapes}


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def abstract(shapes: dict):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=_is_shape)


def concrete(shapes: dict, seed: int = 0):
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, s, jnp.float32)
                                      for k, s in zip(keys, leaves)])


def tree_stats(shapes: dict) -> dict:
  import jaxprune as jp
  leaves = jax.tree.leaves(abstract(shapes))
  prunable = [x for x in leaves if jp.tree.default_where("", x)]
  return {"leaves": len(leaves), "params": sum(math.prod(x.shape) for x in leaves),
          "prunable": len(prunable)}


# ----------------------------------------------------------------------------- functions timed


def step_transforms() -> dict:
  """name -> GradientTransformation of every step variant (adam(1e-3) inside)."""
  import jaxprune as jp
  adam = lambda: optax.adam(1e-3)
  return {
      "plain": adam(),
      "keep_masks": optax.chain(adam(), jp.keep_masks(
          lambda p: jp.topk_mask(jp.magnitude_scores(p), SPARSITY))),
      "magnitude, no update": optax.chain(adam(), jp.magnitude_pruning(SPARSITY,
                                                                       update_every=NEVER)),
      "magnitude, update": optax.chain(adam(), jp.magnitude_pruning(SPARSITY, update_every=1)),
      "magnitude global, update": optax.chain(adam(), jp.magnitude_pruning(
          SPARSITY, update_every=1, scope="global")),
      "magnitude ERK, update": optax.chain(adam(), jp.magnitude_pruning(
          SPARSITY, update_every=1, distribution="erk")),
      "magnitude 2:4, update": optax.chain(adam(), jp.magnitude_pruning(
          0.5, update_every=1, structure=jp.n_of_m(2, 4), where=_n_of_m_where)),
      "rigl, no update": jp.rigl(adam(), sparsity=SPARSITY, update_every=NEVER, end_step=NEVER),
      "rigl, update": jp.rigl(adam(), sparsity=SPARSITY, update_every=1, end_step=NEVER),
      "set, no update": jp.set_training(adam(), sparsity=SPARSITY, update_every=NEVER,
                                        end_step=NEVER),
      "set, update": jp.set_training(adam(), sparsity=SPARSITY, update_every=1, end_step=NEVER),
  }


def _n_of_m_where(path, leaf):
  import jaxprune as jp
  return jp.tree.default_where(path, leaf) and leaf.shape[-2] % 4 == 0


def _step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def mask_fns() -> dict:
  import jaxprune as jp
  return {
      "floor": lambda p: jax.tree.map(lambda x: jnp.abs(x) > 0.5 if x.ndim >= 2 else True, p),
      "jaxprune global": lambda p: jp.topk_mask(jp.magnitude_scores(p), SPARSITY,
                                                scope="global"),
      "jaxprune layerwise": lambda p: jp.topk_mask(jp.magnitude_scores(p), SPARSITY),
      "concat + argsort": _argsort_global,
  }


def _argsort_global(p):
  leaves = [x for x in jax.tree.leaves(p) if x.ndim >= 2]
  flat = jnp.concatenate([jnp.abs(x).ravel() for x in leaves])
  order = jnp.argsort(flat)
  n = flat.size
  keep = jnp.zeros((n,), bool).at[order[round(SPARSITY * n):]].set(True)
  out, start = [], 0
  for x in leaves:
    out.append(keep[start:start + x.size].reshape(x.shape))
    start += x.size
  return out


# ----------------------------------------------------------------------------- part 1: compile


def _compile_cpu_seconds(shapes: dict, variant: str) -> float:
  """Process CPU seconds of lower + compile of ``variant`` on abstract ``shapes``."""
  params = abstract(shapes)
  if variant.startswith("topk "):
    fn = mask_fns()["jaxprune " + variant[5:]]
    args = (params,)
  else:
    tx = step_transforms()[variant]
    state = jax.eval_shape(tx.init, params)
    fn, args = _step(tx), (params, state, params)
  start = time.process_time()
  jax.jit(fn).lower(*args).compile()
  return time.process_time() - start


def child_compile(spec: str) -> None:
  """Entry point of a fresh process: prints ``{"cpu_s": ...}`` for ``tree:arg:variant``."""
  kind, arg, variant = spec.split(":", 2)
  shapes = sweep_shapes(int(arg)) if kind == "sweep" else TREES[kind](float(arg))
  print(json.dumps({"cpu_s": _compile_cpu_seconds(shapes, variant)}))


def compile_in_fresh_process(spec: str) -> float | None:
  out = subprocess.run([sys.executable, "-m", "benchmarks.model_scale", "--child-compile", spec],
                       capture_output=True, text=True, env=dict(os.environ), check=False)
  if out.returncode != 0:
    common.log(f"  {spec}: failed\n{out.stderr[-2000:]}")
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])["cpu_s"]


COMPILE_VARIANTS = ["plain", "magnitude, update", "magnitude global, update", "rigl, update",
                    "topk global", "topk layerwise"]
SWEEP_VARIANTS = ["plain", "magnitude, update", "topk global", "topk layerwise"]


def part_compile(trees, width, leaves, variants, sweep_variants):
  rows = []
  for name in trees:
    stats = tree_stats(TREES[name](width))
    base = None
    for v in variants:
      cpu = compile_in_fresh_process(f"{name}:{width}:{v}")
      base = cpu if v == "plain" else base
      row = {"part": "compile", "tree": name, **stats, "variant": v, "cpu_s": cpu,
             "vs_plain": cpu / base if cpu and base else None}
      common.log(f"compile {name} {v}: {cpu}")
      rows.append(row)
  slopes = {}
  for v in sweep_variants:
    xs, ys = [], []
    for n in leaves:
      cpu = compile_in_fresh_process(f"sweep:{n}:{v}")
      common.log(f"compile sweep {n} {v}: {cpu}")
      rows.append({"part": "sweep", "tree": f"{n} leaves", "leaves": n, "variant": v,
                   "cpu_s": cpu})
      if cpu is not None:
        xs.append(n)
        ys.append(cpu)
    if len(xs) >= 2:
      slopes[v] = float(np.polyfit(xs, ys, 1)[0])
  return rows, slopes


# ----------------------------------------------------------------------------- part 2: run time


def part_run(width, layers, repeats):
  import jaxprune as jp
  shapes = gpt2_shapes(width, layers)
  stats = tree_stats(shapes)
  params = concrete(shapes)
  rows = []
  fns = {n: jax.jit(f) for n, f in mask_fns().items()}
  for f in fns.values():
    jax.block_until_ready(f(params))
  t = common.interleaved({n: (lambda f=f: f(params)) for n, f in fns.items()}, repeats=repeats)
  ref = jp.topk_mask(jp.magnitude_scores(params), SPARSITY, scope="global")
  naive = fns["concat + argsort"](params)
  ref_leaves = [m for m in jax.tree.leaves(ref) if np.ndim(m)]
  equal = all(np.array_equal(a, b) for a, b in zip(ref_leaves, naive, strict=True))
  for n in fns:
    rows.append({"part": "masks", "tree": "gpt2", "width": width, **stats, "variant": n,
                 **t[n].as_dict(), "vs_floor": common.ratio(t, n, "floor"),
                 "speedup_vs_argsort": common.ratio(t, "concat + argsort", n),
                 "masks_equal_argsort": equal if n == "jaxprune global" else None})
  del fns
  grads = jax.tree.map(lambda x: 1e-3 * jnp.sign(x), params)
  largest_leaf = max(x.nbytes for x in jax.tree.leaves(params))
  runners, temps = {}, {}
  for name, tx in step_transforms().items():
    # params and state donated, as a training loop does (each variant has its own copy)
    holder = {"p": jax.tree.map(jnp.copy, params), "s": tx.init(params)}
    step = jax.jit(_step(tx), donate_argnums=(0, 1)).lower(
        holder["p"], holder["s"], grads).compile()
    temps[name] = step.memory_analysis().temp_size_in_bytes

    def call(step=step, holder=holder):
      holder["p"], holder["s"] = step(holder["p"], holder["s"], grads)
      return holder["p"]
    jax.block_until_ready(call())  # compile, and step 0 (which updates every mask)
    runners[name] = call
    common.log(f"step {name}: compiled")
  t = common.interleaved(runners, repeats=repeats)
  for n in runners:
    rows.append({"part": "step", "tree": "gpt2", "width": width, **stats, "variant": n,
                 **t[n].as_dict(), "vs_plain": common.ratio(t, n, "plain"),
                 "temp_bytes": temps[n], "temp_vs_largest_leaf": temps[n] / largest_leaf})
  return rows


# ----------------------------------------------------------------------------- main


def main(argv=None):
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--child-compile", default=None, help=argparse_hidden())
  p.add_argument("--leaves", type=int, nargs="*", default=None)
  p.add_argument("--width", type=float, default=None,
                 help="GPT-2 width for the run-time part (1.0: GPT-2 small)")
  p.add_argument("--skip-compile", action="store_true")
  p.add_argument("--skip-run", action="store_true")
  args = p.parse_args(argv)
  if args.child_compile:
    child_compile(args.child_compile)
    return None
  quick = args.quick
  repeats = args.repeats or (5 if quick else 7)
  leaves = args.leaves or ([5, 10, 20] if quick else [10, 50, 150])
  trees = ["gpt2"] if quick else list(TREES)
  compile_width = 0.125 if quick else 1.0
  variants = ["plain", "magnitude, update", "topk global"] if quick else COMPILE_VARIANTS
  sweep_variants = ["plain", "topk global"] if quick else SWEEP_VARIANTS
  width = args.width or (0.125 if quick else 0.5)
  layers = 2 if quick else 12
  rows, slopes = [], {}
  if not args.skip_compile:
    rows, slopes = part_compile(trees, compile_width, leaves, variants, sweep_variants)
  if not args.skip_run:
    rows += part_run(width, layers, repeats)
  fmt_s = lambda x: f"{x:.2f} s"
  tables = []
  comp = [r for r in rows if r["part"] == "compile"]
  if comp:
    tables.append("Compile (process CPU s, fresh process each):\n\n" + common.markdown_table(
        comp, [("tree", "tree", str), ("leaves", "leaves", str), ("prunable", "prunable", str),
               ("variant", "function", str), ("cpu_s", "compile CPU", fmt_s),
               ("vs_plain", "vs adam step", common.fmt_ratio)]))
  sw = [r for r in rows if r["part"] == "sweep"]
  if sw:
    tables.append("Leaf-count sweep (~20M params in total; compile CPU s):\n\n"
                  + common.markdown_table(sw, [("leaves", "leaves", str),
                                               ("variant", "function", str),
                                               ("cpu_s", "compile CPU", fmt_s)])
                  + "\n\nSlope (CPU s per leaf): " + ", ".join(
                      f"{k} {v:.3f}" for k, v in slopes.items()))
  if any(r["part"] == "masks" for r in rows):
    tables += _run_tables(rows, width)
  config = {"quick": quick, "repeats": repeats, "leaves": leaves, "trees": trees,
            "compile_width": compile_width, "run_width": width, "run_layers": layers,
            "sparsity": SPARSITY}
  notes = ["Compile: CPU seconds of the process (all threads), so load from other processes "
           "inflates wall time but much less the CPU count; run-time ratios are medians of "
           "paired, interleaved rounds."]
  common.write_results("model_scale", title="Pruning at model scale", rows=rows, tables=tables,
                       config=config, notes=notes, out_dir=args.out_dir,
                       extra={"sweep_slopes_cpu_s_per_leaf": slopes})
  print("\n\n".join(tables))
  return rows


def _run_tables(rows, width):
  masks = common.markdown_table(
      [r for r in rows if r["part"] == "masks"],
      [("variant", "method", str), ("median_s", "median", common.fmt_seconds),
       ("vs_floor", "vs floor", common.fmt_ratio),
       ("speedup_vs_argsort", "argsort / this", common.fmt_ratio)])
  steps = common.markdown_table(
      [r for r in rows if r["part"] == "step"],
      [("variant", "step", str), ("median_s", "median", common.fmt_seconds),
       ("vs_plain", "vs plain", common.fmt_ratio),
       ("temp_bytes", "compiled temp", lambda b: f"{b / 1e6:.1f} MB"),
       ("temp_vs_largest_leaf", "temp / largest leaf", lambda r: f"{r:.2f}")])
  return [f"Masks (GPT-2 tree, width {width}):\n\n{masks}",
          f"Training steps (adam on given gradients, GPT-2 tree):\n\n{steps}"]


def argparse_hidden():
  import argparse
  return argparse.SUPPRESS


if __name__ == "__main__":
  main()
