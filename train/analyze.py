"""What pruning cost, from a run directory: ``python -m train.analyze --workdir DIR``.

Reads the files below and writes ``DIR/analysis.md`` plus PNGs (``--out-dir`` to put them
elsewhere): a summary per method and sparsity (mean ± std over seeds), per-class change bars,
per-class tables, pruning-identified exemplars and their gallery, seed spread, accuracy vs
sparsity bands, a layer-sensitivity heatmap, mask overlap per layer across seeds and, when a
``pruned+mitigation`` method is present, the mitigation's before/after on every metric.

Two kinds of directory are read (:func:`load_workdir`):

* **runs of the main loop**: any directory under which ``python -m train`` runs live (each a
  directory with ``config.json`` and ``predictions.npz``; e.g. ``runs/fair/dense_0``,
  ``runs/fair/mitigated_0``, ...). A run is named by its ``pruning.method`` (``dense`` is the
  reference) at ``pruning.sparsity`` and ``seed``; a run with a ``mitigate`` phase (see
  ``train/configs/mitigation.py``) also gives the pruned model before it, and is named
  ``<method>+mitigation`` (or ``<method>+finetune`` for the unconstrained control) after it.
  The test inputs are read again from the dataset; minority classes are
  ``imbalance.classes``. All runs must share dataset, model and imbalance.
* **the format below**, written by :func:`train.fairness.save_run` (``runs.json`` present).

Run files are the same in both (:func:`save_run_file`).

On-disk format of ``train.fairness`` workdirs
---------------------------------------------
``config.json``
    A JSON object. Read: ``num_classes`` (int, required); ``model``, ``model_kwargs``,
    ``input_shape`` (to rebuild the model with :func:`train.models.create_model` for layer
    sensitivity; optional); ``minority_classes`` (list of ints; optional, enables the
    minority/majority columns); ``reference_method`` (default ``"dense"``); ``methods``
    (optional display order). Everything else is kept as a record of the run.
``test_data.npz``
    ``x``: float32 ``(n, *input_shape)``; ``label``: int ``(n,)`` — the evaluation set, in the
    order of every run's logits.
``runs.json``
    A list of records ``{"method": str, "sparsity": float, "seed": int, "file": str, ...}``;
    ``file`` is relative to the workdir. The reference method (dense) has sparsity 0. A
    pruned run is compared with the reference run of the same seed.
``runs/*.npz`` (one per record)
    ``logits``: float32 ``(n, num_classes)`` on ``test_data`` (required);
    ``masks/<path>``: bool arrays of the pruned leaves (keep = True), paths as in
    :func:`jaxprune._tree.path_str` (e.g. ``masks/convs/1/kernel``);
    ``params/<path>``, ``rest/<path>``: the model's ``nnx.Param`` state and the rest (BatchNorm
    statistics), needed for layer sensitivity (read from the reference run of the first seed);
    ``multipliers``: float32 ``(num_groups,)`` final Lagrange multipliers (mitigation runs);
    ``train_class_loss``: float32 ``(num_classes,)`` per-class training loss at the end;
    ``label``: int32 ``(n,)`` the labels the logits are for (checked when present).
    All entries except ``logits`` are optional.

References:
  Tran et al., "Pruning has a disparate impact on model accuracy", NeurIPS 2022.
  Hooker et al., "What Do Compressed Deep Neural Networks Forget?", arXiv:1911.05248, 2019.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from jaxprune import _tree, analysis

__all__ = ["Run", "Workdir", "analyze", "load_workdir", "main", "mitigation_arms",
           "mitigation_table", "save_run_file", "seed_metrics", "summary_rows"]

MITIGATED = "pruned+mitigation"
PRUNED = "pruned"
MITIGATION_SUFFIX, CONTROL_SUFFIX = "+mitigation", "+finetune"

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


@dataclasses.dataclass
class Run:
  """One trained model's outputs (one ``runs/*.npz``)."""
  method: str
  sparsity: float
  seed: int
  logits: np.ndarray
  masks: dict[str, np.ndarray]
  params: dict[str, np.ndarray]
  rest: dict[str, np.ndarray]
  arrays: dict[str, np.ndarray]
  record: dict[str, Any]


