"""What pruning cost, from a directory of runs: ``python -m train.analyze --workdir DIR``.

Reads the runs under ``DIR`` (:func:`train.runs.load_workdir`: runs of ``python -m train``, or
an experiment directory of :mod:`benchmarks.fairness`; the formats are described in
:mod:`train.runs`) and writes ``DIR/analysis.md`` plus PNGs (``--out-dir`` to put them
elsewhere). The report is a sequence of sections (:data:`SECTIONS`), each a function of one
:class:`Report` that returns its markdown lines and writes its plots:

============================  ====================================================================
:func:`header_section`        title; model, dataset, minority classes, test examples
:func:`summary_section`       every metric per method and sparsity, mean ± std over seeds
:func:`mitigation_section`    with a ``+mitigation`` method: before / control / after on every
                              metric, final multipliers, training loss per class
:func:`per_class_section`     per-class change bars and per-class tables
:func:`exemplars_section`     pruning-identified exemplars and their gallery
:func:`seed_spread_section`   the spread of accuracy over seeds
:func:`curves_section`        accuracy (and minority accuracy) vs sparsity bands
:func:`sensitivity_section`   a layer-sensitivity heatmap of the dense model
:func:`mask_overlap_section`  mask overlap per layer across seeds
============================  ====================================================================

The numbers come from :mod:`train.summary`; the mitigation table from :mod:`train.mitigation`.

References:
  Tran et al., "Pruning has a disparate impact on model accuracy", NeurIPS 2022.
  Hooker et al., "What Do Compressed Deep Neural Networks Forget?", arXiv:1911.05248, 2019.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from jaxprune import _tree, analysis
from train import models
from train.mitigation import mitigation_arms, mitigation_table
from train.runs import MITIGATION_SUFFIX, Run, Workdir, load_workdir, save_run_file
from train.summary import (
    class_names,
    exemplars,
    group_accuracy,
    markdown_table,
    per_class_table,
    seed_metrics,
    summary_rows,
    summary_table,
)

__all__ = [
    "SECTIONS", "Report", "Run", "Workdir", "analyze", "curves_section", "exemplars_section",
    "header_section", "load_workdir", "main", "mask_overlap_section", "mitigation_arms",
    "mitigation_section", "mitigation_table", "per_class_section", "plot_class_change",
    "plot_mask_overlap", "save_run_file", "seed_metrics", "seed_spread_section",
    "sensitivity_section", "summary_rows", "summary_section", "summary_table",
]

# ----------------------------------------------------------------------------- plots


def _figure(**kw):
  from matplotlib.figure import Figure  # optional dependency; no pyplot (no global state)
  return Figure(**kw)


def _save(fig, path) -> str:
  fig.savefig(str(path), dpi=100, bbox_inches="tight")
  return str(path)


def plot_class_change(wd: Workdir, rows: Sequence[dict], path) -> str:
  """Grouped bars: mean change of per-class accuracy vs dense (± std over seeds), per arm."""
  arms = [r for r in rows if "class_change_mean" in r]
  top = max(r["sparsity"] for r in arms)
  arms = [r for r in arms if r["sparsity"] == top]
  fig = _figure(figsize=(max(6.0, 0.7 * wd.num_classes + 2), 3.8))
  ax = fig.add_subplot(1, 1, 1)
  width = 0.8 / max(1, len(arms))
  xs = np.arange(wd.num_classes)
  for c in wd.minority:
    ax.axvspan(c - 0.45, c + 0.45, color="0.9", zorder=0)
  for i, r in enumerate(arms):
    ax.bar(xs + (i - (len(arms) - 1) / 2) * width, r["class_change_mean"], width,
           yerr=r["class_change_std"], capsize=2, label=f"{r['method']} (s={r['sparsity']:g})")
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xticks(xs, class_names(wd))
  ax.set_xlabel("class (* = minority, shaded)" if wd.minority else "class")
  ax.set_ylabel("accuracy change vs dense")
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  ax.set_title(f"per-class accuracy change, mean ± std over {len(arms[0]['seeds'])} seeds",
               fontsize=9)
  return _save(fig, path)


def plot_mask_overlap(overlaps: dict[str, analysis.MaskOverlap], densities: dict[str, float],
                      path) -> str:
  """Bars of the mean pairwise Jaccard index per layer (one bar group per arm); the black tick
  marks what two independent random masks of the same density would give, ``d / (2 − d)``."""
  layers = list(next(iter(overlaps.values())).mean)
  fig = _figure(figsize=(max(5.0, 1.1 * len(layers) + 2), 3.6))
  ax = fig.add_subplot(1, 1, 1)
  width = 0.8 / len(overlaps)
  xs = np.arange(len(layers))
  for i, (name, ov) in enumerate(overlaps.items()):
    ax.bar(xs + (i - (len(overlaps) - 1) / 2) * width, [ov.mean[p] for p in layers], width,
           label=name)
  for j, p in enumerate(layers):
    d = densities[p]
    ax.plot([j - 0.45, j + 0.45], [d / (2 - d)] * 2, color="k", lw=1.5)
  ax.set_xticks(xs, layers, rotation=20, fontsize=7)
  ax.set_ylim(0, 1)
  ax.set_ylabel("mean pairwise Jaccard of kept weights")
  ax.legend(fontsize=7)
  ax.set_title("mask overlap across seeds (black: random masks of the same density)", fontsize=9)
  return _save(fig, path)


# ----------------------------------------------------------------------------- layer sensitivity


@functools.partial(jax.jit, static_argnums=0)
def _eval_logits(graphdef, params, rest, x):
  """Eval-mode logits of the model ``graphdef`` with ``params`` and ``rest``."""
  return models.eval_view(nnx.merge(graphdef, params, rest, copy=True))(x)


def _sensitivity(wd: Workdir, sparsities=(0.5, 0.8, 0.9, 0.95)):
  """Layer sensitivity of the first seed's reference model, or None without params/model."""
  ref = wd.select(wd.reference)
  if not ref or not ref[0].params or "model" not in wd.config:
    return None
  cfg = wd.config
  model = models.create_model(cfg["model"], input_shape=tuple(cfg["input_shape"]),
                              num_classes=wd.num_classes, rngs=nnx.Rngs(0),
                              **dict(cfg.get("model_kwargs") or {}))
  graphdef, params_t, rest_t = nnx.split(model, nnx.Param, ...)
  params_t, rest_t = nnx.as_pure(params_t), nnx.as_pure(rest_t)
  p_paths, _, p_def = _tree.flatten(params_t)
  r_paths, _, r_def = _tree.flatten(rest_t)
  run = ref[0]
  missing = [p for p in p_paths if p not in run.params] + [p for p in r_paths if p not in run.rest]
  if missing:
    raise ValueError(f"{run.record['file']}: no params/rest for {missing[:4]}")
  rest = jax.tree.unflatten(r_def, [run.rest[p] for p in r_paths])
  x, labels = wd.x, wd.labels
  minority = np.isin(labels, list(wd.minority)) if wd.minority else None

  def evaluate(flat):
    params = jax.tree.unflatten(p_def, [flat[p] for p in p_paths])
    logits = np.asarray(_eval_logits(graphdef, params, rest, x))
    pred = np.argmax(logits, -1)
    out = {"accuracy": float(np.mean(pred == labels)),
           "loss": float(np.mean(optax.softmax_cross_entropy_with_integer_labels(
               logits, labels)))}
    if minority is not None:
      out["minority_accuracy"] = float(np.mean(pred[minority] == labels[minority]))
    return out

  flat = {p: run.params[p] for p in p_paths}
  return analysis.layer_sensitivity(flat, evaluate, sparsities, where=wd.where)


