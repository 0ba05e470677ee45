"""What pruning costs the minority: MNIST-1D made unbalanced on purpose, dense vs 90% pruned vs
90% pruned + constrained fine-tuning, over seeds.

Setup. Some classes are subsampled in the train split (the *minority* classes: by default 0,
1, 2 keep a tenth of their training examples, about 40 each against about 400 for every other
class); the test split stays balanced (about 100 per class). Three arms share one dense start
per seed:

1. **dense** — the dense model (the MNIST-1D paper's CNN, with BatchNorm), trained
   ``dense_steps`` steps.
2. **pruned** — from the dense model, gradual magnitude pruning (``jp.magnitude_pruning`` with
   a cubic ``jp.polynomial_schedule`` from 0 to the target sparsity over the first 75% of
   ``prune_steps``; the first conv, 160 weights, is left dense), then ``finetune_steps`` of
   plain cross-entropy fine-tuning.
3. **pruned+mitigation** — the *same* pruned model (the state at the end of the pruning phase),
   fine-tuned for the same ``finetune_steps`` with the same optimizer and the same batches,
   under per-class loss constraints ``L_c − L ≤ ε``: :func:`jaxprune.analysis.constrained_loss`
   as the loss of the primal step and :func:`jaxprune.analysis.dual_ascent_update` on the
   multipliers after every step (Tran et al., 2022; Hashemizadeh et al., 2024).

Every phase trains with the runner's :class:`train.train.Trainer` (one
:meth:`~train.train.Trainer.train_step` per step, as ``python -m train`` does); both fine-tuning
arms are :func:`train.fairness.finetune_trainer`, whose optimizer ends with
``jp.magnitude_pruning(sparsity)`` holding the pruning phase's masks, so the pruned weights stay
exactly 0.

Reported per arm, mean ± std over seeds: overall, minority- and majority-class accuracy, their
drops vs the dense model of the same seed, the worst-class drop, the gap between the most- and
least-hurt classes, the excess test loss of minority and majority classes, and the number of
pruning-identified exemplars between the dense and the pruned population.

Run: ``python -m benchmarks.fairness [--quick] [--workdir DIR] [--model mlp]
[--sparsities 0.5,0.8,0.9] [--seeds 0,1,2] [...]``. Writes
``benchmarks/results/fairness.{json,md}``, ``fairness_analysis.md`` and ``fairness_*.png``
(under ``benchmarks/results/quick/`` with ``--quick``). The workdir is an experiment
directory of :mod:`train.runs` (``config.json``, ``test_data.npz``, ``runs.json``,
``runs/*.npz``), which ``python -m train.analyze --workdir DIR`` reports on.

References:
  Tran, Fioretto, Kim and Naidu, "Pruning has a disparate impact on model accuracy",
  NeurIPS 2022.
  Hashemizadeh, Ramirez, Sukumaran, Farnadi, Lacoste-Julien and Gallego-Posada, "Balancing Act:
  Constraining Disparate Impact in Sparse Models", ICLR 2024.
  Zhu and Gupta, "To prune, or not to prune", 2017 (gradual magnitude pruning).
  Greydanus and Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import optax
from flax import nnx

from benchmarks import common
from jaxprune import _tree, analysis, schedules, transforms
from train import analyze, fairness, mnist1d_builder, models, runs
from train.input_pipeline import unbalanced_indices
from train.mitigation import GROUPINGS, MITIGATED, PRUNED, Mitigation
from train.train import Trainer, make_mesh

__all__ = ["Arrays", "ExperimentConfig", "headline", "load_arrays", "main", "run_experiment"]

DENSE = "dense"


# ----------------------------------------------------------------------------- data


class Arrays(NamedTuple):
  """A dataset held in memory: ``x_*`` float32 ``(n, *input_shape)``, ``y_*`` int32 ``(n,)``."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


