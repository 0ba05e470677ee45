"""The numbers of a pruning report: per-seed metrics against the dense run of the same seed,
their mean ± std over seeds (:func:`summary_rows`), and the markdown tables that show them.

Works on a :class:`train.runs.Workdir` (:func:`train.runs.load_workdir`). :mod:`train.analyze`
builds the report from these rows; :mod:`train.mitigation` adds the before/after table of a
mitigated arm.

References:
  Tran et al., "Pruning has a disparate impact on model accuracy", NeurIPS 2022.
  Hooker et al., "What Do Compressed Deep Neural Networks Forget?", arXiv:1911.05248, 2019.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxprune import analysis
from train.runs import Workdir

__all__ = ["SUMMARY_COLUMNS", "class_names", "exemplars", "group_accuracy", "markdown_table",
           "mean_std", "per_class_table", "seed_metrics", "summary_rows", "summary_table"]

# (key, header, is a change vs the reference) for the summary table, in order.
SUMMARY_COLUMNS = (
    ("accuracy", "accuracy", False),
    ("minority_accuracy", "minority acc", False),
    ("majority_accuracy", "majority acc", False),
    ("minority_drop", "minority drop", True),
    ("majority_drop", "majority drop", True),
    ("disparity", "minority − majority drop", True),
    ("worst_class_drop", "worst-class drop", True),
    ("gap", "gap most/least hurt", True),
    ("excess_loss_minority", "excess loss minority", True),
    ("excess_loss_majority", "excess loss majority", True),
)


# ----------------------------------------------------------------------------- metrics


def group_accuracy(logits, labels, classes) -> float:
  """Accuracy pooled over the examples whose label is in ``classes`` (NaN if there are none).

  Examples:
    >>> import numpy as np
    >>> from train.summary import group_accuracy
    >>> group_accuracy(np.eye(3)[[0, 1, 1]], np.array([0, 1, 2]), [1, 2])
    0.5
  """
  sel = np.isin(labels, classes)
  return float(np.mean(np.argmax(logits[sel], -1) == labels[sel])) if sel.any() else np.nan


def seed_metrics(dense_logits, logits, labels, minority: Sequence[int],
                 num_classes: int) -> dict[str, Any]:
  """Metrics of one pruned run against the dense run of the same seed.

  Keys: ``accuracy``; ``minority_accuracy`` / ``majority_accuracy`` (pooled over the examples of
  the minority / other classes); ``minority_drop`` / ``majority_drop`` (dense minus pruned
  accuracy of each pool); ``disparity`` (minority drop minus majority drop: how much more
  pruning hurt the minority); ``worst_class_drop`` and ``gap`` (largest class drop, and largest
  minus smallest, from :func:`jaxprune.analysis.disparate_impact`); ``excess_loss_minority`` /
  ``excess_loss_majority`` (mean over those classes of the per-class excess loss, pruned minus
  dense cross-entropy); and per-class arrays ``class_accuracy``, ``class_change``,
  ``precision_change``, ``excess_loss``.

  Examples:
    >>> import numpy as np
    >>> from train.summary import seed_metrics
    >>> labels = np.array([0, 0, 1, 1])
    >>> dense = np.eye(2, dtype=np.float32)[labels] * 5
    >>> pruned = np.eye(2, dtype=np.float32)[[0, 1, 1, 1]] * 5
    >>> m = seed_metrics(dense, pruned, labels, minority=[0], num_classes=2)
    >>> m["minority_drop"], m["majority_drop"], m["disparity"]
    (0.5, 0.0, 0.5)
  """
  minority = list(minority)
  majority = [c for c in range(num_classes) if c not in minority]
  di = analysis.disparate_impact(dense_logits, logits, labels, num_groups=num_classes)
  out: dict[str, Any] = {"accuracy": float(di.pruned.overall_accuracy)}
  if minority:
    for name, classes in (("minority", minority), ("majority", majority)):
      acc = group_accuracy(logits, labels, classes)
      out[f"{name}_accuracy"] = acc
      out[f"{name}_drop"] = group_accuracy(dense_logits, labels, classes) - acc
    out["disparity"] = out["minority_drop"] - out["majority_drop"]
  excess = np.asarray(di.excess_loss, np.float64)
  out.update(worst_class_drop=float(di.worst_group_drop), gap=float(di.gap))
  if minority:
    out["excess_loss_minority"] = float(np.nanmean(excess[minority]))
    out["excess_loss_majority"] = float(np.nanmean(excess[majority]))
  out.update(class_accuracy=np.asarray(di.pruned.accuracy, np.float64),
             dense_class_accuracy=np.asarray(di.dense.accuracy, np.float64),
             class_change=np.asarray(di.accuracy_change, np.float64),
             precision_change=np.asarray(di.precision_change, np.float64),
             excess_loss=excess)
  return out


def _dense_metrics(logits, labels, minority, num_classes) -> dict[str, Any]:
  m = analysis.per_group_metrics(logits, labels, num_groups=num_classes)
  out: dict[str, Any] = {"accuracy": float(m.overall_accuracy)}
  if minority:
    out["minority_accuracy"] = group_accuracy(logits, labels, list(minority))
    out["majority_accuracy"] = group_accuracy(
        logits, labels, [c for c in range(num_classes) if c not in minority])
  out["class_accuracy"] = np.asarray(m.accuracy, np.float64)
  return out


def exemplars(wd: Workdir, method: str, sparsity: float) -> analysis.Exemplars | None:
  """Pruning-identified exemplars between the reference runs and the runs of ``method`` at
  ``sparsity`` (the seeds that have both), or None when no seed has both.

  Hooker et al. (2019): the examples whose modal prediction over seeds differs between the two
  populations (:func:`jaxprune.analysis.pruning_identified_exemplars`).
  """
  runs = [r for r in wd.select(method, sparsity) if wd.reference_run(r.seed) is not None]
  if not runs:
    return None
  dense = np.stack([np.argmax(wd.reference_run(r.seed).logits, -1) for r in runs])
  pruned = np.stack([np.argmax(r.logits, -1) for r in runs])
  return analysis.pruning_identified_exemplars(dense, pruned, wd.labels,
                                               num_classes=wd.num_classes)


def summary_rows(wd: Workdir) -> list[dict[str, Any]]:
  """One row per (method, sparsity), reference first: mean and std over seeds of each metric.

  Each row has ``method``, ``sparsity``, ``seeds``, ``<metric>_mean`` / ``<metric>_std`` for
  the keys of :data:`SUMMARY_COLUMNS` (std with ``ddof=0``), ``pies`` (count of
  pruning-identified exemplars between the reference population and this one, over all
  seeds), ``pies_minority`` and ``per_seed`` (the raw per-seed values).
  """
  rows = []
  ref_runs = wd.select(wd.reference)
  if ref_runs:
    per_seed = [_dense_metrics(r.logits, wd.labels, wd.minority, wd.num_classes)
                for r in ref_runs]
    rows.append(_aggregate(wd.reference, 0.0, [r.seed for r in ref_runs], per_seed))
  for method, s in wd.arms():
    runs = wd.select(method, s)
    per_seed = [seed_metrics(wd.reference_run(r.seed).logits, r.logits, wd.labels, wd.minority,
                             wd.num_classes) if wd.reference_run(r.seed) is not None
                else _dense_metrics(r.logits, wd.labels, wd.minority, wd.num_classes)
                for r in runs]  # without a reference for its seed: absolute metrics only
    row = _aggregate(method, s, [r.seed for r in runs], per_seed)
    pies = exemplars(wd, method, s)
    if pies is not None:
      row["pies"] = int(pies.count)
      if wd.minority:
        row["pies_minority"] = int(np.asarray(pies.class_counts)[list(wd.minority)].sum())
    rows.append(row)
  return rows


def _aggregate(method, sparsity, seeds, per_seed) -> dict[str, Any]:
  row: dict[str, Any] = {"method": method, "sparsity": float(sparsity), "seeds": list(seeds)}
  for key, _, _ in SUMMARY_COLUMNS:
    vals = [m[key] for m in per_seed if key in m]
    if vals:
      row[f"{key}_mean"] = float(np.mean(vals))
      row[f"{key}_std"] = float(np.std(vals))
  for key in ("class_accuracy", "class_change", "precision_change", "excess_loss",
              "dense_class_accuracy"):
    vals = [m[key] for m in per_seed if key in m]
    if vals:
      row[f"{key}_mean"] = np.mean(vals, axis=0).tolist()
      row[f"{key}_std"] = np.std(vals, axis=0).tolist()
  row["per_seed"] = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in m.items()}
                     for m in per_seed]
  return row


# ----------------------------------------------------------------------------- formatting


def mean_std(row: dict, key: str, digits: int = 3, signed: bool = False) -> str:
  """``row[key + "_mean"] ± row[key + "_std"]`` as text; ``—`` when the row lacks ``key``.

  Examples:
    >>> from train.summary import mean_std
    >>> mean_std({"drop_mean": 0.25, "drop_std": 0.01}, "drop", signed=True)
    '+0.250 ± 0.010'
  """
  if f"{key}_mean" not in row:
    return "—"
  mean, std = row[f"{key}_mean"], row[f"{key}_std"]
  if np.isnan(mean):
    return "nan"
  sign = "+" if signed else ""
  return f"{mean:{sign}.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A markdown table (cells formatted with ``str``).

  Examples:
    >>> from train.summary import markdown_table
    >>> print(markdown_table(["a", "b"], [[1, 2]]))
    | a | b |
    |---|---|
    | 1 | 2 |
  """
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def summary_table(rows: Sequence[dict], *, with_minority: bool = True) -> str:
  """The summary rows of :func:`summary_rows` as a markdown table (mean ± std over seeds)."""
  cols = [c for c in SUMMARY_COLUMNS
          if with_minority or not any(w in c[0] for w in ("minority", "majority", "disparity"))]
  header = ["method", "sparsity", "seeds"] + [h for _, h, _ in cols] + ["PIEs"]
  if with_minority:
    header.append("PIEs in minority")
  body = []
  for r in rows:
    cells = [r["method"], f"{r['sparsity']:g}", str(len(r["seeds"]))]
    cells += [mean_std(r, k, signed=change) for k, _, change in cols]
    cells.append(str(r.get("pies", "—")))
    if with_minority:
      cells.append(str(r.get("pies_minority", "—")))
    body.append(cells)
  return markdown_table(header, body)


def class_names(wd: Workdir) -> list[str]:
  """The class labels as shown in tables and plots: minority classes marked ``*``."""
  return [f"{c}*" if c in wd.minority else str(c) for c in range(wd.num_classes)]


def per_class_table(wd: Workdir, row: dict) -> str:
  """Mean over seeds, per class: dense and pruned accuracy, Δ accuracy, Δ precision, excess
  loss."""
  names = class_names(wd)
  body = []
  for c in range(wd.num_classes):
    body.append([names[c], f"{row['dense_class_accuracy_mean'][c]:.3f}",
                 f"{row['class_accuracy_mean'][c]:.3f}",
                 f"{row['class_change_mean'][c]:+.3f} ± {row['class_change_std'][c]:.3f}",
                 f"{row['precision_change_mean'][c]:+.3f}",
                 f"{row['excess_loss_mean'][c]:+.3f}"])
  return markdown_table(["class", "dense acc", "pruned acc", "Δ acc (± std)", "Δ precision",
                         "excess loss"], body)
