"""Benchmark 3 — accuracy: test accuracy of each pruning recipe of ``train/configs`` against the
dense model trained the same way (same model, data, steps and seeds), on MNIST-1D.

Every (recipe, seed) is one ordinary :func:`train.train.train_and_evaluate` run in a temporary
directory; the table gives the mean ± std over seeds of the final test accuracy, the difference
to dense, and the measured sparsity of the final weights. This is an accuracy benchmark only:
wall times of separate runs are not interleaved, so no speed figure is drawn from them (see
``step_overhead.py`` for that).

Run: ``python -m benchmarks.accuracy [--quick] [--model cnn] [--steps 3000] [--seeds 0 1 2]``.
"""
from __future__ import annotations

import importlib
import statistics
import tempfile

from benchmarks import common

# recipe (train/configs/<name>.py) -> what it does, for the table
RECIPES = {
    "dense": "adam, no pruning",
    "oneshot": "magnitude, 90% at half of training",
    "gmp": "gradual magnitude (cubic), 90%",
    "set": "SET, 90% (ERK) throughout",
    "rigl": "RigL, 90% (ERK) throughout",
    "nm24": "2:4 at half of training",
}


def run_one(recipe: str, *, model: str, steps: int, seed: int) -> dict:
  from train import train as train_lib
  config = importlib.import_module(f"train.configs.{recipe}").get_config()
  config.model = model
  config.num_steps = steps
  config.seed = seed
  config.progress = False
  config.eval_every = steps
  config.checkpoint_every = steps
  config.keep_checkpoints = 1
  config.log_every = max(1, steps // 10)
  with tempfile.TemporaryDirectory(prefix=f"jaxprune_acc_{recipe}_") as workdir:
    final = train_lib.train_and_evaluate(config, workdir)
  return {"recipe": recipe, "seed": seed, "test_accuracy": float(final["test_accuracy"]),
          "sparsity": float(final["sparsity"]), "target_sparsity": float(config.pruning.sparsity)}


def summarize(runs: list[dict]) -> list[dict]:
  rows = []
  dense = [r["test_accuracy"] for r in runs if r["recipe"] == "dense"]
  dense_mean = statistics.mean(dense) if dense else None
  for recipe in RECIPES:
    rs = [r for r in runs if r["recipe"] == recipe]
    if not rs:
      continue
    acc = [r["test_accuracy"] for r in rs]
    mean = statistics.mean(acc)
    rows.append({
        "recipe": recipe, "what": RECIPES[recipe], "seeds": len(rs),
        "target_sparsity": rs[0]["target_sparsity"],
        "sparsity": statistics.mean(r["sparsity"] for r in rs),
        "accuracy_mean": mean, "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "vs_dense": None if dense_mean is None else mean - dense_mean,
        "accuracies": acc,
    })
  return rows


COLUMNS = [
    ("recipe", "recipe", str),
    ("what", "what", str),
    ("sparsity", "sparsity (measured)", lambda x: f"{x:.3f}"),
    ("accuracy_mean", "test accuracy", lambda x: f"{100 * x:.1f}%"),
    ("accuracy_std", "± std", lambda x: f"{100 * x:.1f}"),
    ("vs_dense", "Δ vs dense", lambda x: f"{100 * x:+.1f} pts"),
    ("seeds", "seeds", str),
]


def main(argv=None):
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--model", default="cnn", choices=["mlp", "cnn", "rnn", "resnet", "transformer"])
  p.add_argument("--steps", type=int, default=None, help="training steps (3000; 600 --quick)")
  p.add_argument("--seeds", nargs="+", type=int, default=None, help="(0 1 2; 0 with --quick)")
  p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
  args = p.parse_args(argv)
  steps = args.steps or (600 if args.quick else 3000)
  seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
  machine = common.machine_info()
  runs = []
  for recipe in args.recipes:
    for seed in seeds:
      r = run_one(recipe, model=args.model, steps=steps, seed=seed)
      common.log(f"[accuracy] {recipe} seed {seed}: {100 * r['test_accuracy']:.1f}% at "
                 f"sparsity {r['sparsity']:.3f}")
      runs.append(r)
  rows = summarize(runs)
  notes = [
      f"MNIST-1D, model {args.model}, {steps} steps, seeds {seeds}; each recipe is "
      "train/configs/<recipe>.py with only model, num_steps and seed overridden.",
      "sparsity (measured): the fraction of exact zeros among prunable weights at the end.",
      "Δ vs dense: mean accuracy minus the dense mean, in percentage points.",
  ]
  table = common.markdown_table(rows, COLUMNS)
  paths = common.write_results(
      "accuracy", title="Accuracy (benchmarks/accuracy.py)", rows=rows, tables=[table],
      config={"model": args.model, "steps": steps, "seeds": seeds, "recipes": args.recipes,
              "quick": args.quick},
      notes=notes, out_dir=args.out_dir, machine=machine, extra={"runs": runs})
  print(table)
  common.log("[accuracy] wrote " + ", ".join(paths))
  return rows


if __name__ == "__main__":
  main()
