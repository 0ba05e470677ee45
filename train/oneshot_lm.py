"""One-shot pruning of the trained LM with calibration data: magnitude, Wanda and SparseGPT.

``python -m train.oneshot_lm --config train/configs/lm.py --workdir runs/lm`` loads the dense
checkpoint :mod:`train.lm` wrote in ``workdir`` (training it first if there is none), prunes the
kernels of every block (attention projections and MLP; not the embeddings, not the head, as
both papers do) at each of ``oneshot.sparsities`` with each of ``oneshot.methods``, and reports
validation bits per byte and perplexity with calibration and pruning wall times. Then it
fine-tunes each of ``recovery.targets`` with its masks held, with each of ``recovery.losses``
(cross-entropy, or distillation from the dense model), and reports how much of the gap to the
dense model each closes. Writes ``oneshot_lm.json`` and ``oneshot_lm.md`` to ``workdir``.

Calibration (as in both papers): ``oneshot.calibration_samples`` random windows of
``context`` bytes from the calibration split; with ``oneshot.sequential`` the blocks are pruned
one at a time, each calibrated on the outputs of the already pruned blocks before it
(:func:`jaxprune.sequential`).
"""
from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

import jaxprune as jp
from train import lm, lm_data

__all__ = ["block_kernels", "calibration_batches", "parse_sparsity", "prune_lm", "run"]

_BLOCK_KERNEL = re.compile(r"^blocks/\d+/.*kernel$")


def block_kernels(path: str, leaf) -> bool:
  """The leaves pruned: every kernel inside a block (not the embeddings or the head)."""
  return bool(_BLOCK_KERNEL.match(path)) and getattr(leaf, "ndim", 0) >= 2


def parse_sparsity(spec: str):
  """``"0.5"`` → ``(0.5, None)``; ``"2:4"`` → ``(0.5, jp.n_of_m(2, 4))``.

  Examples:
    >>> from train import oneshot_lm
    >>> oneshot_lm.parse_sparsity("0.7"), oneshot_lm.parse_sparsity("4:8")[0]
    ((0.7, None), 0.5)
  """
  spec = str(spec)
  if ":" in spec:
    n, m = (int(v) for v in spec.split(":"))
    st = jp.n_of_m(n, m)
    return st.sparsity, st
  s = float(spec)
  if not 0.0 <= s <= 1.0:
    raise ValueError(f"oneshot.sparsities: {spec!r} is not a fraction in [0, 1] or 'n:m'")
  return s, None


def calibration_batches(config: ml_collections.ConfigDict, data: lm_data.TextData) -> list:
  """The calibration windows, ``calibration_batch`` at a time (int32 ``(b, context)``)."""
  o = config.oneshot
  w = lm_data.calibration_windows(data.streams[config.calibration_split],
                                  config.model.context, o.calibration_samples, seed=config.seed)
  return [jnp.asarray(w[i:i + o.calibration_batch]) for i in range(0, len(w), o.calibration_batch)]


def block_functions(graphdef, params) -> tuple[Callable, Callable]:
  """``(block_fn, embed_fn)``: one block's ``(block_params, x) -> y`` (the same function for
  every block: their graphdefs are equal) and ``(params, tokens) -> first block's input``."""
  model = nnx.merge(graphdef, params)
  block_def, _ = lm.split(model.blocks[0])

  def block_fn(p, x):
    return nnx.merge(block_def, p)(x)

  def embed_fn(p, tokens):
    return nnx.merge(graphdef, p).embed_tokens(tokens)

  return block_fn, jax.jit(embed_fn)


_CACHE: dict = {}


