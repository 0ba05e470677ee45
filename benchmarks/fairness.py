"""What pruning costs the minority: MNIST-1D made unbalanced on purpose, dense vs 90% pruned vs
90% pruned + constrained fine-tuning, over seeds.

Setup (see :mod:`train.fairness`): classes 0, 1, 2 keep a tenth of their training examples
(about 40 each, against about 400 for every other class); the test split stays balanced (about
100 per class). Per seed, one dense CNN (the MNIST-1D paper's, with BatchNorm; its first conv,
160 weights, is left dense) is trained; from it, gradual magnitude pruning to 90% of every other
kernel; from that pruned state, two fine-tunings with the same optimizer, steps and batches:
plain cross-entropy (**pruned**) and per-class loss constraints ``L_c − L ≤ ε`` with Lagrange
multipliers updated by dual ascent (**pruned+mitigation**).

Reported per arm, mean ± std over seeds: overall, minority- and majority-class accuracy, their
drops vs the dense model of the same seed, the worst-class drop, the gap between the most- and
least-hurt classes, the excess test loss of minority and majority classes, and the number of
pruning-identified exemplars between the dense and the pruned population.

Run: ``python -m benchmarks.fairness [--quick] [--workdir DIR]``. Writes
``benchmarks/results/fairness.{json,md}``, ``fairness_analysis.md`` and ``fairness_*.png``
(under ``benchmarks/results/quick/`` with ``--quick``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

from benchmarks import common
from train import analyze, fairness


def _config(quick: bool) -> fairness.ExperimentConfig:
  if quick:
    return fairness.ExperimentConfig(seeds=(0, 1), dense_steps=300, prune_steps=150,
                                     finetune_steps=150)
  return fairness.ExperimentConfig(seeds=(0, 1, 2), dense_steps=2000, prune_steps=1000,
                                   finetune_steps=1000)


def headline(rows: list[dict], sparsity: float) -> dict:
  """Dense/pruned/mitigated minority and majority drops, and how much of the gap closed."""
  by = {(r["method"], r["sparsity"]): r for r in rows}
  pruned, mitigated = by[(fairness.PRUNED, sparsity)], by.get((fairness.MITIGATED, sparsity))
  out = {"sparsity": sparsity,
         "pruned_minority_drop": pruned["minority_drop_mean"],
         "pruned_majority_drop": pruned["majority_drop_mean"],
         "pruned_disparity": pruned["disparity_mean"]}
  if mitigated is not None:
    out.update(mitigated_minority_drop=mitigated["minority_drop_mean"],
               mitigated_majority_drop=mitigated["majority_drop_mean"],
               mitigated_disparity=mitigated["disparity_mean"],
               accuracy_change_from_mitigation=(mitigated["accuracy_mean"]
                                                - pruned["accuracy_mean"]))
    if pruned["disparity_mean"] > 0:
      out["fraction_of_disparity_closed"] = 1 - (mitigated["disparity_mean"]
                                                 / pruned["disparity_mean"])
  return out


def main(argv=None) -> dict:
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--workdir", default=None,
                 help="where the runs' npz files go (default: a temporary directory)")
  p.add_argument("--report-only", action="store_true",
                 help="do not train: rewrite the report from the runs already in --workdir")
  args = p.parse_args(argv)
  config = _config(args.quick)
  name = "fairness"  # --quick writes under benchmarks/results/quick
  workdir = args.workdir or tempfile.mkdtemp(prefix="jaxprune_fairness_")
  timing_path = os.path.join(workdir, "benchmark_timing.json")
  machine = common.machine_info()
  if args.report_only:
    if not args.workdir:
      raise ValueError("--report-only needs --workdir")
    with open(os.path.join(workdir, "config.json")) as f:
      saved = json.load(f)
    config = fairness.ExperimentConfig(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()
        if k in {f.name for f in dataclasses.fields(fairness.ExperimentConfig)}
        and k != "model_kwargs"}, model_kwargs=tuple(saved.get("model_kwargs", {}).items()))
    with open(timing_path) as f:
      timing = json.load(f)
    train_seconds, machine = timing["train_seconds"], timing["machine"]
  else:
    start = time.perf_counter()
    fairness.run_experiment(workdir, config, log=common.log)
    train_seconds = time.perf_counter() - start
    with open(timing_path, "w") as f:
      json.dump({"train_seconds": train_seconds, "machine": machine}, f)
  md_path = analyze.analyze(workdir, args.out_dir, prefix=f"{name}_")
  wd = analyze.load_workdir(workdir)
  rows = analyze.summary_rows(wd)
  sparsity = max(config.sparsities)
  head = headline(rows, sparsity)
  tables = [analyze.summary_table(rows)]
  mit = analyze.mitigation_table(rows, sparsity)
  if mit:
    tables.append(mit)
  notes = [
      f"MNIST-1D, minority classes {list(config.minority_classes)} kept at "
      f"{config.keep_fraction} of their training examples (train class counts "
      f"{wd.config['train_class_counts']}); balanced test split of {len(wd.labels)}.",
      f"Model {config.model}; {config.dense_steps} dense steps (Adam, cosine from "
      f"{config.dense_lr}); gradual magnitude pruning to {sparsity:g} over "
      f"{config.prune_steps} steps (cubic ramp over the first {config.prune_ramp:.0%}, "
      f"masks every {config.prune_update_every} steps, layerwise; {list(config.keep_dense)} "
      f"kept dense); then {config.finetune_steps} fine-tuning steps per arm (Adam, cosine "
      f"from {config.finetune_lr}), the same batches for both arms.",
      f"Mitigation: groups = {config.groups}, ε = {config.epsilon}, dual step size "
      f"{config.dual_lr}, multipliers start at 0 and take one projected ascent step per "
      "training step. ε and the dual step size were set before the first run and not tuned; "
      "the model setup (CNN, first conv dense) followed pilot runs (README: 'What pruning costs').",
      f"Seeds {list(config.seeds)}; std over seeds with ddof=0. Every drop is measured "
      "against the dense model of the same seed.",
      f"Training wall time {train_seconds:.0f} s on this machine (all arms and seeds).",
      f"Full report: {os.path.basename(md_path)} (per-class tables, PIEs, seed spread, layer "
      "sensitivity, mask overlap).",
  ]
  json_rows = [{k: v for k, v in r.items() if k != "per_seed"} | {"per_seed": r["per_seed"]}
               for r in rows]
  json_path, table_path = common.write_results(
      name, title="Pruning on unbalanced MNIST-1D: who pays, and does mitigation help",
      rows=json_rows, tables=tables, config=config.to_json() | {"quick": args.quick},
      notes=notes, out_dir=args.out_dir, machine=machine,
      extra={"headline": head, "train_seconds": train_seconds, "analysis_md": md_path})
  if not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)
  print("\n\n".join(tables))
  print(head)
  common.log(f"wrote {json_path}, {table_path}, {md_path}")
  return head


if __name__ == "__main__":
  main()
