"""``make demo``: MNIST-1D, a CNN trained dense, with GMP to 90% and with RigL at 90%.

Runs ``python -m train``'s loop three times (``train/configs/{dense,gmp,rigl}.py`` with the CNN,
``--steps`` steps each) in ``runs/demo/<method>`` and prints one table: method, sparsity,
test accuracy, wall time. Each run also leaves its ``report.md``, plots, TensorBoard logs and
checkpoints there; then :mod:`train.analyze` compares the pruned runs with the dense one
(per-class impact, pruning-identified exemplars, layer sensitivity) in
``runs/demo/analysis.md`` and the demo prints its summary table. Takes about 1 minute on 2
CPU cores (46 s measured, 11 s more for the analysis).

Usage::

  python -m train.demo [--workdir runs/demo] [--steps 3000] [--keep]
"""

from __future__ import annotations

import os
import shutil
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Command-line flags; defined only when run as a program (importing defines none)."""
  flags.DEFINE_string("workdir", "runs/demo", "Where the three runs go.")
  flags.DEFINE_integer("steps", 3000, "Training steps of each run.")
  flags.DEFINE_string("model", "cnn", "Model: mlp, cnn, rnn, resnet or transformer.")
  flags.DEFINE_bool("keep", False, "Resume runs already in --workdir instead of starting over.")

RECIPES = ("dense", "gmp", "rigl")


def demo(workdir: str, *, steps: int, model: str = "cnn", keep: bool = False) -> list[dict]:
  """Builds MNIST-1D, trains dense, GMP 90% and RigL 90%; returns one row per method.

  Args:
    workdir: parent directory of the three runs.
    steps: training steps per run.
    model: the model of all three runs.
    keep: resume existing runs (default: delete them and start over).

  Returns:
    Rows ``{"method", "sparsity", "test_accuracy", "wall_time_s", "workdir"}``.
  """
  import importlib

  from train import mnist1d_builder, train

  mnist1d_builder.prepare()
  rows = []
  for name in RECIPES:
    config = importlib.import_module(f"train.configs.{name}").get_config()
    config.model = model
    config.num_steps = steps
    run_dir = os.path.join(workdir, name)
    if not keep and os.path.exists(run_dir):
      shutil.rmtree(run_dir)
    final = train.train_and_evaluate(config, run_dir)
    rows.append({"method": name, "sparsity": final["sparsity"],
                 "test_accuracy": final["test_accuracy"],
                 "wall_time_s": final["wall_time_s"], "workdir": run_dir})
  return rows


def format_table(rows: list[dict]) -> str:
  """The demo's table, in Markdown.

  Examples:
    >>> from train import demo
    >>> print(demo.format_table([{"method": "dense", "sparsity": 0.0, "test_accuracy": 0.95,
    ...                           "wall_time_s": 20.0}]))
    | method | sparsity | test accuracy | time (s) |
    |---|---|---|---|
    | dense | 0.000 | 0.9500 | 20.0 |
  """
  lines = ["| method | sparsity | test accuracy | time (s) |", "|---|---|---|---|"]
  lines += [f"| {r['method']} | {r['sparsity']:.3f} | {r['test_accuracy']:.4f} | "
            f"{r['wall_time_s']:.1f} |" for r in rows]
  return "\n".join(lines)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  t0 = time.time()
  rows = demo(FLAGS.workdir, steps=FLAGS.steps, model=FLAGS.model, keep=FLAGS.keep)
  print()
  print(f"MNIST-1D, {FLAGS.model.upper()}, {FLAGS.steps} steps per run "
        "(reports: " + ", ".join(os.path.join(r["workdir"], "report.md") for r in rows) + ")")
  print(format_table(rows))
  from train import analyze  # what the pruning cost, per class (same seed, same test set)
  path = analyze.analyze(FLAGS.workdir)
  print(f"\nWhat pruning cost, per class and per example (details and plots: {path})")
  print(analyze.summary_table(analyze.summary_rows(analyze.load_workdir(FLAGS.workdir)),
                              with_minority=False))
  print(f"total: {time.time() - t0:.0f} s")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
