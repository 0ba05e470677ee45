"""The training loop of jaxprune's experiments: :func:`train_and_evaluate`.

One loop runs every recipe of ``train/configs`` (dense, one-shot, GMP, IMP, SET, RigL, 2:4,
channels, and the ``mitigate`` phase any of them may add). ``config.pruning.method`` names a
recipe in :mod:`train.recipes`, which says how the optimizer is built, which phases the run
has and what happens between steps; :class:`train.experiment.Experiment` sets the recipe up
and :class:`train.trainer.Trainer` holds the state on the mesh and runs the jitted steps
(:meth:`train.trainer.Trainer.run` is the step loop). This module only runs the phases: it
restores, logs, evaluates, checkpoints and writes the outputs.

Determinism and resuming. Everything random comes from ``config.seed``; the batch at step
``t`` is a pure function of ``(seed, t)``. Checkpoints (:mod:`train.checkpointing`, every
``checkpoint_every`` steps and at the end) hold the model state (params, BatchNorm statistics),
the optimizer state (masks included), the step (which is also the data position) and the
recipe's extra state (IMP: the weights to rewind to). A run killed at any moment and started
again with the same command continues from its latest checkpoint and ends with bit-identical
parameters.

The names this module had before the split (``Trainer``, ``Experiment``, ``make_mesh``,
``make_where``, ``parse_structure``, ``make_lr``, ``build_model``, ``channel_group_pruning``)
are still importable from here.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

import jaxprune as jp
from train import checkpointing, export, input_pipeline, recipes, reporting, runs, validation
from train import workdir as workdir_lib
from train.experiment import Experiment, build_model, make_lr, make_where, parse_structure
from train.trainer import Trainer, make_mesh

__all__ = [
    "METHODS", "PREDICTIONS", "PREDICTIONS_BEFORE_MITIGATION", "Experiment", "Trainer",
    "build_model", "channel_group_pruning", "make_lr", "make_mesh", "make_where",
    "parse_structure", "save_predictions", "train_and_evaluate", "train_subset",
]

METHODS = recipes.names()
"""The values of ``config.pruning.method`` (the registered recipes)."""

channel_group_pruning = jp.group_pruning
"""The old name of :func:`jaxprune.group_pruning`, the channels recipe's transform (without the
``where`` argument: the groups carry it, ``surgery.channel_groups(..., where=...)``)."""


def _final_counts(params) -> tuple[int, int]:
  leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
  return sum(x.size for x in leaves), sum(int(np.count_nonzero(x)) for x in leaves)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (and prunes) as ``config`` says, resuming from ``workdir`` if it has checkpoints.

  Writes into ``workdir``: ``checkpoints/`` (and ``checkpoints_finetune/`` for ``channels``),
  ``metrics.jsonl``, ``tensorboard/``, ``report.md``, ``curves.png``, ``sparsity.png``,
  ``params.npz`` (the final model state, by path) and ``config.json``.

  Args:
    config: an experiment config (``train/configs/*.py``).
    workdir: output directory; created if missing.

  Returns:
    The final metrics: ``step``, ``test_accuracy``, ``test_loss``, ``sparsity``, ``params``,
    ``nonzero_params``, ``wall_time_s`` (and, for ``channels``, the shrink numbers).

  Examples:
    >>> import tempfile
    >>> from train import train
    >>> from train.configs import gmp
    >>> config = gmp.get_config()
    >>> config.num_steps, config.progress, config.pruning.update_every = 20, False, 1
    >>> config.model, config.model_kwargs.mlp.hidden = "mlp", (16,)
    >>> config.data_dir = tempfile.mkdtemp()
    >>> final = train.train_and_evaluate(config, tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Downloading and preparing dataset ...
    >>> final["step"], round(final["sparsity"], 3)
    (20, 0.9)
  """
  t_start = time.time()
  is_main = jax.process_index() == 0  # the one process that writes files other than checkpoints
  validation.validate_config(config, methods=METHODS)
  change = workdir_lib.check_config(workdir, config)  # another config: refused, nothing written
  validation.prepare_dataset(config)
  os.makedirs(workdir, exist_ok=True)
  subset = train_subset(config)
  data = input_pipeline.get_datasets(
      config.dataset, batch_size=config.batch_size, seed=config.seed,
      eval_batch_size=config.eval_batch_size, data_dir=config.data_dir,
      train_indices=subset)
  mesh = make_mesh()
  exp = Experiment(config, data.info, mesh=mesh)
  if is_main:  # only now that the config has been validated
    workdir_lib.write_config(workdir, config, change)
  exp.notes += workdir_lib.change_notes(change)
  if subset is not None:
    imb = config.imbalance
    exp.notes.append(f"training split unbalanced on purpose: classes {list(imb.classes)} keep "
                     f"{imb.keep_fraction} of their examples ({data.info.num_train} examples "
                     "left); the test split is whole")
  ckpt_dirs = [os.path.join(os.path.abspath(workdir), "checkpoints" + ("" if i == 0 else
                                                                        f"_{name}"))
               for i, (name, _, _) in enumerate(exp.phases)]

  # Where to resume: the latest step over all phases' checkpoints.
  latest = []
  for d in ckpt_dirs:
    with checkpointing.Checkpoints(d) as c:
      latest.append(c.latest_step())
  resume_step = max([s for s in latest if s is not None], default=0)

  from tqdm import tqdm
  bar = tqdm(total=exp.total_steps, initial=resume_step, disable=not config.progress,
             desc=f"{exp.method} {config.model}", dynamic_ncols=True, mininterval=1.0)
  with workdir_lib.MetricsLog(workdir, enabled=is_main) as writer:
    progress = _Progress(exp, data.test, writer, bar, t_start)
    for phase, ((name, begin, end), ckpt_dir) in enumerate(zip(exp.phases, ckpt_dirs,
                                                               strict=True)):
      records = exp.start_phase(name, data.test)  # the phase's trainer
      if latest[phase] is None:
        for prefix, metrics in records.items():
          writer.write(begin, metrics, prefix=prefix)
      with checkpointing.Checkpoints(ckpt_dir, every=config.checkpoint_every,
                                     keep=config.keep_checkpoints) as ckpts:
        start = begin
        if latest[phase] is not None:
          start = progress.restore(ckpts)
        progress.begin_phase(end, ckpts)
        exp.trainer.run(data.train.batch, start, end, before_step=exp.before_step,
                        after_step=progress)
        if start == end:  # nothing left to do in this phase (resumed after it ended)
          progress.final_eval = exp.trainer.evaluate(data.test)
    bar.close()

    params = exp.trainer.params()
    total, nonzero = _final_counts(params)
    sparsity = float(jax.device_get(exp.trainer.sparsity(params)))
    final = {"step": exp.total_steps, **progress.final_eval, "sparsity": sparsity,
             "params": total, "nonzero_params": nonzero, "wall_time_s": progress.elapsed(),
             **exp.final_metrics(), "final": True}
    writer.write(exp.total_steps, final, prefix="final/")

  if is_main:
    runs.save_params(workdir, nnx.state(exp.trainer.model()))
    outputs = None
    if jax.process_count() == 1:
      outputs = exp.outputs(data.test)
      save_predictions(os.path.join(workdir, PREDICTIONS), outputs)
      exp.notes.append(export.report_line(export.export_run(
          workdir, outputs["params"], outputs["masks"], rest=outputs["rest"])))
      for file, out in exp.extra_outputs().items():
        save_predictions(os.path.join(workdir, file), out)
    else:
      exp.notes.append(f"{PREDICTIONS} not written: test logits are gathered only in "
                       "single-process runs")
    _write_outputs(config, workdir, exp, final, params, outputs)
  return final