def load_arrays(data_dir: str | os.PathLike | None = None) -> Arrays:
  """MNIST-1D's train and test splits as numpy arrays, in the dataset's order.

  Built locally by :func:`train.mnist1d_builder.prepare` (no download) and read through
  ``builder.as_data_source``.

  Args:
    data_dir: TFDS data directory; ``None``: :func:`train.mnist1d_builder.default_data_dir`.

  Returns:
    An :class:`Arrays` with 4000 train and 1000 test examples of shape ``(40,)``.

  Examples:
    >>> import tempfile
    >>> from benchmarks.fairness import load_arrays
    >>> a = load_arrays(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Downloading and preparing dataset ...
    >>> a.x_train.shape, a.y_test.shape, a.num_classes
    ((4000, 40), (1000,), 10)
  """
  builder = mnist1d_builder.prepare(data_dir)
  input_key, label_key = builder.info.supervised_keys

  def read(split):
    source = builder.as_data_source(split)
    rows = [source[i] for i in range(len(source))]
    x = np.stack([np.asarray(r[input_key], np.float32) for r in rows])
    y = np.asarray([r[label_key] for r in rows], np.int32)
    return x, y

  x_train, y_train = read("train")
  x_test, y_test = read("test")
  num_classes = int(builder.info.features[label_key].num_classes)
  return Arrays(x_train, y_train, x_test, y_test, num_classes)


# ----------------------------------------------------------------------------- experiment


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything that defines one run of the experiment (written to ``config.json``).

  Minority classes ``(0, 1, 2)``: fixed before any run, by position rather than by a measured
  property, so that the choice cannot favour the result; three of ten classes give the
  minority about 300 test examples (295 in MNIST-1D), so its pooled accuracy moves in steps of
  about 0.3%. The train subsample is fixed by ``data_seed``; ``seeds`` vary the initialisation
  and the batch order.

  ``keep_dense``: leaves never pruned; by default the CNN's first conv (160 weights: at 90% it
  would keep 16, and in a pilot run the pruned CNN fell to about 42% accuracy), a common
  practice for the first layer. A path the model does not have is ignored.
  ``sparsities``: one pruned (and mitigated) arm per value; several give the accuracy-vs-
  sparsity curves of :mod:`train.analyze`.
  ``mitigate``: False skips the mitigated arm.
  """
  model: str = "cnn"
  model_kwargs: tuple[tuple[str, Any], ...] = ()
  dataset: str = "mnist1d"
  minority_classes: tuple[int, ...] = (0, 1, 2)
  keep_fraction: float = 0.1
  data_seed: int = 0
  seeds: tuple[int, ...] = (0, 1, 2)
  sparsities: tuple[float, ...] = (0.9,)
  keep_dense: tuple[str, ...] = ("convs/0/kernel",)
  batch_size: int = 128
  dense_steps: int = 2000
  dense_lr: float = 1e-2
  prune_steps: int = 1000
  prune_lr: float = 2e-3
  prune_ramp: float = 0.75
  prune_update_every: int = 50
  finetune_steps: int = 1000
  finetune_lr: float = 2e-3
  epsilon: float = 0.05
  dual_lr: float = 0.01
  groups: str = "classes"
  mitigate: bool = True

  def mitigation(self) -> Mitigation:
    return Mitigation(self.epsilon, self.dual_lr, self.groups, tuple(self.minority_classes))

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["model_kwargs"] = dict(self.model_kwargs)
    return d

  @classmethod
  def from_json(cls, saved: dict) -> ExperimentConfig:
    """The config a ``config.json`` was written from (extra keys ignored)."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"model_kwargs"}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()
                  if k in fields}, model_kwargs=tuple(saved.get("model_kwargs", {}).items()))


@functools.lru_cache(maxsize=16)
def _adam(kind: str, lr: float, steps: int):
  if kind == "cosine":
    return optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1)))
  return optax.adam(lr)