# ----------------------------------------------------------------------------- report sections


@dataclasses.dataclass
class Report:
  """What every section reads: the runs, their summary rows, and where the files go.

  Attributes:
    wd: the runs (:func:`train.runs.load_workdir`).
    rows: :func:`train.summary.summary_rows` of ``wd``.
    out_dir: the directory the report and its PNGs are written to.
    prefix: prepended to every file name written.
    name: the report's title (the run directory's name).
  """
  wd: Workdir
  rows: list[dict[str, Any]]
  out_dir: str
  prefix: str = ""
  name: str = ""

  def path(self, name: str) -> str:
    """Where the output file ``name`` goes (``out_dir/<prefix><name>``)."""
    return os.path.join(self.out_dir, self.prefix + name)

  def image(self, alt: str, name: str) -> str:
    """The markdown that shows the PNG ``name`` (relative to the report)."""
    return f"![{alt}]({self.prefix}{name})"

  @property
  def sparsities(self) -> list[float]:
    """The sparsities of the non-reference runs, ascending."""
    return sorted({s for _, s in self.wd.arms()})


Section = Callable[[Report], list[str]]


def header_section(r: Report) -> list[str]:
  """The title and one line on the setting (model, dataset, minority classes, test split)."""
  cfg, wd = r.wd.config, r.wd
  desc = [f"model {cfg['model']}" if "model" in cfg else None,
          f"dataset {cfg['dataset']}" if "dataset" in cfg else None,
          f"minority classes {list(wd.minority)} (marked *) kept at "
          f"{cfg.get('keep_fraction')} of their training examples" if wd.minority else None,
          f"train class counts {cfg['train_class_counts']}" if "train_class_counts" in cfg
          else None,
          f"{len(wd.labels)} test examples"]
  return [f"# What pruning cost — {r.name}", "", "; ".join(d for d in desc if d) + ".", ""]