class _Progress:
  """What the loop does after each step (``after_step`` of :meth:`Trainer.run`): train metrics
  every ``log_every`` steps, evaluation every ``eval_every``, a checkpoint every
  ``checkpoint_every`` (and all three at the end of each phase)."""

  def __init__(self, exp: Experiment, test: input_pipeline.EvalData, writer, bar,
               t_start: float):
    self.exp, self.config, self.test = exp, exp.config, test
    self.writer, self.bar, self.t_start = writer, bar, t_start
    self.elapsed_before = 0.0  # wall time of the runs before a resume
    self.final_eval: dict[str, float] = {}
    self.end, self.ckpts, self.pending = 0, None, []

  def elapsed(self) -> float:
    return self.elapsed_before + time.time() - self.t_start

  def state(self, step: int, elapsed: float) -> dict[str, Any]:
    return {**self.exp.trainer.state, "step": step, "elapsed": elapsed,
            "extra": self.exp.extra_state()}

  def restore(self, ckpts: checkpointing.Checkpoints) -> int:
    """Restores the phase's latest checkpoint into the experiment; returns its step."""
    restored = ckpts.restore(self.state(0, 0.0))
    self.exp.trainer.state = {k: restored[k] for k in self.exp.trainer.state}
    self.exp.load_extra_state(restored["extra"])
    self.elapsed_before = float(restored["elapsed"])
    self.writer.resume(int(restored["step"]))  # metrics.jsonl is cut after it at the next write
    return int(restored["step"])

  def begin_phase(self, end: int, ckpts: checkpointing.Checkpoints) -> None:
    self.end, self.ckpts, self.pending = end, ckpts, []

  def __call__(self, done: int, metrics: Mapping[str, jax.Array]) -> None:
    config, trainer = self.config, self.exp.trainer
    self.pending.append(metrics)
    last = done == self.end
    if done % config.log_every == 0 or last:
      logs, self.pending = jax.device_get(self.pending), []
      validation.check_finite_metrics(logs, done)
      mean = {k: float(np.mean([m[k] for m in logs])) for k in logs[0]
              if np.ndim(logs[0][k]) == 0}  # scalars (not per-group violations)
      self.writer.write(done, mean, prefix="train/")
      self.bar.set_postfix(loss=f"{mean['loss']:.3f}", acc=f"{mean['accuracy']:.3f}",
                           sparsity=f"{mean['sparsity']:.3f}", refresh=False)
    if done % config.eval_every == 0 or last:
      self.final_eval = trainer.evaluate(self.test)
      self.writer.write(done, {**self.final_eval, "sparsity": float(jax.device_get(
          trainer.sparsity(trainer.params())))}, prefix="eval/")
    self.bar.update(1)
    if done % config.checkpoint_every == 0 or last:
      validation.check_finite_params(trainer.params(), done)
      self.ckpts.save(done, self.state(done, self.elapsed()), force=last)


