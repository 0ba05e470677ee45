"""Benchmark 9 — one-shot pruning of a trained byte-level LM with calibration data: magnitude,
Wanda and SparseGPT at 50%, 60%, 70%, 2:4 and 4:8, then a short masked fine-tune.

The model is :class:`train.models.DecoderLM` trained by :mod:`train.lm` with
``train/configs/lm.py`` (4 pre-LN blocks, width 256, context 256, 3.4M parameters) on the
offline ``python_stdlib`` corpus (:mod:`train.text_builder`); the checkpoint is reused from
``--workdir`` when it is there. :func:`train.oneshot_lm.run` prunes every block kernel (not the
embeddings or the head) sequentially, block by block, each block calibrated on the outputs of
the already pruned ones (128 random calibration windows of 256 bytes, as both papers), and
reports validation bits per byte and (byte-level) perplexity; wall times include compiling
(a one-shot method runs once), and a second, warm run of each method is timed as well.

Memory: XLA's own accounting (``compiled.memory_analysis()``: arguments + outputs + temporaries)
of the programs each method runs on one block: the per-batch calibration program (with
``oneshot.chunk_size``, the larger of its two: the per-chunk statistics, and their ordered sum)
and the pruning program (Wanda's or SparseGPT's, jitted for one block), and the calibration
activations the sequential mode holds.

Sharding: in a child process with 8 host CPU devices, Wanda and SparseGPT run again with the
calibration batches split over an 8-way data-parallel mesh (params
replicated; an ``Auto`` axis: XLA partitions the programs) and on one device in the same
process; the masks must be identical, and the ratio
of the warm wall times is reported (8 host devices share the same 2 cores here, so this ratio
measures overhead, not a speed-up).

Run: ``python -m benchmarks.oneshot_lm [--quick] [--workdir runs/oneshot_lm]``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import jax

import jaxprune as jp
from benchmarks import common
from train import lm, oneshot_lm
from train.configs import lm as lm_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = ("Published pattern (Wanda's README, LLaMA-2-7B, WikiText perplexity, dense 5.12): "
             "50% unstructured magnitude 14.89, SparseGPT 6.51, Wanda 6.42; 2:4 magnitude "
             "54.59, SparseGPT 10.17, Wanda 11.02.")


def make_config(quick: bool, data_dir: str | None):
  c = lm_config.get_config()
  if quick:
    c.model.update(dict(context=16, dim=16, depth=1, num_heads=2, mlp_ratio=1))
    c.num_steps, c.batch_size, c.log_every, c.eval_every, c.checkpoint_every = 20, 8, 10, 20, 20
    c.eval_windows, c.eval_batch_size = 16, 8
    o = c.oneshot
    o.calibration_samples, o.calibration_batch, o.sparsities = 16, 8, ("2:4",)
    o.chunk_size = 1  # 8 windows a batch: one per device of the 8-device check
    # ce: the same fine-tune step as the dense control (one program less to compile)
    c.recovery.steps, c.recovery.targets, c.recovery.losses = 2, ("sparsegpt@2:4",), ("ce",)
  if data_dir:
    c.data_dir = data_dir
  return c


def _block_programs(config, graphdef, params, batches, method, spec):
  """Compiled memory of the calibration program and of the pruning program of block 0."""
  sparsity, st = oneshot_lm.parse_sparsity(spec)
  block_fn, embed_fn = oneshot_lm.block_functions(graphdef, params)
  block = params["blocks"][0]
  x = embed_fn(params, batches[0])
  from jaxprune.calibration import collect
  chunk_size = config.oneshot.chunk_size
  lowered = collect.programs_for(block_fn, None, chunk_size)[0].lower_all(block, x)
  mems = [common.memory_of(low.compile()) for low in lowered]
  cal_mem = max(mems, key=lambda m: _total(m) or 0)
  cal = jp.calibrate(block_fn, block, [embed_fn(params, b) for b in batches],
                     chunk_size=chunk_size)
  fn = jp.wanda if method == "wanda" else jp.sparsegpt
  kw = {"structure": st}
  if method == "sparsegpt":
    kw.update(block_size=config.oneshot.block_size, dampening=config.oneshot.dampening)
  prune_mem = common.memory_of(jax.jit(lambda p, c: fn(p, c, sparsity, **kw)).lower(
      block, cal).compile())
  gram_bytes = sum(g.size * 4 for g in cal.grams.values())
  return cal_mem, prune_mem, gram_bytes


def _total(mem):
  if not mem:
    return None
  return (mem.get("argument_bytes", 0) + mem.get("output_bytes", 0) + mem.get("temp_bytes", 0)
          - mem.get("alias_bytes", 0))


_SHARDED = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import jaxprune as jp
from train import lm, oneshot_lm
from benchmarks import oneshot_lm as bench
config = bench.make_config({quick}, {data_dir!r})
graphdef, params = lm.restore(config, {workdir!r})
data = lm.load_data(config)
batches = oneshot_lm.calibration_batches(config, data)
mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
out = []
for method, spec in {cases!r}:
  runs = {{}}
  for name in ("1", "8", "1", "8"):
    if name == "8":
      with jax.set_mesh(mesh):
        p = jax.device_put(params, NamedSharding(mesh, P()))
        bs = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batches]
        t = time.perf_counter()
        _, masks, times = oneshot_lm.prune_lm(config, graphdef, p, bs, method, spec)
        jax.block_until_ready(masks)
    else:
      t = time.perf_counter()
      _, masks, times = oneshot_lm.prune_lm(config, graphdef, params, batches, method, spec)
      jax.block_until_ready(masks)
    runs[name] = (time.perf_counter() - t, masks)
  m1, m8 = runs["1"][1], runs["8"][1]
  equal = all(bool(np.array_equal(np.asarray(a), np.asarray(b)))
              for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m8)))
  out.append(dict(method=method, sparsity=spec, masks_equal=equal, seconds_1=runs["1"][0],
                  seconds_8=runs["8"][0], ratio=runs["8"][0] / runs["1"][0]))
# Collectives in the per-batch calibration program of one block on the 8-device mesh.
from jaxprune.calibration import collect
block_fn, embed_fn = oneshot_lm.block_functions(graphdef, params)
with jax.set_mesh(mesh):
  p = jax.device_put(params, NamedSharding(mesh, P()))
  x = jax.device_put(embed_fn(p, batches[0]), NamedSharding(mesh, P("data")))
  chunk_size = config.oneshot.chunk_size
  lowered = collect.programs_for(block_fn, None, chunk_size)[0].lower_all(p["blocks"][0], x)
  hlo = [low.compile().as_text() for low in lowered]
collectives = {{name: sum(h.count(name + "(") + h.count(name + "-start(") for h in hlo)
               for name in ("all-reduce", "all-gather", "all-to-all", "collective-permute")}}
print("SHARDED " + json.dumps({{"cases": out, "chunk_size": chunk_size,
                                "calibration_collectives_per_batch": collectives}}))
"""