def summary_section(r: Report) -> list[str]:
  """Every summary metric per method and sparsity (:func:`train.summary.summary_table`)."""
  return ["## Summary", "",
          "Mean ± std over seeds. Drops are dense minus pruned accuracy of the same seed "
          "(positive = pruning hurt). *Worst-class drop*: the largest per-class drop; *gap*: "
          "largest minus smallest per-class drop; *excess loss*: pruned minus dense test "
          "cross-entropy, averaged over the classes of the group (Tran et al., 2022). PIEs: "
          "test examples whose modal prediction differs between the dense and the pruned "
          "population of seeds (Hooker et al., 2019).", "",
          summary_table(r.rows, with_minority=bool(r.wd.minority)), ""]


def _mitigation_method(r: Report, method: str) -> list[str]:
  """One mitigated method: its tables, final multipliers and training loss per class."""
  wd, top = r.wd, r.sparsities[-1]
  md = []
  for s in r.sparsities:
    t = mitigation_table(r.rows, s, method)
    if t:
      md += [f"{method}, sparsity {s:g}:", "", t, ""]
  lam = [run.arrays["multipliers"] for run in wd.runs if run.method == method
         and "multipliers" in run.arrays and run.sparsity == top]
  if lam:
    md += [f"Final multipliers λ of {method} (mean over seeds, sparsity {top:g}): "
           + ", ".join(f"{v:.3f}" for v in np.mean(lam, axis=0)), ""]
  base = method[:-len(MITIGATION_SUFFIX)]
  tl = {m: [run.arrays["train_class_loss"] for run in wd.select(m, top)
            if "train_class_loss" in run.arrays] for m in (base, method)}
  if all(tl.values()):
    md += ["Training loss per class at the end (mean over seeds):", "",
           markdown_table(["method"] + class_names(wd),
                          [[m] + [f"{v:.3f}" for v in np.mean(v_, axis=0)]
                           for m, v_ in tl.items()]), ""]
  return md


def mitigation_section(r: Report) -> list[str]:
  """Before / control / after of every ``<method>+mitigation`` (nothing without one)."""
  mitigated = sorted({m for m, _ in r.wd.arms() if m.endswith(MITIGATION_SUFFIX)})
  if not mitigated:
    return []
  cfg = r.wd.config
  md = ["## Mitigation: before / after", "",
        f"Fine-tuning of the pruned model, masks fixed, under per-group loss constraints "
        f"`L_g − L ≤ ε` (groups: {cfg.get('groups', 'classes')}, ε = "
        f"{cfg.get('epsilon', '?')}, dual step size {cfg.get('dual_lr', '?')}; Lagrange "
        "multipliers updated by projected dual ascent after every step). *Before*: the "
        "pruned model it starts from; *control* (when present): the same fine-tuning "
        "without constraints, same steps and batches.", ""]
  for method in mitigated:
    md += _mitigation_method(r, method)
  return md


def per_class_section(r: Report) -> list[str]:
  """Bars of the per-class accuracy change and a per-class table per arm."""
  if not any("class_change_mean" in row for row in r.rows):
    return []
  plot_class_change(r.wd, r.rows, r.path("per_class_change.png"))
  md = ["## Per-class impact", "", r.image("per-class change", "per_class_change.png"), ""]
  for row in r.rows[1:]:
    md += [f"### {row['method']}, sparsity {row['sparsity']:g}", "",
           per_class_table(r.wd, row), ""]
  return md


