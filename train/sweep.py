"""One recipe over several sparsities and seeds: accuracy vs sparsity with mean ± std bands.

Usage::

  python -m train.sweep --config train/configs/gmp.py --workdir runs/sweep_gmp \\
      --sparsities 0.5,0.8,0.9,0.95 --seeds 0,1,2 [--config.model=mlp ...]

Each (sparsity, seed) run is an ordinary :func:`train.train.train_and_evaluate` run in
``workdir/s<sparsity>_seed<seed>`` (so an interrupted sweep resumes where it stopped). At the
end the sweep writes ``workdir/sweep.json`` (one record per run), ``workdir/sweep.md`` (mean
and std per sparsity) and ``workdir/sweep.png`` (mean ± std band against sparsity, via
:func:`jaxprune.analysis.plot_accuracy_vs_sparsity`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

__all__ = ["run_sweep"]


def run_sweep(config: ml_collections.ConfigDict, workdir: str, *, sparsities: Sequence[float],
              seeds: Sequence[int]) -> list[dict[str, Any]]:
  """Runs ``config`` at every sparsity and seed, then writes the table and the plot.

  Args:
    config: an experiment config (its ``pruning.sparsity`` and ``seed`` are replaced).
    workdir: directory for the runs and the sweep outputs.
    sparsities: values of ``pruning.sparsity``.
    seeds: values of ``seed``.

  Returns:
    One record per run: ``method``, ``sparsity`` (the value asked for), ``measured_sparsity``,
    ``seed``, ``accuracy``, ``wall_time_s``.

  Examples:
    >>> import tempfile
    >>> from train import sweep
    >>> from train.configs import gmp
    >>> config = gmp.get_config()
    >>> config.num_steps, config.progress, config.pruning.update_every = 4, False, 1
    >>> config.model, config.model_kwargs.mlp.hidden = "mlp", (8,)
    >>> config.data_dir = tempfile.mkdtemp()
    >>> records = sweep.run_sweep(config, tempfile.mkdtemp(), sparsities=[0.5],
    ...                           seeds=[0])  # doctest: +ELLIPSIS
    Downloading and preparing dataset ...
    >>> records[0]["sparsity"], round(records[0]["measured_sparsity"], 2)
    (0.5, 0.5)
  """
  from jaxprune import analysis
  from train import train

  if not sparsities or not seeds:
    raise ValueError("sparsities and seeds: need at least one value each")
  os.makedirs(workdir, exist_ok=True)
  method = config.pruning.method
  records = []
  for s in sparsities:
    for seed in seeds:
      c = config.copy_and_resolve_references()
      c.pruning.sparsity = float(s)
      c.seed = int(seed)
      final = train.train_and_evaluate(c, os.path.join(workdir, f"s{s}_seed{seed}"))
      records.append({"method": method, "sparsity": float(s),
                      "measured_sparsity": final["sparsity"], "seed": int(seed),
                      "accuracy": final["test_accuracy"], "wall_time_s": final["wall_time_s"]})
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    json.dump(records, f, indent=1)
  curves = analysis.accuracy_vs_sparsity(records)
  with open(os.path.join(workdir, "sweep.md"), "w") as f:
    f.write(f"# {method}: {config.model} on {config.dataset}\n\n{curves.to_markdown()}\n\n"
            "![accuracy vs sparsity](sweep.png)\n")
  analysis.plot_accuracy_vs_sparsity(
      curves, os.path.join(workdir, "sweep.png"),
      title=f"{method}: {config.model} on {config.dataset} ({len(seeds)} seeds)")
  return records


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Command-line flags; defined only when run as a program (importing defines none)."""
  flags.DEFINE_string("workdir", None, "Directory for the runs and the sweep outputs.")
  flags.DEFINE_list("sparsities", ["0.5", "0.8", "0.9", "0.95"], "Values of pruning.sparsity.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  records = run_sweep(FLAGS.config, FLAGS.workdir,
                      sparsities=[float(s) for s in FLAGS.sparsities],
                      seeds=[int(s) for s in FLAGS.seeds])
  from jaxprune import analysis
  print(analysis.accuracy_vs_sparsity(records).to_markdown())
  print(f"plot: {os.path.join(FLAGS.workdir, 'sweep.png')}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