@functools.lru_cache(maxsize=16)
def _gmp_tx(lr: float, sparsity: float, steps: int, ramp: float, update_every: int,
            where: _tree.Where | None):
  # The ramp ends on a mask-update step, so the final sparsity is reached inside the phase.
  end = max(update_every, int(ramp * steps) // update_every * update_every)
  if end >= steps:
    raise ValueError(f"prune_steps: {steps} steps leave no mask update after the ramp ends "
                     f"at step {end} (prune_update_every={update_every}); use more steps")
  schedule = schedules.polynomial_schedule(sparsity, begin_step=0, end_step=end)
  return optax.chain(_adam("constant", lr, steps),
                     transforms.magnitude_pruning(schedule, update_every=update_every,
                                                  where=where))


def _eval_batches(x: np.ndarray, y: np.ndarray, rows: int) -> list[dict[str, np.ndarray]]:
  """``(x, y)`` as padded batches of ``rows`` with a ``mask``, for :meth:`Trainer.predict`."""
  out = []
  for i in range(0, len(y), rows):
    xb, yb = x[i:i + rows], y[i:i + rows]
    pad = rows - len(yb)
    out.append({"x": np.concatenate([xb, np.zeros((pad, *x.shape[1:]), x.dtype)]),
                "label": np.concatenate([yb, np.zeros((pad,), yb.dtype)]),
                "mask": np.arange(rows) < len(yb)})
  return out


def run_experiment(workdir: str, config: ExperimentConfig = ExperimentConfig(), *,
                   data: Arrays | None = None, log: Callable[[str], None] = print) -> list[dict]:
  """Runs every arm for every seed and sparsity; writes the workdir that ``train.analyze`` reads.

  Per seed: one dense model (``dense_steps``); per sparsity: gradual magnitude pruning from it
  (``prune_steps``), then ``finetune_steps`` of plain fine-tuning (**pruned**) and, from the
  same pruned state with the same batches, ``finetune_steps`` of constrained fine-tuning
  (**pruned+mitigation**). Data steps continue across phases (dense ``[0, D)``, pruning
  ``[D, D+P)``, both fine-tunings ``[D+P, D+P+F)``). Every phase is a
  :class:`train.train.Trainer` stepped by :func:`train.fairness.run_steps`.

  Args:
    workdir: output directory (created): an experiment directory of :mod:`train.runs`.
    config: an :class:`ExperimentConfig`.
    data: the dataset (default :func:`load_arrays`, MNIST-1D); the train split is subsampled
      with :func:`train.input_pipeline.unbalanced_indices`, the test split is used whole.
    log: progress printer.

  Returns:
    The ``runs.json`` records (method, sparsity, seed, file, accuracy, train_loss, seconds).
  """
  data = data if data is not None else load_arrays()
  mitigation = config.mitigation().validate(data.num_classes)
  keep = unbalanced_indices(data.y_train, config.minority_classes, config.keep_fraction,
                            config.data_seed)
  x_train, y_train = data.x_train[keep], data.y_train[keep]
  meta = config.to_json()
  meta.update(num_classes=data.num_classes, input_shape=list(data.x_train.shape[1:]),
              train_class_counts=np.bincount(y_train, minlength=data.num_classes).tolist(),
              test_class_counts=np.bincount(data.y_test, minlength=data.num_classes).tolist(),
              methods=[DENSE, PRUNED] + ([MITIGATED] if config.mitigate else []))
  runs.start_experiment(workdir, meta, data.x_test, data.y_test)
  log(f"train class counts {meta['train_class_counts']} (minority {config.minority_classes} "
      f"kept at {config.keep_fraction}); test {len(data.y_test)} examples")

  mesh = make_mesh()
  n_test = len(data.y_test)
  rows = -(-500 // mesh.devices.size) * mesh.devices.size  # divides over the devices
  eval_data = _eval_batches(np.concatenate([data.x_test, x_train]),
                            np.concatenate([data.y_test, y_train]), rows)
  where = runs.where_excluding(tuple(config.keep_dense))
  records = []

  def finish(trainer, method, sparsity, seed, seconds, masks=None):
    logits, _ = trainer.predict(eval_data)             # test then train, one pass
    test_logits, train_logits = logits[:n_test], logits[n_test:]
    acc = float(np.mean(np.argmax(test_logits, -1) == data.y_test))
    train_metrics = analysis.per_group_metrics(train_logits, y_train,
                                               num_groups=data.num_classes)
    _, params, rest = nnx.split(trainer.model(), nnx.Param, ...)
    rec = runs.add_run(workdir, method=method, sparsity=sparsity, seed=seed, logits=test_logits,
                       params=nnx.as_pure(params), rest=nnx.as_pure(rest), masks=masks,
                       multipliers=trainer.state.get("multipliers"),
                       train_class_loss=train_metrics.loss,
                       extra={"accuracy": acc, "train_loss": float(train_metrics.overall_loss),
                              "seconds": round(seconds, 2)})
    records.append(rec)
    log(f"seed {seed} {method:>18} s={sparsity:g}: test accuracy {acc:.4f} ({seconds:.0f} s)")

  for seed in config.seeds:
    batches = fairness.ArrayBatches(x_train, y_train, batch_size=config.batch_size, seed=seed)
    model = models.create_model(config.model, input_shape=data.x_train.shape[1:],
                                num_classes=data.num_classes, rngs=nnx.Rngs(seed),
                                **dict(config.model_kwargs))
    t0 = time.perf_counter()
    dense = Trainer(model, _adam("cosine", config.dense_lr, config.dense_steps), mesh=mesh)
    fairness.run_steps(dense, batches.batch, start_step=0, steps=config.dense_steps)
    finish(dense, DENSE, 0.0, seed, time.perf_counter() - t0)

    for s in config.sparsities:
      t0 = time.perf_counter()
      tx = _gmp_tx(config.prune_lr, float(s), config.prune_steps, config.prune_ramp,
                   config.prune_update_every, where)
      pruner = Trainer(dense.model(), tx, mesh=mesh)
      fairness.run_steps(pruner, batches.batch, start_step=config.dense_steps,
                         steps=config.prune_steps)
      masks = pruner.masks()  # the pruned weights of the pruner's model are exactly 0
      graphdef, p, r = nnx.split(pruner.model(), nnx.Param, ...)
      prune_seconds = time.perf_counter() - t0
      start = config.dense_steps + config.prune_steps
      arms = [(PRUNED, None)] + ([(MITIGATED, mitigation)] if config.mitigate else [])
      for method, mit in arms:
        t0 = time.perf_counter()
        tuner = fairness.finetune_trainer(
            graphdef, p, r, masks, steps=config.finetune_steps, sparsity=float(s),
            mitigation=mit, num_classes=data.num_classes, learning_rate=config.finetune_lr,
            where=where, mesh=mesh)
        fairness.run_steps(tuner, batches.batch, start_step=start, steps=config.finetune_steps)
        finish(tuner, method, float(s), seed, prune_seconds + time.perf_counter() - t0,
               masks=tuner.masks())
  return records


# ----------------------------------------------------------------------------- benchmark


def _config(quick: bool) -> ExperimentConfig:
  if quick:
    return ExperimentConfig(seeds=(0, 1), dense_steps=300, prune_steps=150, finetune_steps=150)
  return ExperimentConfig(seeds=(0, 1, 2), dense_steps=2000, prune_steps=1000,
                          finetune_steps=1000)


def headline(rows: list[dict], sparsity: float) -> dict:
  """Dense/pruned/mitigated minority and majority drops, and how much of the gap closed.

  Examples:
    >>> from benchmarks.fairness import headline
    >>> rows = [{"method": m, "sparsity": 0.9, "minority_drop_mean": a, "majority_drop_mean": b,
    ...          "disparity_mean": a - b, "accuracy_mean": c}
    ...         for m, a, b, c in (("pruned", 0.3, 0.1, 0.7), ("pruned+mitigation", 0.2, 0.1,
    ...                                                        0.72))]
    >>> round(headline(rows, 0.9)["fraction_of_disparity_closed"], 3)
    0.5
  """
  by = {(r["method"], r["sparsity"]): r for r in rows}
  pruned, mitigated = by[(PRUNED, sparsity)], by.get((MITIGATED, sparsity))
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


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(",") if v.strip())


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(v) for v in text.split(",") if v.strip())