def sharded_check(quick: bool, workdir: str, data_dir: str | None) -> list[dict]:
  """Wanda and SparseGPT on 8 host devices vs 1 in a child process (warm second runs)."""
  cases = [("sparsegpt", "2:4")] if quick else [
      ("wanda", "0.5"), ("sparsegpt", "0.5"), ("wanda", "2:4"), ("sparsegpt", "2:4")]
  code = _SHARDED.format(quick=quick, data_dir=data_dir, workdir=workdir, cases=cases)
  # --quick (a smoke test) keeps the caller's XLA flags, e.g. a test suite's faster compiles.
  flags = ((os.environ.get("XLA_FLAGS", "") + " " if quick else "")
           + "--xla_force_host_platform_device_count=8")
  env = dict(os.environ, XLA_FLAGS=flags,
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=3600)
  if proc.returncode:
    raise RuntimeError(f"sharded check failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SHARDED ")][-1]
  return json.loads(line[len("SHARDED "):])


def _sharded_table(sharded: dict) -> str:
  lines = ["| method | sparsity | masks 8 devices == 1 device | time 1 device | 8 devices | "
           "ratio |", "|---|---|---|---:|---:|---:|"]
  for r in sharded["cases"]:
    lines.append(f"| {r['method']} | {r['sparsity']} | {'yes' if r['masks_equal'] else 'NO'} | "
                 f"{common.fmt_seconds(r['seconds_1'])} | {common.fmt_seconds(r['seconds_8'])} "
                 f"| {common.fmt_ratio(r['ratio'])} |")
  found = {k: v for k, v in sharded["calibration_collectives_per_batch"].items() if v}
  how = (f"in chunks of {sharded['chunk_size']} windows, per-chunk matrices gathered and summed "
         "in chunk order" if sharded["chunk_size"] else "a batch at once")
  lines += ["", f"Calibration ({how}): collectives per batch of one block on 8 devices "
            f"(6 Gram matrices): {', '.join(f'{v} {k}' for k, v in found.items()) or 'none'}."]
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--workdir", default=None,
                 help="run directory of the dense LM (default runs/oneshot_lm, or a temporary "
                      "one with --quick); trained there if it has no checkpoint")
  p.add_argument("--data-dir", default=None, help="TFDS data directory")
  args = p.parse_args(argv)
  workdir = os.path.abspath(args.workdir) if args.workdir else (tempfile.mkdtemp() if args.quick
                             else os.path.join(ROOT, "runs", "oneshot_lm"))
  config = make_config(args.quick, args.data_dir)
  machine = common.machine_info()
  t0 = time.perf_counter()
  result = oneshot_lm.run(config, workdir, log=common.log)
  with open(os.path.join(workdir, "lm_train.json")) as f:
    trained = json.load(f)
  graphdef, params = lm.restore(config, workdir)
  data = lm.load_data(config)
  batches = oneshot_lm.calibration_batches(config, data)

  # Warm wall times (every program compiled by the first run) and compiled memory per block.
  mem = {}
  for row in result["rows"]:
    _, _, warm = oneshot_lm.prune_lm(config, graphdef, params, batches, row["method"],
                                     row["sparsity"])
    row["calibration_warm_s"], row["pruning_warm_s"] = warm["calibration_s"], warm["pruning_s"]
    kind = "nm" if ":" in row["sparsity"] else "unstructured"
    if row["method"] != "magnitude" and (row["method"], kind) not in mem:
      mem[(row["method"], kind)] = _block_programs(config, graphdef, params, batches,
                                                   row["method"], row["sparsity"])
    if row["method"] == "magnitude":
      s, st = oneshot_lm.parse_sparsity(row["sparsity"])
      compiled = jax.jit(lambda q, s=s, st=st: jp.prune(q, s, structure=st,
                                                        where=oneshot_lm.block_kernels)).lower(
          params).compile()
      row["calibration_mem_bytes"], row["pruning_mem_bytes"] = 0, _total(common.memory_of(
          compiled))
    else:
      cal_mem, prune_mem, gram_bytes = mem[(row["method"], kind)]
      row["calibration_mem_bytes"] = _total(cal_mem)
      row["pruning_mem_bytes"] = _total(prune_mem)
      row["gram_bytes_per_block"] = gram_bytes
  d = config.model
  held = 2 * config.oneshot.calibration_samples * d.context * d.dim * 4
  sharded = sharded_check(args.quick, workdir, config.data_dir)
  dense = result["dense"]

  lines = [f"Dense: **{dense['bits_per_byte']:.4f} bits/byte**, perplexity "
           f"{dense['perplexity']:.3f} (validation, {result['eval_windows']} windows of "
           f"{d.context + 1} bytes).", "",
           "| method | sparsity | bits/byte | perplexity | calibration: first / warm | "
           "pruning: first / warm | memory: calibration / pruning (one block) |",
           "|---|---|---:|---:|---:|---:|---:|"]
  for r in result["rows"]:
    cal = (f"{common.fmt_seconds(r['calibration_s'])} / "
           f"{common.fmt_seconds(r['calibration_warm_s'])}" if r["method"] != "magnitude"
           else "-")
    mem_cell = (f"{common.fmt_bytes(r['calibration_mem_bytes'])} / "
                f"{common.fmt_bytes(r['pruning_mem_bytes'])}" if r["method"] != "magnitude"
                else f"- / {common.fmt_bytes(r['pruning_mem_bytes'])} (whole model)")
    lines.append(f"| {r['method']} | {r['sparsity']} | {r['bits_per_byte']:.4f} | "
                 f"{r['perplexity']:.3f} | {cal} | {common.fmt_seconds(r['pruning_s'])} / "
                 f"{common.fmt_seconds(r['pruning_warm_s'])} | {mem_cell} |")
  table = "\n".join(lines)
  rec = ["| pruned model | fine-tune | bits/byte before | after | dense | gap closed | "
         "dense, same fine-tune |", "|---|---|---:|---:|---:|---:|---:|"]
  for r in result["recovery"]:
    rec.append(f"| {r['target']} | {'cross-entropy' if r['loss'] == 'ce' else 'distillation (KL)'}"
               f" | {r['before_bpb']:.4f} | {r['after_bpb']:.4f} | {r['dense_bpb']:.4f} | "
               f"{100 * r['recovered']:.0f}% | {r['dense_finetuned_bpb']:.4f} |")
  notes = [
      f"Dense LM: {trained['params']:,} parameters, {trained['steps']} steps of "
      f"{config.batch_size}×{d.context} bytes ({trained['tokens_seen']:,} bytes seen) in "
      f"{trained['train_seconds']:.0f} s on this machine; dataset {trained['dataset']['name']} "
      f"config {trained['dataset']['config']} (sha256 "
      f"{trained['dataset'].get('corpus', {}).get('sha256', '?')[:16]}…).",
      "Pruned: every kernel of every block (attention q/k/v/out, MLP in/out); the embeddings "
      "and the head stay dense, as in both papers. Sequential: blocks in order, each "
      f"calibrated on the pruned earlier blocks' outputs; {config.oneshot.calibration_samples} "
      f"calibration windows of {d.context} bytes; SparseGPT block size "
      f"{config.oneshot.block_size}, dampening {config.oneshot.dampening}.",
      "Wanda at 50-70% compares within each output (every output loses exactly round(s·n_in) "
      "inputs); magnitude and SparseGPT lose exactly round(s·n) per kernel.",
      "Times: first = with compilation (what a one-shot run pays), warm = the same call again. "
      "Calibration time in sequential mode includes running each pruned block on the "
      "calibration inputs.",
      f"Memory: XLA's accounting of one block's programs; the sequential mode also holds the "
      f"calibration activations at one depth twice: {common.fmt_bytes(held)}.",
      PUBLISHED,
  ]
  common.write_results(
      "oneshot_lm", title="One-shot pruning of a byte-level LM: magnitude, Wanda, SparseGPT",
      rows=result["rows"], tables=[table, "Recovery (masks held):\n\n" + "\n".join(rec),
                                   "Sharded calibration and pruning, 8 host devices vs 1:\n\n"
                                   + _sharded_table(sharded)],
      config={"quick": args.quick, "workdir": workdir, "lm": config.to_dict()},
      notes=notes, out_dir=args.out_dir, machine=machine,
      extra={"dense": dense, "recovery": result["recovery"], "sharded": sharded,
             "lm_train": trained, "seconds": time.perf_counter() - t0})
  common.log(table)
  return result["rows"]


if __name__ == "__main__":
  main()