@dataclasses.dataclass
class Workdir:
  """A loaded run directory (see the module docstring)."""
  path: str
  config: dict[str, Any]
  x: np.ndarray
  labels: np.ndarray
  runs: list[Run]

  @property
  def num_classes(self) -> int:
    return int(self.config["num_classes"])

  @property
  def reference(self) -> str:
    return str(self.config.get("reference_method", "dense"))

  @property
  def minority(self) -> tuple[int, ...]:
    return tuple(int(c) for c in self.config.get("minority_classes", ()) or ())

  def arms(self) -> list[tuple[str, float]]:
    """``(method, sparsity)`` of every non-reference group of runs, in display order."""
    order = list(self.config.get("methods", []))
    keys = sorted({(r.method, r.sparsity) for r in self.runs if r.method != self.reference},
                  key=lambda k: (k[1], order.index(k[0]) if k[0] in order else len(order), k[0]))
    return keys

  def select(self, method: str, sparsity: float | None = None) -> list[Run]:
    """Runs of ``method`` (at ``sparsity``), sorted by seed."""
    return sorted((r for r in self.runs if r.method == method
                   and (sparsity is None or r.sparsity == sparsity)), key=lambda r: r.seed)

  def reference_run(self, seed: int) -> Run | None:
    found = [r for r in self.runs if r.method == self.reference and r.seed == seed]
    return found[0] if found else None


def _flat(tree) -> dict[str, np.ndarray]:
  paths, leaves, _ = _tree.flatten(tree)
  return {p: np.asarray(leaf) for p, leaf in zip(paths, leaves, strict=True)}


def save_run_file(path: str | os.PathLike, *, logits, labels=None, params=None, rest=None,
                  masks=None, multipliers=None, train_class_loss=None) -> None:
  """Writes one run's ``.npz`` in the format of the module docstring (compressed).

  ``params``, ``rest`` and ``masks`` are pytrees (stored by :func:`jaxprune._tree.path_str`
  path; masks of unpruned leaves, scalars, are left out); ``labels`` are the evaluation labels
  the logits are for (written by the main loop, checked when read).

  Examples:
    >>> import os, tempfile, numpy as np
    >>> from train.analyze import save_run_file
    >>> path = os.path.join(tempfile.mkdtemp(), "run.npz")
    >>> save_run_file(path, logits=np.zeros((2, 3)), masks={"w": np.array([True, False]),
    ...                                                     "b": np.bool_(True)})
    >>> sorted(np.load(path).files)
    ['logits', 'masks/w']
  """
  arrays = {"logits": np.asarray(logits, np.float32)}
  if labels is not None:
    arrays["label"] = np.asarray(labels, np.int32)
  for prefix, tree in (("params", params), ("rest", rest)):
    if tree is not None:
      arrays.update({f"{prefix}/{p}": v for p, v in _flat(tree).items()})
  if masks is not None:
    arrays.update({f"masks/{p}": np.asarray(v, bool) for p, v in _flat(masks).items()
                   if np.ndim(v) > 0})
  if multipliers is not None:
    arrays["multipliers"] = np.asarray(multipliers, np.float32)
  if train_class_loss is not None:
    arrays["train_class_loss"] = np.asarray(train_class_loss, np.float32)
  np.savez_compressed(path, **arrays)


def _prefixed(z, prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}