def prune_lm(config: ml_collections.ConfigDict, graphdef, params, batches, method: str,
             spec: str):
  """Prunes the block kernels of ``params`` with ``method`` at ``spec``.

  Returns ``(params, masks, times)``, ``times = {"calibration_s", "pruning_s"}`` (wall time,
  compilation included: a one-shot method runs once). In sequential mode the calibration time
  includes running each pruned block on the calibration inputs.
  """
  o = config.oneshot
  sparsity, st = parse_sparsity(spec)
  if method == "magnitude":
    t0 = time.perf_counter()
    pruned, masks = jp.prune(params, sparsity, structure=st, where=block_kernels)
    jax.block_until_ready(pruned)
    return pruned, masks, {"calibration_s": 0.0, "pruning_s": time.perf_counter() - t0}
  if method not in ("wanda", "sparsegpt"):
    raise ValueError(f"oneshot.methods: unknown method {method!r}")
  fn = jp.wanda if method == "wanda" else jp.sparsegpt
  kwargs = {"structure": st}
  if method == "sparsegpt":
    kwargs.update(block_size=o.block_size, dampening=o.dampening)
  prune_s = [0.0]

  def timed(p, cal, s, **kw):
    jax.block_until_ready(cal)  # the calibration's own time stays out of the pruning time
    t = time.perf_counter()
    out = jax.block_until_ready(fn(p, cal, s, **kw))
    prune_s[0] += time.perf_counter() - t
    return out

  t0 = time.perf_counter()
  if o.sequential:
    key = (graphdef, "block")
    if key not in _CACHE:
      _CACHE[key] = block_functions(graphdef, params)
    block_fn, embed_fn = _CACHE[key]
    # laid out as the batches (data-parallel rows stay data-parallel)
    xs = [jax.device_put(embed_fn(params, b), b.sharding) for b in batches]
    blocks = [params["blocks"][i] for i in range(config.model.depth)]
    new_blocks, block_masks = jp.sequential(block_fn, blocks, xs, timed, sparsity,
                                            chunk_size=o.chunk_size, **kwargs)
    pruned = jax.tree.map(lambda x: x, params)
    masks = jax.tree.map(lambda x: jnp.ones((), bool), params)
    for i in range(config.model.depth):
      pruned["blocks"][i] = new_blocks[i]
      masks["blocks"][i] = block_masks[i]
  else:
    cal = jp.calibrate(lm.logits_fn(graphdef), params, batches, where=block_kernels,
                       chunk_size=o.chunk_size)
    pruned, masks = timed(params, cal, sparsity, where=block_kernels, **kwargs)
  jax.block_until_ready(pruned)
  total = time.perf_counter() - t0
  return pruned, masks, {"calibration_s": total - prune_s[0], "pruning_s": prune_s[0]}


def _fmt_table(rows, dense) -> str:
  lines = [f"dense: {dense['bits_per_byte']:.4f} bits/byte, perplexity {dense['perplexity']:.3f}",
           "", "| method | sparsity | bits/byte | perplexity | calibration | pruning |",
           "|---|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['sparsity']} | {r['bits_per_byte']:.4f} | "
                 f"{r['perplexity']:.3f} | {r['calibration_s']:.1f} s | {r['pruning_s']:.1f} s |")
  return "\n".join(lines)


def _fmt_recovery(rows) -> str:
  lines = ["| pruned model | fine-tune | before | after | dense | gap closed | dense, same "
           "fine-tune |", "|---|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['target']} | {r['loss']} | {r['before_bpb']:.4f} | {r['after_bpb']:.4f} | "
                 f"{r['dense_bpb']:.4f} | {100 * r['recovered']:.0f}% | "
                 f"{r['dense_finetuned_bpb']:.4f} |")
  return "\n".join(lines)


_print = functools.partial(print, flush=True)


