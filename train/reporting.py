"""What a run writes: metrics (JSON lines + TensorBoard), a Markdown report and PNG plots.

Files in the work directory:

* ``metrics.jsonl``: one JSON object per line. Training lines
  ``{"step", "loss", "accuracy", "sparsity", "learning_rate"}`` (means over the last
  ``log_every`` steps), evaluation lines ``{"step", "test_accuracy", "test_loss", "sparsity"}``
  and, last, the final line ``{"step", "test_accuracy", "test_loss", "sparsity", "params",
  "nonzero_params", "wall_time_s", "final": true}``.
* ``tensorboard/``: the same scalars as TensorBoard event files (tensorboardX).
* ``report.md``, ``curves.png`` (loss, accuracy and sparsity against steps) and
  ``sparsity.png`` (per-layer sparsity bars), written at the end.

A resumed run first drops the lines a killed run wrote after its last checkpoint
(:meth:`MetricsWriter.__init__` with ``resume_step``) and tells TensorBoard to purge them, so
both logs read as if the run had never stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from train.runs import METRICS, read_metrics

__all__ = ["LayerRow", "MetricsWriter", "layer_rows", "plot_curves", "plot_layer_sparsity",
           "read_metrics", "write_report"]


def _jsonable(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "__array__"):
    a = np.asarray(v)
    return a.item() if a.ndim == 0 else a.tolist()
  return v


class MetricsWriter:
  """Appends metrics to ``metrics.jsonl`` and to TensorBoard event files.

  Args:
    workdir: the run's directory.
    resume_step: the step the run resumes from (0 for a fresh run). Lines with a larger
      ``step`` and a previous ``final`` line are removed from ``metrics.jsonl``, and TensorBoard
      purges events after it.
    tensorboard: write TensorBoard event files too.
    enabled: write anything at all (False on every JAX process but the first).

  Examples:
    >>> import tempfile, os
    >>> from train import reporting
    >>> d = tempfile.mkdtemp()
    >>> with reporting.MetricsWriter(d, tensorboard=False) as w:
    ...   w.write(10, {"loss": 1.5})
    ...   w.write(20, {"loss": 1.0})
    >>> with reporting.MetricsWriter(d, resume_step=10, tensorboard=False) as w:
    ...   pass
    >>> [m["step"] for m in reporting.read_metrics(d)]
    [10]
  """

  def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0,
               tensorboard: bool = True, enabled: bool = True):
    self.path = os.path.join(os.fspath(workdir), METRICS)
    self._file = self._tb = None
    if not enabled:
      return
    os.makedirs(os.fspath(workdir), exist_ok=True)
    if resume_step == 0:
      open(self.path, "w").close()
    else:
      kept = [m for m in read_metrics(workdir)
              if m.get("step", 0) <= resume_step and not m.get("final")]
      with open(self.path, "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in kept)
    self._file = open(self.path, "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(os.fspath(workdir), "tensorboard"),
                               purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "") -> None:
    """Writes one line ``{"step": step, **metrics}`` and each number as a scalar.

    Args:
      step: the global step.
      metrics: name -> number (or bool/str, kept in the JSON line only).
      prefix: TensorBoard tag prefix, e.g. ``"train/"``.
    """
    if self._file is None:
      return
    line = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(line) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in line.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(prefix + k, v, int(step))

  def close(self) -> None:
    """Flushes and closes both outputs."""
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class LayerRow(dict):
  """One leaf of the report's table: ``path, shape, params, nonzero, sparsity, pruned``."""


def layer_rows(params, where) -> list[LayerRow]:
  """Per-leaf counts of a parameter tree, for the report and the sparsity plot.

  Args:
    params: a tree of arrays (e.g. ``nnx.state(model, nnx.Param)``).
    where: ``(path, leaf) -> bool``: the leaves pruning applies to (marked ``pruned``).

  Returns:
    One :class:`LayerRow` per leaf, in the tree's order.

  Examples:
    >>> import numpy as np
    >>> from train import reporting
    >>> rows = reporting.layer_rows({"w": np.array([[0., 1.], [2., 0.]]), "b": np.ones(2)},
    ...                             lambda p, x: x.ndim >= 2)
    >>> [(r["path"], r["nonzero"], r["sparsity"], r["pruned"]) for r in rows]
    [('b', 2, 0.0, False), ('w', 2, 0.5, True)]
  """
  from jaxprune import _tree

  paths, leaves, _ = _tree.flatten(params)
  rows = []
  for p, x in zip(paths, leaves, strict=True):
    a = np.asarray(x)
    n = int(a.size)
    nz = int(np.count_nonzero(a))
    rows.append(LayerRow(path=p, shape=tuple(a.shape), params=n, nonzero=nz,
                         sparsity=1.0 - nz / n if n else 0.0, pruned=bool(where(p, x))))
  return rows