def load_workdir(path: str | os.PathLike) -> Workdir:
  """Reads a workdir: ``runs.json`` and its files, or the ``python -m train`` runs under it.

  A directory with ``runs.json`` is read as the module docstring says. Any other directory is
  searched (recursively, itself included) for runs of the main loop
  (:func:`_load_train_runs`).

  Raises:
    ValueError: a missing file or field, or logits whose shape does not match the labels.

  Examples:
    >>> import json, pathlib, tempfile, numpy as np
    >>> from train.analyze import load_workdir
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "runs").mkdir()
    >>> _ = (d / "config.json").write_text(json.dumps({"num_classes": 2}))
    >>> np.savez(d / "test_data.npz", x=np.zeros((3, 4)), label=np.array([0, 1, 1]))
    >>> np.savez(d / "runs/a.npz", logits=np.zeros((3, 2), np.float32))
    >>> _ = (d / "runs.json").write_text(json.dumps(
    ...     [{"method": "dense", "sparsity": 0, "seed": 0, "file": "runs/a.npz"}]))
    >>> w = load_workdir(d)
    >>> len(w.runs), w.num_classes
    (1, 2)
  """
  path = os.fspath(path)
  if not os.path.exists(os.path.join(path, "runs.json")):
    return _load_train_runs(path)
  for name in ("config.json", "test_data.npz", "runs.json"):
    if not os.path.exists(os.path.join(path, name)):
      raise ValueError(f"workdir: {path} has no {name} (see train.analyze's docstring)")
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  if "num_classes" not in config:
    raise ValueError(f"workdir: {path}/config.json has no 'num_classes'")
  with np.load(os.path.join(path, "test_data.npz")) as z:
    x, labels = z["x"], z["label"].astype(np.int32)
  with open(os.path.join(path, "runs.json")) as f:
    records = json.load(f)
  runs = []
  for i, rec in enumerate(records):
    for key in ("method", "sparsity", "seed", "file"):
      if key not in rec:
        raise ValueError(f"workdir: runs.json[{i}] has no '{key}'")
    with np.load(os.path.join(path, rec["file"])) as z:
      logits = z["logits"]
      if logits.shape != (len(labels), int(config["num_classes"])):
        raise ValueError(f"workdir: {rec['file']}/logits has shape {logits.shape}, expected "
                         f"({len(labels)}, {config['num_classes']})")
      runs.append(Run(method=str(rec["method"]), sparsity=float(rec["sparsity"]),
                      seed=int(rec["seed"]), logits=logits, masks=_prefixed(z, "masks/"),
                      params=_prefixed(z, "params/"), rest=_prefixed(z, "rest/"),
                      arrays={k: z[k] for k in z.files if "/" not in k}, record=dict(rec)))
  return Workdir(path=path, config=config, x=x, labels=labels, runs=runs)


PREDICTIONS = "predictions.npz"  # = train.train.PREDICTIONS (not imported: keeps this light)
BEFORE_MITIGATION = "predictions_before_mitigation.npz"
# Settings that must agree across the runs compared (else the comparison means nothing).
_SHARED_SETTINGS = ("dataset", "model", "imbalance")


def _run_from_file(file: str, method: str, sparsity: float, seed: int, num_classes: int | None,
                   labels: np.ndarray | None) -> Run:
  with np.load(file) as z:
    logits = z["logits"]
    if num_classes is not None and logits.shape[1:] != (num_classes,):
      raise ValueError(f"{file}: logits have {logits.shape[1:]} classes, expected {num_classes}")
    if labels is not None and ("label" not in z.files or not np.array_equal(z["label"], labels)):
      raise ValueError(f"{file}: its labels differ from the test split's")
    return Run(method=method, sparsity=sparsity, seed=seed, logits=logits,
               masks=_prefixed(z, "masks/"), params=_prefixed(z, "params/"),
               rest=_prefixed(z, "rest/"), arrays={k: z[k] for k in z.files if "/" not in k},
               record={"file": file})


def _test_split(config: dict) -> tuple[np.ndarray, np.ndarray]:
  """The test split of ``config["dataset"]`` in the order the main loop evaluates it."""
  from train import input_pipeline

  ds = input_pipeline.get_datasets(config["dataset"], batch_size=1, seed=0,
                                   eval_batch_size=1000, data_dir=config.get("data_dir"),
                                   in_memory=False)
  batches = list(ds.test)
  return (np.concatenate([b["x"][b["mask"]] for b in batches]),
          np.concatenate([b["label"][b["mask"]] for b in batches]))