# Command-line overrides of ExperimentConfig: flag -> (field, parser).
_OVERRIDES = {
    "--model": ("model", str), "--seeds": ("seeds", _ints),
    "--sparsities": ("sparsities", _floats), "--minority-classes": ("minority_classes", _ints),
    "--keep-fraction": ("keep_fraction", float),
    "--keep-dense": ("keep_dense", lambda t: tuple(x for x in t.split(",") if x)),
    "--dense-steps": ("dense_steps", int), "--prune-steps": ("prune_steps", int),
    "--finetune-steps": ("finetune_steps", int), "--epsilon": ("epsilon", float),
    "--dual-lr": ("dual_lr", float), "--groups": ("groups", str),
}


def _notes(config: ExperimentConfig, wd, sparsity: float, train_seconds: float,
           md_path: str) -> list[str]:
  return [
      f"MNIST-1D, minority classes {list(config.minority_classes)} kept at "
      f"{config.keep_fraction} of their training examples (train class counts "
      f"{wd.config['train_class_counts']}); balanced test split of {len(wd.labels)}.",
      f"Model {config.model}; {config.dense_steps} dense steps (Adam, cosine from "
      f"{config.dense_lr}); gradual magnitude pruning to {sparsity:g} over "
      f"{config.prune_steps} steps (cubic ramp over the first {config.prune_ramp:.0%}, "
      f"masks every {config.prune_update_every} steps, layerwise; {list(config.keep_dense)} "
      f"kept dense); then {config.finetune_steps} fine-tuning steps per arm (Adam, cosine "
      f"from {config.finetune_lr}), the same batches for both arms. Every phase steps "
      "`train.train.Trainer`, the main loop's trainer.",
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


def main(argv=None) -> dict:
  """``python -m benchmarks.fairness [--quick] [--workdir DIR] [--report-only] [overrides]``."""
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--workdir", default=None,
                 help="where the runs' npz files go (default: a temporary directory)")
  p.add_argument("--report-only", action="store_true",
                 help="do not train: rewrite the report from the runs already in --workdir")
  for flag, (field, parse) in _OVERRIDES.items():
    p.add_argument(flag, dest=field, type=parse, default=None,
                   **({"choices": GROUPINGS} if field == "groups" else {}))
  p.add_argument("--no-mitigation", action="store_true", help="skip the mitigated arm")
  args = p.parse_args(argv)
  overrides = {f: getattr(args, f) for f, _ in _OVERRIDES.values() if getattr(args, f) is not None}
  if args.no_mitigation:
    overrides["mitigate"] = False
  config = dataclasses.replace(_config(args.quick), **overrides)
  name = "fairness"  # --quick writes under benchmarks/results/quick
  workdir = args.workdir or tempfile.mkdtemp(prefix="jaxprune_fairness_")
  timing_path = os.path.join(workdir, "benchmark_timing.json")
  machine = common.machine_info()
  if args.report_only:
    if not args.workdir:
      raise ValueError("--report-only needs --workdir")
    with open(os.path.join(workdir, runs.CONFIG)) as f:
      config = ExperimentConfig.from_json(json.load(f))
    with open(timing_path) as f:
      timing = json.load(f)
    train_seconds, machine = timing["train_seconds"], timing["machine"]
  else:
    start = time.perf_counter()
    run_experiment(workdir, config, log=common.log)
    train_seconds = time.perf_counter() - start
    with open(timing_path, "w") as f:
      json.dump({"train_seconds": train_seconds, "machine": machine}, f)
  md_path = analyze.analyze(workdir, args.out_dir, prefix=f"{name}_")
  wd = runs.load_workdir(workdir)
  rows = analyze.summary_rows(wd)
  sparsity = max(config.sparsities)
  head = headline(rows, sparsity)
  tables = [analyze.summary_table(rows)]
  mit = analyze.mitigation_table(rows, sparsity)
  if mit:
    tables.append(mit)
  json_rows = [{k: v for k, v in r.items() if k != "per_seed"} | {"per_seed": r["per_seed"]}
               for r in rows]
  json_path, table_path = common.write_results(
      name, title="Pruning on unbalanced MNIST-1D: who pays, and does mitigation help",
      rows=json_rows, tables=tables, config=config.to_json() | {"quick": args.quick},
      notes=_notes(config, wd, sparsity, train_seconds, md_path), out_dir=args.out_dir,
      machine=machine,
      extra={"headline": head, "train_seconds": train_seconds, "analysis_md": md_path})
  if not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)
  print("\n\n".join(tables))
  print(head)
  common.log(f"wrote {json_path}, {table_path}, {md_path}")
  return head


if __name__ == "__main__":
  main()