def exemplars_section(r: Report) -> list[str]:
  """Pruning-identified exemplars of every arm, with a gallery for 1-D and image inputs."""
  wd = r.wd
  md = ["## Pruning-identified exemplars", ""]
  showable = wd.x.ndim in (2, 3) or (wd.x.ndim == 4 and wd.x.shape[-1] in (1, 3, 4))
  for method, s in wd.arms():
    pies = exemplars(wd, method, s)
    if pies is None:
      continue
    md += [f"### {method}, sparsity {s:g}", "", pies.to_markdown(), ""]
    if showable:
      name = f"pies_{re.sub(r'[^A-Za-z0-9_.-]', '-', method)}_s{s:g}.png"
      analysis.plot_exemplar_gallery(wd.x, wd.labels, pies.mask, pies.dense_modal,
                                     pies.pruned_modal, r.path(name), max_examples=12,
                                     class_names=class_names(wd))
      md += [r.image("PIEs", name), ""]
  return md


def seed_spread_section(r: Report) -> list[str]:
  """Accuracy over seeds per method (mean, std, range) and the class whose range is widest."""
  wd = r.wd
  names = class_names(wd)
  rows = []
  for method, s in [(wd.reference, 0.0)] + wd.arms():
    runs = wd.select(method, s)
    if not runs:
      continue
    acc = [float(np.mean(np.argmax(run.logits, -1) == wd.labels)) for run in runs]
    per_class = [analysis.per_group_metrics(run.logits, wd.labels, num_groups=wd.num_classes)
                 .accuracy for run in runs]
    sp = analysis.seed_spread(acc, np.asarray(per_class))
    widest = int(np.argmax(sp.per_class_max - sp.per_class_min))
    rows.append([method, f"{s:g}", str(sp.num_seeds), f"{sp.mean:.4f}", f"{sp.std:.4f}",
                 f"{sp.min:.4f}", f"{sp.max:.4f}",
                 f"{names[widest]} ({sp.per_class_max[widest] - sp.per_class_min[widest]:.3f})"])
  return ["## Seed spread", "",
          markdown_table(["method", "sparsity", "seeds", "mean acc", "std", "min", "max",
                          "class with widest range"], rows), ""]


def curves_section(r: Report) -> list[str]:
  """Accuracy (and minority accuracy) vs sparsity, for methods run at several sparsities."""
  wd = r.wd
  multi = [m for m in {m for m, _ in wd.arms()} if len({s for mm, s in wd.arms() if mm == m}) > 1]
  md = ["## Accuracy vs sparsity", ""]
  if not multi:
    return md + ["Only one sparsity per method: no curve (run with several, e.g. "
                 "`python -m benchmarks.fairness --sparsities 0.5,0.8,0.9`).", ""]
  records = []
  for run in wd.runs:
    if run.method in multi:
      rec = {"method": run.method, "sparsity": run.sparsity, "seed": run.seed,
             "accuracy": float(np.mean(np.argmax(run.logits, -1) == wd.labels))}
      if wd.minority:
        rec["minority_accuracy"] = group_accuracy(run.logits, wd.labels, list(wd.minority))
      records.append(rec)
  reference = r.rows[0] if r.rows and r.rows[0]["method"] == wd.reference else {}
  plots = [("accuracy", "accuracy_vs_sparsity.png", "accuracy vs sparsity",
            "test accuracy, mean ± std over seeds")]
  if wd.minority:
    plots.append(("minority_accuracy", "minority_accuracy_vs_sparsity.png",
                  "minority accuracy vs sparsity",
                  "minority-class accuracy, mean ± std over seeds"))
  for metric, name, alt, title in plots:
    curves = analysis.accuracy_vs_sparsity(records, metric=metric)
    analysis.plot_accuracy_vs_sparsity(curves, r.path(name),
                                       dense=reference.get(f"{metric}_mean"), title=title)
    md += [curves.to_markdown(), "", r.image(alt, name), ""]
  return md


def sensitivity_section(r: Report) -> list[str]:
  """One layer of the dense model pruned at a time (needs its params and the model config)."""
  md = ["## Layer sensitivity", ""]
  sens = _sensitivity(r.wd)
  if sens is None:
    return md + ["No dense params or model config in the workdir: skipped.", ""]
  analysis.plot_layer_sensitivity(sens, r.path("layer_sensitivity.png"))
  md += ["One layer of the dense model (first seed) pruned at a time by magnitude, nothing "
         "else changed, no fine-tuning.", "", sens.to_markdown("accuracy"), ""]
  if "minority_accuracy" in sens.values:
    md += [sens.to_markdown("minority_accuracy"), ""]
  return md + [r.image("layer sensitivity", "layer_sensitivity.png"), ""]