def _load_train_runs(path: str) -> Workdir:
  """The runs of ``python -m train`` found under ``path`` (each a directory holding
  ``config.json`` and ``predictions.npz``), as one :class:`Workdir`.

  Each run gives a :class:`Run` named by its ``pruning.method`` (``dense`` is the reference,
  sparsity 0; a structure other than unstructured is appended, e.g. ``oneshot 2:4``) at
  ``pruning.sparsity`` and ``seed``. A run with a ``mitigate`` phase gives two:
  the pruned model before it (``predictions_before_mitigation.npz``, named by the method) and
  after it (``<method>+mitigation``, or ``<method>+finetune`` for the unconstrained control
  arm). Runs that name the same (method, sparsity, seed) must have the same logits (e.g. the
  pruned model before mitigation in a mitigated and a control run); they are read once. The
  test inputs are read from the dataset (``dataset``, ``data_dir`` of the configs).

  Raises:
    ValueError: no run found; runs that differ in dataset, model or imbalance; two different
      runs under one name; labels that do not match the test split.
  """
  found = sorted(root for root, _, files in os.walk(path)
                 if PREDICTIONS in files and "config.json" in files)
  if not found:
    raise ValueError(f"workdir: {path} has no runs.json and no run of `python -m train` "
                     f"(a directory with config.json and {PREDICTIONS}) under it")
  configs = {}
  for d in found:
    with open(os.path.join(d, "config.json")) as f:
      configs[d] = json.load(f)
  first = configs[found[0]]
  for d, c in configs.items():
    for key in _SHARED_SETTINGS:
      a, b = c.get(key), first.get(key)
      if key == "model":
        a, b = (a, c["model_kwargs"].get(a)), (b, first["model_kwargs"].get(b))
      if a != b:
        raise ValueError(f"workdir: runs {found[0]} and {d} differ in `{key}` ({b} vs {a}); "
                         "compare runs of one setting only")
  x, labels = _test_split(first)
  runs: dict[tuple[str, float, int], Run] = {}

  def add(run: Run) -> None:
    key = (run.method, run.sparsity, run.seed)
    if key in runs:
      if not np.allclose(runs[key].logits, run.logits, atol=1e-5):
        raise ValueError(f"workdir: {runs[key].record['file']} and {run.record['file']} are "
                         f"both {key} but their logits differ")
      return
    runs[key] = run

  mitigation = None
  num_classes = None
  for d in found:
    c = configs[d]
    method = c["pruning"]["method"]
    structure = c["pruning"].get("structure") if method in ("oneshot", "gmp") else None
    if structure and structure != "unstructured":
      method = f"{method} {structure}"  # e.g. "oneshot 2:4" (nm24.py), apart from unstructured
    sparsity = 0.0 if method == "dense" else float(c["pruning"]["sparsity"])
    seed = int(c["seed"])
    final = os.path.join(d, PREDICTIONS)
    before = os.path.join(d, BEFORE_MITIGATION)
    after_method = method
    if os.path.exists(before):
      add(_run_from_file(before, method, sparsity, seed, num_classes, labels))
      constrained = c.get("mitigation", {}).get("constrained", True)
      after_method = method + ("+mitigation" if constrained else "+finetune")
      if constrained:
        mitigation = c["mitigation"]
    run = _run_from_file(final, after_method, sparsity, seed, num_classes, labels)
    num_classes = run.logits.shape[1]
    add(run)
  imbalance = first.get("imbalance") or {}
  config = {"num_classes": num_classes, "dataset": first["dataset"], "model": first["model"],
            "model_kwargs": first["model_kwargs"].get(first["model"], {}),
            "input_shape": list(x.shape[1:]),
            "minority_classes": list(imbalance.get("classes") or []),
            "keep_fraction": imbalance.get("keep_fraction"), "reference_method": "dense",
            "runs": found}
  if mitigation:
    config.update({k: mitigation[k] for k in ("epsilon", "dual_lr", "groups")})
  return Workdir(path=path, config=config, x=x, labels=labels, runs=list(runs.values()))


# ----------------------------------------------------------------------------- metrics


def _group_accuracy(logits, labels, classes) -> float:
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
    >>> from train.analyze import seed_metrics
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
      acc = _group_accuracy(logits, labels, classes)
      out[f"{name}_accuracy"] = acc
      out[f"{name}_drop"] = _group_accuracy(dense_logits, labels, classes) - acc
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
    out["minority_accuracy"] = _group_accuracy(logits, labels, list(minority))
    out["majority_accuracy"] = _group_accuracy(
        logits, labels, [c for c in range(num_classes) if c not in minority])
  out["class_accuracy"] = np.asarray(m.accuracy, np.float64)
  return out


def _pies(wd: Workdir, method: str, sparsity: float):
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
    pies = _pies(wd, method, s)
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