PREDICTIONS = runs.PREDICTIONS
"""The file of a run's final test logits, masks and model state, read by :mod:`train.analyze`."""
PREDICTIONS_BEFORE_MITIGATION = runs.PREDICTIONS_BEFORE_MITIGATION
"""The same at the start of the ``mitigate`` phase (the pruned model), when there is one."""


def save_predictions(path: str, outputs: Mapping[str, Any]) -> None:
  """Writes :meth:`Experiment.outputs` as a run file (:func:`train.runs.save_run_file`).

  Examples:
    >>> import os, tempfile, numpy as np
    >>> from train import train
    >>> path = os.path.join(tempfile.mkdtemp(), train.PREDICTIONS)
    >>> train.save_predictions(path, {
    ...     "logits": np.zeros((2, 3)), "labels": np.array([0, 2]),
    ...     "params": {"w": np.ones((3, 3))}, "rest": {}, "masks": {"w": np.eye(3, dtype=bool)},
    ...     "multipliers": None})
    >>> sorted(np.load(path).files)
    ['label', 'logits', 'masks/w', 'params/w']
  """
  runs.save_run_file(path, logits=outputs["logits"], labels=outputs["labels"],
                        params=outputs["params"], rest=outputs["rest"], masks=outputs["masks"],
                        multipliers=outputs["multipliers"])


def train_subset(config: ml_collections.ConfigDict) -> Callable | None:
  """The rows to train on when ``config.imbalance.classes`` is set, else None.

  Each class in ``imbalance.classes`` keeps ``imbalance.keep_fraction`` of its training
  examples, chosen by ``imbalance.seed`` (:func:`train.input_pipeline.unbalanced_indices`);
  the choice does not depend on ``config.seed``, so every seed trains on the same subset.

  Examples:
    >>> import numpy as np
    >>> from train import train
    >>> from train.configs import mitigation
    >>> config = mitigation.get_config()
    >>> labels = np.repeat(np.arange(10), 100)
    >>> np.bincount(labels[train.train_subset(config)(labels)]).tolist()
    [10, 10, 10, 100, 100, 100, 100, 100, 100, 100]
  """
  imb = config.get("imbalance")
  if imb is None or not imb.get("classes"):
    return None
  return functools.partial(input_pipeline.unbalanced_indices,
                           minority_classes=tuple(int(c) for c in imb.classes),
                           keep_fraction=float(imb.keep_fraction), seed=int(imb.get("seed", 0)))


def _write_outputs(config, workdir, exp: Experiment, final, params, outputs) -> None:
  title = f"{exp.method}: {config.model} on {config.dataset}"
  rows = reporting.layer_rows(params, exp.where)
  metrics = reporting.read_metrics(workdir)
  reporting.plot_curves(metrics, os.path.join(workdir, "curves.png"), title=title)
  reporting.plot_layer_sparsity(rows, os.path.join(workdir, "sparsity.png"), title=title)
  reporting.write_report(os.path.join(workdir, "report.md"), title=title, final=final,
                         rows=rows, config_text=str(config), notes=exp.notes,
                         extra=exp.report_tables(final, outputs),
                         sparsity_label=exp.recipe.sparsity_label)