def _same_masks(runs_a: Sequence[Run], runs_b: Sequence[Run]) -> bool:
  if [r.seed for r in runs_a] != [r.seed for r in runs_b]:
    return False
  return all(a.masks.keys() == b.masks.keys()
             and all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
             for a, b in zip(runs_a, runs_b))


def mask_overlap_section(r: Report) -> list[str]:
  """Pairwise Jaccard index of the kept weights per layer across seeds, per arm."""
  md = ["## Mask overlap across seeds", ""]
  top = max(r.sparsities, default=None)
  overlaps, densities, shown = {}, {}, {}
  for method, s in r.wd.arms():
    runs = [run for run in r.wd.select(method, s) if run.masks]
    same = [m for (m, s_), other in shown.items() if s_ == s and _same_masks(runs, other)]
    if same:
      md += [f"{method}, sparsity {s:g}: the same masks as {same[0]} (its fine-tuning keeps "
             "the masks fixed).", ""]
      continue
    shown[(method, s)] = runs
    if len(runs) >= 2:
      ov = analysis.pairwise_mask_overlap([run.masks for run in runs])
      overlaps[f"{method} s={s:g}"] = ov
      md += [f"### {method}, sparsity {s:g} ({len(runs)} seeds)", "", ov.to_markdown(), ""]
      if s == top:
        densities.update({p: float(np.mean(runs[0].masks[p])) for p in ov.mean})
  if not overlaps:
    return md + ["Fewer than two seeds with masks: skipped.", ""]
  plot_mask_overlap({k: v for k, v in overlaps.items() if k.endswith(f"s={top:g}")}, densities,
                    r.path("mask_overlap.png"))
  return md + ["Different seeds start from different dense models, so their masks are compared "
               "with what two random masks of the same density would share, `d / (2 − d)`.", "",
               r.image("mask overlap", "mask_overlap.png"), ""]


SECTIONS: tuple[Section, ...] = (
    header_section, summary_section, mitigation_section, per_class_section, exemplars_section,
    seed_spread_section, curves_section, sensitivity_section, mask_overlap_section)
"""The sections of ``analysis.md``, in order."""


def analyze(workdir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
            prefix: str = "", sections: Sequence[Section] = SECTIONS) -> str:
  """Writes ``analysis.md`` and the PNGs for a directory of runs; returns the markdown's path.

  Args:
    workdir: a directory of runs (:func:`train.runs.load_workdir`).
    out_dir: where to write (default: ``workdir``).
    prefix: prepended to every output file name (e.g. ``"fairness_"``).
    sections: the report's sections, each ``Report -> markdown lines`` (default
      :data:`SECTIONS`).

  Returns:
    The path of the markdown file.

  Examples:
    >>> import json, pathlib, tempfile, numpy as np
    >>> from train import analyze
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "runs").mkdir()
    >>> _ = (d / "config.json").write_text(json.dumps({"num_classes": 2}))
    >>> np.savez(d / "test_data.npz", x=np.zeros((2, 4)), label=np.array([0, 1]))
    >>> np.savez(d / "runs/a.npz", logits=np.eye(2, dtype=np.float32))
    >>> _ = (d / "runs.json").write_text(json.dumps(
    ...     [{"method": "dense", "sparsity": 0, "seed": 0, "file": "runs/a.npz"}]))
    >>> path = analyze.analyze(d, sections=[analyze.summary_section])
    >>> print(pathlib.Path(path).read_text().splitlines()[4])
    | method | sparsity | seeds | accuracy | worst-class drop | gap most/least hurt | PIEs |
  """
  wd = load_workdir(workdir)
  out_dir = os.fspath(out_dir or workdir)
  os.makedirs(out_dir, exist_ok=True)
  report = Report(wd, summary_rows(wd), out_dir, prefix,
                  name=os.path.basename(os.path.abspath(workdir)))
  md = [line for section in sections for line in section(report)]
  path = report.path("analysis.md")
  with open(path, "w") as f:
    f.write("\n".join(md).rstrip() + "\n")
  return path


def main(argv: Sequence[str] | None = None) -> str:
  """``python -m train.analyze --workdir DIR [--out-dir DIR]``."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out-dir", default=None)
  args = p.parse_args(argv)
  path = analyze(args.workdir, args.out_dir)
  print(f"wrote {path}")
  return path


if __name__ == "__main__":
  main()