def _pm(row, key, digits=3, signed=False) -> str:
  if f"{key}_mean" not in row:
    return "—"
  mean, std = row[f"{key}_mean"], row[f"{key}_std"]
  if np.isnan(mean):
    return "nan"
  sign = "+" if signed else ""
  return f"{mean:{sign}.{digits}f} ± {std:.{digits}f}"


def _table(header, rows) -> str:
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
    cells += [_pm(r, k, signed=change) for k, _, change in cols]
    cells.append(str(r.get("pies", "—")))
    if with_minority:
      cells.append(str(r.get("pies_minority", "—")))
    body.append(cells)
  return _table(header, body)


def mitigation_arms(rows: Sequence[dict], method: str,
                    sparsity: float) -> tuple[dict | None, dict | None, dict | None]:
  """``(pruned, control, mitigated)`` summary rows of a ``<base>+mitigation`` method.

  ``pruned`` is ``<base>`` (the pruned model the mitigation started from, or in
  :mod:`train.fairness` the plainly fine-tuned one), ``control`` is ``<base>+finetune`` (the
  same fine-tuning without constraints) if present, else None.

  Examples:
    >>> from train.analyze import mitigation_arms
    >>> rows = [{"method": m, "sparsity": 0.9} for m in ("gmp", "gmp+mitigation")]
    >>> [r and r["method"] for r in mitigation_arms(rows, "gmp+mitigation", 0.9)]
    ['gmp', None, 'gmp+mitigation']
  """
  base = method[:-len(MITIGATION_SUFFIX)] if method.endswith(MITIGATION_SUFFIX) else method
  by = {(r["method"], r["sparsity"]): r for r in rows}
  return (by.get((base, sparsity)), by.get((base + CONTROL_SUFFIX, sparsity)),
          by.get((method, sparsity)))


def mitigation_table(rows: Sequence[dict], sparsity: float,
                     method: str = MITIGATED) -> str | None:
  """Every summary metric at ``sparsity``: dense, pruned (before), the unconstrained control
  (if any) and ``method`` (after), and the change the mitigation made (after minus control,
  or minus before when there is no control).

  Examples:
    >>> from train.analyze import mitigation_table
    >>> rows = [{"method": "gmp", "sparsity": 0.9, "accuracy_mean": 0.7, "accuracy_std": 0.0},
    ...         {"method": "gmp+mitigation", "sparsity": 0.9, "accuracy_mean": 0.75,
    ...          "accuracy_std": 0.01}]
    >>> print(mitigation_table(rows, 0.9, "gmp+mitigation"))
    | metric | dense | gmp (before) | gmp+mitigation (after) | after − before |
    |---|---|---|---|---|
    | accuracy | — | 0.700 ± 0.000 | 0.750 ± 0.010 | +0.050 |
  """
  before, control, after = mitigation_arms(rows, method, sparsity)
  if before is None or after is None:
    return None
  baseline = control if control is not None else before
  dense = rows[0] if rows and rows[0]["sparsity"] == 0.0 else {}
  body = []
  for key, header, change in SUMMARY_COLUMNS:
    if f"{key}_mean" not in before or f"{key}_mean" not in after:
      continue
    delta = after[f"{key}_mean"] - baseline[f"{key}_mean"]
    cells = [header, _pm(dense, key) if dense and not change else "—",
             _pm(before, key, signed=change)]
    cells += [_pm(control, key, signed=change)] if control is not None else []
    body.append(cells + [_pm(after, key, signed=change), f"{delta:+.3f}"])
  for key, header in (("pies", "PIEs vs dense population"),
                      ("pies_minority", "PIEs in minority classes")):
    if key in before and key in after and key in baseline:
      cells = [header, "—", str(before[key])]
      cells += [str(control[key])] if control is not None else []
      body.append(cells + [str(after[key]), f"{after[key] - baseline[key]:+d}"])
  header = ["metric", "dense", f"{before['method']} (before)"]
  header += [f"{control['method']} (control)"] if control is not None else []
  header += [f"{after['method']} (after)",
             "after − control" if control is not None else "after − before"]
  return _table(header, body)


def _class_names(wd: Workdir) -> list[str]:
  return [f"{c}*" if c in wd.minority else str(c) for c in range(wd.num_classes)]