def plot_curves(metrics: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                title: str = "") -> None:
  """Training curves: loss, train/test accuracy and sparsity against steps, as a PNG.

  Args:
    metrics: the lines of ``metrics.jsonl``.
    path: the PNG to write.
    title: figure title.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train = [m for m in metrics if "loss" in m]
  evals = [m for m in metrics
           if "test_accuracy" in m and "test_loss" in m and not m.get("final")]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  if train:
    steps = [m["step"] for m in train]
    axes[0].plot(steps, [m["loss"] for m in train], label="train")
    axes[1].plot(steps, [m["accuracy"] for m in train], label="train (batch)")
    axes[2].plot(steps, [m["sparsity"] for m in train], color="C3")
  if evals:
    steps = [m["step"] for m in evals]
    axes[0].plot(steps, [m["test_loss"] for m in evals], "o-", label="test")
    axes[1].plot(steps, [m["test_accuracy"] for m in evals], "o-", label="test")
  axes[0].set(xlabel="step", ylabel="cross-entropy", title="loss")
  axes[1].set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
  axes[2].set(xlabel="step", ylabel="fraction of zero weights", title="sparsity",
              ylim=(-0.02, 1.02))
  for ax in axes[:2]:
    ax.legend()
  for ax in axes:
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(os.fspath(path), dpi=100)
  plt.close(fig)


def plot_layer_sparsity(rows: Sequence[LayerRow], path: str | os.PathLike,
                        title: str = "") -> None:
  """Per-layer sparsity bars (leaves with ``ndim >= 2``), as a PNG.

  Args:
    rows: from :func:`layer_rows`.
    path: the PNG to write.
    title: figure title.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in rows if len(r["shape"]) >= 2]
  fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 2), 4))
  x = np.arange(len(rows))
  colors = ["C0" if r["pruned"] else "0.6" for r in rows]
  ax.bar(x, [r["sparsity"] for r in rows], color=colors)
  ax.set_xticks(x, [r["path"] for r in rows], rotation=60, ha="right", fontsize=8)
  ax.set(ylabel="fraction of zero weights", ylim=(0, 1), title=title or "per-layer sparsity")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.fspath(path), dpi=100)
  plt.close(fig)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(out)


def write_report(path: str | os.PathLike, *, title: str, final: Mapping[str, Any],
                 rows: Sequence[LayerRow], config_text: str,
                 notes: Sequence[str] = (),
                 extra: Mapping[str, Sequence[Any]] | Sequence[Mapping] | None = None,
                 images: Sequence[str] = ("curves.png", "sparsity.png"),
                 sparsity_label: str = "sparsity (prunable weights)") -> str:
  """Writes ``report.md``: accuracy, counts, wall time, per-layer table, plots, config.

  Args:
    path: the Markdown file.
    title: the heading (e.g. ``"gmp: cnn on mnist1d"``).
    final: the final metrics (``test_accuracy``, ``sparsity``, ``params``,
      ``nonzero_params``, ``wall_time_s``, ``step``).
    rows: per-leaf rows from :func:`layer_rows`.
    config_text: the config, printed at the end.
    notes: extra lines (e.g. leaves a structure could not prune).
    extra: optional small tables, each ``{"header": [...], "rows": [[...], ...]}`` (one, or
      a sequence), shown after the summary (e.g. the channels recipe's before/after counts).
    images: PNG files (relative to the report) to embed.
    sparsity_label: the name of ``final["sparsity"]`` in the summary.

  Returns:
    The Markdown text.
  """
  summary = [
      ("test accuracy", f"{final['test_accuracy']:.4f}"),
      (sparsity_label, f"{final['sparsity']:.4f}"),
      ("parameters", f"{final['params']:,}"),
      ("nonzero parameters", f"{final['nonzero_params']:,}"),
      ("steps", f"{final['step']:,}"),
      ("wall time", f"{final['wall_time_s']:.1f} s"),
  ]
  parts = [f"# {title}", "", _table(["", "value"], summary), ""]
  for table in [extra] if isinstance(extra, Mapping) else list(extra or ()):
    parts += [_table(table["header"], table["rows"]), ""]
  parts += [f"- {n}" for n in notes] + ([""] if notes else [])
  parts += ["## Per-layer sparsity", "",
            _table(["leaf", "shape", "params", "nonzero", "sparsity", "pruned"],
                   [(r["path"], "x".join(map(str, r["shape"])) or "()", f"{r['params']:,}",
                     f"{r['nonzero']:,}", f"{r['sparsity']:.3f}", "yes" if r["pruned"] else "")
                    for r in rows]), ""]
  parts += [f"![{os.path.splitext(i)[0]}]({i})" for i in images] + [""]
  parts += ["## Config", "", "```", config_text.rstrip(), "```", ""]
  text = "\n".join(parts)
  with open(os.fspath(path), "w") as f:
    f.write(text)
  return text
