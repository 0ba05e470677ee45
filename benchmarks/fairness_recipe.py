"""The mitigation as a recipe option of the main runner: dense vs GMP 90% vs + plain fine-tuning
vs + constrained fine-tuning, on MNIST-1D made unbalanced on purpose, over seeds.

Where :mod:`benchmarks.fairness` prunes one shared dense model per seed in phases of its own,
this runs ``train/configs/mitigation.py`` through :func:`train.train.train_and_evaluate`, as a
user would with ``python -m train``: per seed three runs on the same unbalanced split (classes 0,
1, 2 keep a tenth of their training examples; the test split is whole):

* **dense** — the CNN trained ``num_steps`` steps (``--config.pruning.method=dense``);
* **control** — GMP to 90% (ERK) in the same ``num_steps``, then ``mitigation.steps`` of plain
  fine-tuning with the masks fixed (``mitigation.constrained=False``);
* **mitigated** — the identical GMP run, then the same fine-tuning under one loss constraint
  per class, ``L_c − L ≤ ε``, with multipliers by projected dual ascent.

The control and mitigated runs share the pruned model before the ``mitigate`` phase (bit for
bit: same config up to the phase), which :mod:`train.analyze` reports as ``gmp``.

Run: ``python -m benchmarks.fairness_recipe [--quick] [--workdir DIR]``. Writes
``benchmarks/results/fairness_recipe.{json,md}`` and ``fairness_recipe_analysis.md`` with its
plots (under ``benchmarks/results/quick/`` with ``--quick``).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from benchmarks import common
from train import analyze, train
from train.configs import mitigation

ARMS = {"dense": {"pruning.method": "dense", "mitigation.enabled": False},
        "control": {"mitigation.constrained": False},
        "mitigated": {}}


def make_config(arm: str, seed: int, quick: bool):
  """The recipe's config for one arm and seed (``--quick``: the MLP, a few hundred steps)."""
  config = mitigation.get_config()
  config.seed, config.progress = seed, False
  if quick:
    config.model = "mlp"
    config.num_steps, config.mitigation.steps = 400, 150
    config.checkpoint_every = config.eval_every = 400
  for key, value in ARMS[arm].items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def main(argv=None) -> list[dict]:
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--workdir", default=None, help="where the runs go (default: a temp dir)")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--report-only", action="store_true",
                 help="do not train: rewrite the report from the runs already in --workdir")
  args = p.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",")]
  if args.report_only and not args.workdir:
    raise ValueError("--report-only needs --workdir")
  workdir = args.workdir or tempfile.mkdtemp(prefix="jaxprune_fairness_recipe_")
  if not args.report_only and os.path.exists(os.path.join(workdir, "runs.json")):
    raise ValueError(f"--workdir: {workdir} holds a benchmarks.fairness workdir (runs.json); "
                     "use another directory")
  timing_path = os.path.join(workdir, "benchmark_timing.json")
  if args.report_only:
    with open(timing_path) as f:
      timing = json.load(f)
    machine, seconds = timing["machine"], timing["seconds"]
  else:
    machine, seconds = common.machine_info(), {}
    for seed in seeds:
      for arm in ARMS:
        start = time.perf_counter()
        train.train_and_evaluate(make_config(arm, seed, args.quick),
                                 os.path.join(workdir, f"{arm}_{seed}"))
        seconds[f"{arm}_{seed}"] = time.perf_counter() - start
        common.log(f"{arm} seed {seed}: {seconds[f'{arm}_{seed}']:.0f} s")
    with open(timing_path, "w") as f:
      json.dump({"machine": machine, "seconds": seconds}, f)
  name = "fairness_recipe"
  md_path = analyze.analyze(workdir, args.out_dir, prefix=f"{name}_")
  wd = analyze.load_workdir(workdir)
  rows = analyze.summary_rows(wd)
  tables = [analyze.summary_table(rows), analyze.mitigation_table(rows, 0.9, "gmp+mitigation")]
  config = make_config("mitigated", seeds[0], args.quick)
  notes = [
      f"`train/configs/mitigation.py` through `train.train_and_evaluate`: model "
      f"{config.model}, {config.num_steps} steps of training with GMP to "
      f"{config.pruning.sparsity} ({config.pruning.distribution}) from step "
      f"{config.pruning.begin_step} to {config.pruning.end_step}, then "
      f"{config.mitigation.steps} steps of the mitigate phase (Adam, cosine from "
      f"{config.mitigation.learning_rate}); ε = {config.mitigation.epsilon}, dual step "
      f"{config.mitigation.dual_lr}, groups = {config.mitigation.groups}.",
      f"Classes {list(config.imbalance.classes)} keep {config.imbalance.keep_fraction} of their "
      f"training examples; test split whole ({len(wd.labels)} examples).",
      f"Seeds {seeds}; std over seeds with ddof=0; drops against the dense run of the same "
      "seed. `gmp` is the pruned model before the mitigate phase.",
      f"Training wall time {sum(seconds.values()):.0f} s for all {len(seconds)} runs.",
      f"Full report: {os.path.basename(md_path)}.",
  ]
  json_rows = [{k: v for k, v in r.items() if k != "per_seed"} | {"per_seed": r["per_seed"]}
               for r in rows]
  json_path, table_path = common.write_results(
      name, title="The mitigation recipe of the main runner on unbalanced MNIST-1D",
      rows=json_rows, tables=tables, config=config.to_dict() | {"quick": args.quick},
      notes=notes, out_dir=args.out_dir, machine=machine, extra={"seconds": seconds})
  if not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)
  print("\n\n".join(tables))
  common.log(f"wrote {json_path}, {table_path}, {md_path}")
  return rows


if __name__ == "__main__":
  main()