def per_class_table(wd: Workdir, row: dict) -> str:
  """Mean over seeds, per class: dense and pruned accuracy, Δ accuracy, Δ precision, excess
  loss."""
  names = _class_names(wd)
  body = []
  for c in range(wd.num_classes):
    body.append([names[c], f"{row['dense_class_accuracy_mean'][c]:.3f}",
                 f"{row['class_accuracy_mean'][c]:.3f}",
                 f"{row['class_change_mean'][c]:+.3f} ± {row['class_change_std'][c]:.3f}",
                 f"{row['precision_change_mean'][c]:+.3f}",
                 f"{row['excess_loss_mean'][c]:+.3f}"])
  return _table(["class", "dense acc", "pruned acc", "Δ acc (± std)", "Δ precision",
                 "excess loss"], body)


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
  ax.set_xticks(xs, _class_names(wd))
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


def _sensitivity(wd: Workdir, sparsities=(0.5, 0.8, 0.9, 0.95)):
  """Layer sensitivity of the first seed's reference model, or None without params/model."""
  ref = wd.select(wd.reference)
  if not ref or not ref[0].params or "model" not in wd.config:
    return None
  from flax import nnx

  from train import fairness, models
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
  logits_fn = fairness._eval_fn(graphdef)
  x, labels = wd.x, wd.labels
  minority = np.isin(labels, list(wd.minority)) if wd.minority else None

  def evaluate(flat):
    params = jax.tree.unflatten(p_def, [flat[p] for p in p_paths])
    logits = np.asarray(logits_fn(params, rest, x))
    pred = np.argmax(logits, -1)
    out = {"accuracy": float(np.mean(pred == labels)),
           "loss": float(np.mean(optax.softmax_cross_entropy_with_integer_labels(
               logits, labels)))}
    if minority is not None:
      out["minority_accuracy"] = float(np.mean(pred[minority] == labels[minority]))
    return out

  flat = {p: run.params[p] for p in p_paths}
  where = None
  keep_dense = tuple(cfg.get("keep_dense", ()) or ())
  if keep_dense:
    where = fairness.where_excluding(keep_dense)
  return analysis.layer_sensitivity(flat, evaluate, sparsities, where=where)


# ----------------------------------------------------------------------------- report


def _same_masks(runs_a: Sequence[Run], runs_b: Sequence[Run]) -> bool:
  if [r.seed for r in runs_a] != [r.seed for r in runs_b]:
    return False
  return all(a.masks.keys() == b.masks.keys()
             and all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
             for a, b in zip(runs_a, runs_b))