def run(config: ml_collections.ConfigDict, workdir: str, *, log: Callable = _print,
        recovery: bool = True) -> dict:
  """The one-shot table (and recovery) for the checkpoint in ``workdir``; see the module doc."""
  workdir = os.path.abspath(workdir)
  ckpt = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt) or not os.listdir(ckpt):
    log(f"no checkpoint in {workdir}: training the dense LM first")
    lm.train(config, workdir, log=log)
  graphdef, params = lm.restore(config, workdir)
  data = lm.load_data(config)
  eval_w = lm_data.eval_windows(data.streams[config.eval_split], config.model.context,
                                config.eval_windows or None)
  batches = calibration_batches(config, data)
  evaluate = lambda p: lm.evaluate(graphdef, p, eval_w, config.eval_batch_size)
  dense = evaluate(params)
  log(f"dense: {dense['bits_per_byte']:.4f} bits/byte")
  rows, pruned_by = [], {}
  for spec in config.oneshot.sparsities:
    for method in config.oneshot.methods:
      pruned, masks, times = prune_lm(config, graphdef, params, batches, method, spec)
      m = evaluate(pruned)
      row = {"method": method, "sparsity": str(spec),
             "measured_sparsity": float(jp.sparsity(masks, where=block_kernels)), **m, **times}
      rows.append(row)
      pruned_by[f"{method}@{spec}"] = (pruned, masks)
      log(f"{method:9s} {spec:>4s}: {m['bits_per_byte']:.4f} bits/byte, perplexity "
          f"{m['perplexity']:.3f} (calibration {times['calibration_s']:.1f} s, pruning "
          f"{times['pruning_s']:.1f} s)")
  rec_rows = []
  if recovery:
    # Control: the dense model fine-tuned the same way (how much is just more training).
    ones = jax.tree.map(lambda x: jnp.ones((), bool), params)
    control, _ = lm.finetune(config, graphdef, params, ones, data, loss="ce")
    control_bpb = evaluate(control)["bits_per_byte"]
    log(f"recovery control: dense fine-tuned (ce) {control_bpb:.4f} bits/byte")
    for target in config.recovery.targets:
      if target not in pruned_by:
        method, spec = target.split("@")
        pruned_by[target] = prune_lm(config, graphdef, params, batches, method, spec)[:2]
      pruned, masks = pruned_by[target]
      before = evaluate(pruned)["bits_per_byte"]
      for loss in config.recovery.losses:
        t0 = time.perf_counter()
        tuned, losses = lm.finetune(config, graphdef, pruned, masks, data, loss=loss,
                                    teacher=params)
        after = evaluate(tuned)
        gap = before - dense["bits_per_byte"]
        rec = {"target": target, "loss": loss, "steps": config.recovery.steps,
               "before_bpb": before, "after_bpb": after["bits_per_byte"],
               "after_perplexity": after["perplexity"], "dense_bpb": dense["bits_per_byte"],
               "dense_finetuned_bpb": control_bpb,
               "recovered": (before - after["bits_per_byte"]) / gap if gap > 0 else float("nan"),
               "seconds": time.perf_counter() - t0, "losses": losses,
               "sparsity_kept": float(jp.sparsity(tuned, where=block_kernels))}
        rec_rows.append(rec)
        log(f"recovery {target} {loss}: {before:.4f} -> {after['bits_per_byte']:.4f} bits/byte "
            f"({100 * rec['recovered']:.0f}% of the gap)")
  out = {"dense": dense, "rows": rows, "recovery": rec_rows, "dataset": data.info,
         "eval_windows": int(len(eval_w)),
         "calibration_windows": config.oneshot.calibration_samples,
         "config": config.to_dict()}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "oneshot_lm.json"), "w") as f:
    json.dump(out, f, indent=1, default=str)
  with open(os.path.join(workdir, "oneshot_lm.md"), "w") as f:
    f.write(_fmt_table(rows, dense) + "\n\n" + _fmt_recovery(rec_rows) + "\n")
  return out


def main(argv=None) -> dict:
  from absl import app, flags, logging
  from ml_collections import config_flags

  flags.DEFINE_string("workdir", None, "Run directory holding the dense LM checkpoint.")
  config_flags.DEFINE_config_file("config", "train/configs/lm.py", "LM config file.",
                                  lock_config=True)
  flags.DEFINE_bool("recovery", True, "Fine-tune the recovery targets after the table.")
  flags.mark_flags_as_required(["workdir"])
  result = {}

  def go(args):
    del args
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
      logging.set_verbosity(logging.WARNING)
    result.update(run(flags.FLAGS.config, flags.FLAGS.workdir, recovery=flags.FLAGS.recovery))

  app.run(go, argv=argv)
  return result


if __name__ == "__main__":
  main()