def analyze(workdir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
            prefix: str = "") -> str:
  """Writes ``analysis.md`` and the PNGs for a run directory; returns the markdown's path.

  Args:
    workdir: a directory in the format of the module docstring.
    out_dir: where to write (default: ``workdir``).
    prefix: prepended to every output file name (e.g. ``"fairness_"``).

  Returns:
    The path of the markdown file.

  Examples:
    See ``tests/test_fairness.py`` (a synthetic workdir) and ``benchmarks/fairness.py``.
  """
  wd = load_workdir(workdir)
  out_dir = os.fspath(out_dir or workdir)
  os.makedirs(out_dir, exist_ok=True)
  out = lambda name: os.path.join(out_dir, prefix + name)
  rows = summary_rows(wd)
  cfg = wd.config
  md = [f"# What pruning cost — {os.path.basename(os.path.abspath(workdir))}", ""]
  desc = [f"model {cfg['model']}" if "model" in cfg else None,
          f"dataset {cfg['dataset']}" if "dataset" in cfg else None,
          f"minority classes {list(wd.minority)} (marked *) kept at "
          f"{cfg.get('keep_fraction')} of their training examples" if wd.minority else None,
          f"train class counts {cfg['train_class_counts']}" if "train_class_counts" in cfg
          else None,
          f"{len(wd.labels)} test examples"]
  md += ["; ".join(d for d in desc if d) + ".", ""]
  md += ["## Summary", "",
         "Mean ± std over seeds. Drops are dense minus pruned accuracy of the same seed "
         "(positive = pruning hurt). *Worst-class drop*: the largest per-class drop; *gap*: "
         "largest minus smallest per-class drop; *excess loss*: pruned minus dense test "
         "cross-entropy, averaged over the classes of the group (Tran et al., 2022). PIEs: "
         "test examples whose modal prediction differs between the dense and the pruned "
         "population of seeds (Hooker et al., 2019).", "",
         summary_table(rows, with_minority=bool(wd.minority)), ""]

  sparsities = sorted({s for _, s in wd.arms()})
  mitigated = sorted({m for m, _ in wd.arms() if m.endswith(MITIGATION_SUFFIX)})
  if mitigated:
    md += ["## Mitigation: before / after", "",
           f"Fine-tuning of the pruned model, masks fixed, under per-group loss constraints "
           f"`L_g − L ≤ ε` (groups: {cfg.get('groups', 'classes')}, ε = "
           f"{cfg.get('epsilon', '?')}, dual step size {cfg.get('dual_lr', '?')}; Lagrange "
           "multipliers updated by projected dual ascent after every step). *Before*: the "
           "pruned model it starts from; *control* (when present): the same fine-tuning "
           "without constraints, same steps and batches.", ""]
    for method in mitigated:
      for s in sparsities:
        t = mitigation_table(rows, s, method)
        if t:
          md += [f"{method}, sparsity {s:g}:", "", t, ""]
      lam = [r.arrays["multipliers"] for r in wd.runs if r.method == method
             and "multipliers" in r.arrays and r.sparsity == sparsities[-1]]
      if lam:
        md += [f"Final multipliers λ of {method} (mean over seeds, sparsity "
               f"{sparsities[-1]:g}): " + ", ".join(f"{v:.3f}" for v in np.mean(lam, axis=0)),
               ""]
      base = method[:-len(MITIGATION_SUFFIX)]
      tl = {m: [r.arrays["train_class_loss"] for r in wd.select(m, sparsities[-1])
                if "train_class_loss" in r.arrays] for m in (base, method)}
      if all(tl.values()):
        names = _class_names(wd)
        md += ["Training loss per class at the end (mean over seeds):", "",
               _table(["method"] + names,
                      [[m] + [f"{v:.3f}" for v in np.mean(v_, axis=0)]
                       for m, v_ in tl.items()]), ""]

  if any("class_change_mean" in r for r in rows):
    path = plot_class_change(wd, rows, out("per_class_change.png"))
    md += ["## Per-class impact", "", f"![per-class change]({os.path.basename(path)})", ""]
    for r in rows[1:]:
      md += [f"### {r['method']}, sparsity {r['sparsity']:g}", "", per_class_table(wd, r), ""]

  md += ["## Pruning-identified exemplars", ""]
  for method, s in wd.arms():
    pies = _pies(wd, method, s)
    if pies is None:
      continue
    name = f"pies_{re.sub(r'[^A-Za-z0-9_.-]', '-', method)}_s{s:g}.png"
    x = wd.x if wd.x.ndim in (2, 3) or (wd.x.ndim == 4 and wd.x.shape[-1] in (1, 3, 4)) else None
    md += [f"### {method}, sparsity {s:g}", "", pies.to_markdown(), ""]
    if x is not None:
      analysis.plot_exemplar_gallery(x, wd.labels, pies.mask, pies.dense_modal, pies.pruned_modal,
                                     out(name), max_examples=12,
                                     class_names=_class_names(wd))
      md += [f"![PIEs]({prefix}{name})", ""]

  md += ["## Seed spread", ""]
  spread_rows = []
  for method, s in [(wd.reference, 0.0)] + wd.arms():
    runs = wd.select(method, s)
    if len(runs) < 1:
      continue
    acc = [float(np.mean(np.argmax(r.logits, -1) == wd.labels)) for r in runs]
    per_class = [analysis.per_group_metrics(r.logits, wd.labels, num_groups=wd.num_classes)
                 .accuracy for r in runs]
    sp = analysis.seed_spread(acc, np.asarray(per_class))
    widest = int(np.argmax(sp.per_class_max - sp.per_class_min))
    spread_rows.append([method, f"{s:g}", str(sp.num_seeds), f"{sp.mean:.4f}", f"{sp.std:.4f}",
                        f"{sp.min:.4f}", f"{sp.max:.4f}",
                        f"{_class_names(wd)[widest]} "
                        f"({sp.per_class_max[widest] - sp.per_class_min[widest]:.3f})"])
  md += [_table(["method", "sparsity", "seeds", "mean acc", "std", "min", "max",
                 "class with widest range"], spread_rows), ""]

  multi = [m for m in {m for m, _ in wd.arms()} if len({s for mm, s in wd.arms() if mm == m}) > 1]
  md += ["## Accuracy vs sparsity", ""]
  if multi:
    records = []
    for r in wd.runs:
      if r.method in multi:
        rec = {"method": r.method, "sparsity": r.sparsity, "seed": r.seed,
               "accuracy": float(np.mean(np.argmax(r.logits, -1) == wd.labels))}
        if wd.minority:
          rec["minority_accuracy"] = _group_accuracy(r.logits, wd.labels, list(wd.minority))
        records.append(rec)
    dense_acc = rows[0]["accuracy_mean"] if rows and rows[0]["method"] == wd.reference else None
    curves = analysis.accuracy_vs_sparsity(records)
    analysis.plot_accuracy_vs_sparsity(curves, out("accuracy_vs_sparsity.png"), dense=dense_acc,
                                       title="test accuracy, mean ± std over seeds")
    md += [curves.to_markdown(), "", f"![accuracy vs sparsity]({prefix}accuracy_vs_sparsity.png)",
           ""]
    if wd.minority:
      mcurves = analysis.accuracy_vs_sparsity(records, metric="minority_accuracy")
      dense_min = rows[0].get("minority_accuracy_mean") if rows else None
      analysis.plot_accuracy_vs_sparsity(mcurves, out("minority_accuracy_vs_sparsity.png"),
                                         dense=dense_min,
                                         title="minority-class accuracy, mean ± std over seeds")
      md += [mcurves.to_markdown(), "",
             f"![minority accuracy vs sparsity]({prefix}minority_accuracy_vs_sparsity.png)", ""]
  else:
    md += ["Only one sparsity per method: no curve (run with several, e.g. "
           "`python -m train.fairness --sparsities 0.5,0.8,0.9`).", ""]

  md += ["## Layer sensitivity", ""]
  sens = _sensitivity(wd)
  if sens is None:
    md += ["No dense params or model config in the workdir: skipped.", ""]
  else:
    analysis.plot_layer_sensitivity(sens, out("layer_sensitivity.png"))
    md += ["One layer of the dense model (first seed) pruned at a time by magnitude, nothing "
           "else changed, no fine-tuning.", "", sens.to_markdown("accuracy"), ""]
    if "minority_accuracy" in sens.values:
      md += [sens.to_markdown("minority_accuracy"), ""]
    md += [f"![layer sensitivity]({prefix}layer_sensitivity.png)", ""]

  md += ["## Mask overlap across seeds", ""]
  overlaps, densities, shown = {}, {}, {}
  for method, s in wd.arms():
    runs = [r for r in wd.select(method, s) if r.masks]
    same = [m for (m, s_), other in shown.items() if s_ == s and _same_masks(runs, other)]
    if same:
      md += [f"{method}, sparsity {s:g}: the same masks as {same[0]} (its fine-tuning keeps "
             "the masks fixed).", ""]
      continue
    shown[(method, s)] = runs
    if len(runs) >= 2:
      ov = analysis.pairwise_mask_overlap([r.masks for r in runs])
      overlaps[f"{method} s={s:g}"] = ov
      md += [f"### {method}, sparsity {s:g} ({len(runs)} seeds)", "", ov.to_markdown(), ""]
      if s == max(sparsities):
        densities.update({p: float(np.mean(runs[0].masks[p])) for p in ov.mean})
  if overlaps:
    top = {k: v for k, v in overlaps.items() if k.endswith(f"s={max(sparsities):g}")}
    plot_mask_overlap(top, densities, out("mask_overlap.png"))
    md += ["Different seeds start from different dense models, so their masks are compared "
           "with what two random masks of the same density would share, `d / (2 − d)`.", "",
           f"![mask overlap]({prefix}mask_overlap.png)", ""]
  else:
    md += ["Fewer than two seeds with masks: skipped.", ""]

  path = out("analysis.md")
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
