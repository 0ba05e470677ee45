"""The on-disk format of runs: every file a run writes that something else reads.

This module owns the file names and the functions that write and read them. Writers:
:func:`train.train.train_and_evaluate` (one run of ``python -m train``),
:class:`train.reporting.MetricsWriter` (its metrics) and :mod:`benchmarks.fairness` (an
experiment directory). Reader: :mod:`train.analyze`, through :func:`load_workdir`.

A run of the main loop (``python -m train --workdir DIR``)
----------------------------------------------------------
``config.json`` (:data:`CONFIG`; :func:`write_config`)
    The experiment's ``ml_collections.ConfigDict`` as JSON. Read: ``dataset``, ``data_dir``,
    ``model``, ``model_kwargs``, ``seed``, ``imbalance``, ``pruning.{method, sparsity,
    structure}``, ``mitigation.{constrained, epsilon, dual_lr, groups}``.
``metrics.jsonl`` (:data:`METRICS`; :func:`read_metrics`)
    One JSON object per line, each with a ``step`` (the lines are described in
    :mod:`train.reporting`).
``params.npz`` (:data:`PARAMS`; :func:`save_params`)
    The final model state (params and BatchNorm statistics), one array per path.
``predictions.npz`` (:data:`PREDICTIONS`; :func:`save_run_file`)
    A run file (below) of the final model, with ``label``: its test logits, masks, params and
    the rest of the model state.
``predictions_before_mitigation.npz`` (:data:`PREDICTIONS_BEFORE_MITIGATION`)
    The same for the pruned model at the start of the ``mitigate`` phase, when there is one.

Checkpoints (``checkpoints*/``, :mod:`train.checkpointing`), ``report.md``, the PNGs and
``tensorboard/`` (:mod:`train.reporting`) are written for people and for resuming, and are not
read by anything else.

An experiment directory (``runs.json`` present; :mod:`benchmarks.fairness`)
----------------------------------------------------------------------------
``config.json`` (:func:`start_experiment`)
    A JSON object. Read: ``num_classes`` (int, required); ``model``, ``model_kwargs``,
    ``input_shape`` (to rebuild the model with :func:`train.models.create_model` for layer
    sensitivity; optional); ``minority_classes`` (list of ints; optional, enables the
    minority/majority columns); ``keep_dense`` (paths never pruned; optional);
    ``reference_method`` (default ``"dense"``); ``methods`` (optional display order).
    Everything else is kept as a record of the run.
``test_data.npz`` (:data:`TEST_DATA`)
    ``x``: float32 ``(n, *input_shape)``; ``label``: int ``(n,)`` — the evaluation set, in the
    order of every run's logits.
``runs.json`` (:data:`INDEX`; :func:`add_run`)
    A list of records ``{"method": str, "sparsity": float, "seed": int, "file": str, ...}``;
    ``file`` is relative to the directory. The reference method (dense) has sparsity 0. A
    pruned run is compared with the reference run of the same seed.
``runs/*.npz``
    One run file per record.

Run files (``.npz``; :func:`save_run_file`, :func:`read_run_file`)
------------------------------------------------------------------
``logits``: float32 ``(n, num_classes)`` on the test examples (required);
``label``: int32 ``(n,)`` the labels the logits are for (checked when present);
``masks/<path>``: bool arrays of the pruned leaves (keep = True), paths as in
:func:`jaxprune._tree.path_str` (e.g. ``masks/convs/1/kernel``; unpruned leaves left out);
``params/<path>``, ``rest/<path>``: the model's ``nnx.Param`` state and the rest (BatchNorm
statistics), needed for layer sensitivity (read from the reference run of the first seed);
``multipliers``: float32 ``(num_groups,)`` final Lagrange multipliers (mitigated runs);
``train_class_loss``: float32 ``(num_classes,)`` per-class training loss at the end.
All entries except ``logits`` are optional.

Names of the runs of the main loop
----------------------------------
:func:`load_workdir` names a run by its ``pruning.method`` (``dense`` is the reference,
sparsity 0; a structure other than unstructured is appended, e.g. ``oneshot 2:4``) at
``pruning.sparsity`` and ``seed``. A run with a ``mitigate`` phase gives two: the pruned model
before it (named by the method) and after it (``<method>+mitigation``, or ``<method>+finetune``
for the unconstrained control arm).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxprune import _tree

__all__ = [
    "CONFIG", "CONTROL_SUFFIX", "INDEX", "METRICS", "MITIGATION_SUFFIX", "PARAMS", "PREDICTIONS",
    "PREDICTIONS_BEFORE_MITIGATION", "TEST_DATA", "Run", "Workdir", "add_run", "flat_arrays",
    "load_workdir", "read_metrics", "read_run_file", "save_params", "save_run_file",
    "start_experiment", "where_excluding", "write_config",
]

CONFIG = "config.json"
METRICS = "metrics.jsonl"
PARAMS = "params.npz"
PREDICTIONS = "predictions.npz"
PREDICTIONS_BEFORE_MITIGATION = "predictions_before_mitigation.npz"
TEST_DATA = "test_data.npz"
INDEX = "runs.json"
MITIGATION_SUFFIX, CONTROL_SUFFIX = "+mitigation", "+finetune"
# Settings that must agree across the runs compared (else the comparison means nothing).
_SHARED_SETTINGS = ("dataset", "model", "imbalance")


# ----------------------------------------------------------------------------- writing


def flat_arrays(tree) -> dict[str, np.ndarray]:
  """``{path: numpy array}`` of a pytree, by :func:`jaxprune._tree.path_str` path.

  Examples:
    >>> import numpy as np
    >>> from train import runs
    >>> runs.flat_arrays({"layers": [{"kernel": np.ones((2, 2))}]})["layers/0/kernel"].shape
    (2, 2)
  """
  paths, leaves, _ = _tree.flatten(tree)
  return {p: np.asarray(leaf) for p, leaf in zip(paths, leaves, strict=True)}


def write_config(workdir: str | os.PathLike, config: Any) -> str:
  """Writes ``workdir/config.json``: an ``ml_collections.ConfigDict`` or a JSON-able mapping.

  Returns the file's path.

  Examples:
    >>> import json, pathlib, tempfile
    >>> from train import runs
    >>> path = runs.write_config(tempfile.mkdtemp(), {"num_classes": 3})
    >>> json.loads(pathlib.Path(path).read_text())
    {'num_classes': 3}
  """
  path = os.path.join(os.fspath(workdir), CONFIG)
  text = (config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
          else json.dumps(dict(config), indent=1))
  with open(path, "w") as f:
    f.write(text)
  return path


def save_params(workdir: str | os.PathLike, state) -> str:
  """Writes ``workdir/params.npz``: every array of ``state`` (e.g. ``nnx.state(model)``) by path.

  Examples:
    >>> import tempfile, numpy as np
    >>> from train import runs
    >>> sorted(np.load(runs.save_params(tempfile.mkdtemp(), {"w": np.ones(2)})).files)
    ['w']
  """
  path = os.path.join(os.fspath(workdir), PARAMS)
  np.savez(path, **flat_arrays(state))
  return path


def save_run_file(path: str | os.PathLike, *, logits, labels=None, params=None, rest=None,
                  masks=None, multipliers=None, train_class_loss=None) -> None:
  """Writes one run file (compressed ``.npz``, the format of the module docstring).

  ``params``, ``rest`` and ``masks`` are pytrees (stored by path; masks of unpruned leaves,
  scalars, are left out); ``labels`` are the evaluation labels the logits are for (written by
  the main loop, checked when read).

  Examples:
    >>> import os, tempfile, numpy as np
    >>> from train.runs import save_run_file
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
      arrays.update({f"{prefix}/{p}": v for p, v in flat_arrays(tree).items()})
  if masks is not None:
    arrays.update({f"masks/{p}": np.asarray(v, bool) for p, v in flat_arrays(masks).items()
                   if np.ndim(v) > 0})
  if multipliers is not None:
    arrays["multipliers"] = np.asarray(multipliers, np.float32)
  if train_class_loss is not None:
    arrays["train_class_loss"] = np.asarray(train_class_loss, np.float32)
  np.savez_compressed(path, **arrays)


def start_experiment(workdir: str | os.PathLike, config: Mapping[str, Any], x,
                     labels) -> None:
  """Starts an experiment directory: ``config.json``, ``test_data.npz``, no ``runs.json`` yet.

  An index left by an earlier experiment in ``workdir`` is removed (its runs are not this
  one's).

  Examples:
    >>> import tempfile, numpy as np
    >>> from train import runs
    >>> d = tempfile.mkdtemp()
    >>> runs.start_experiment(d, {"num_classes": 2}, np.zeros((3, 4)), np.array([0, 1, 1]))
    >>> rec = runs.add_run(d, method="dense", sparsity=0.0, seed=0, logits=np.zeros((3, 2)))
    >>> rec["file"], len(runs.load_workdir(d).runs)
    ('runs/dense_s0_seed0.npz', 1)
  """
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if os.path.exists(os.path.join(workdir, INDEX)):
    os.remove(os.path.join(workdir, INDEX))
  write_config(workdir, config)
  np.savez_compressed(os.path.join(workdir, TEST_DATA), x=np.asarray(x),
                      label=np.asarray(labels))


def add_run(workdir: str | os.PathLike, *, method: str, sparsity: float, seed: int, logits,
            params=None, rest=None, masks=None, multipliers=None, train_class_loss=None,
            extra: Mapping | None = None) -> dict:
  """Writes ``runs/<method>_s<sparsity>_seed<seed>.npz`` and records it in ``runs.json``.

  A record with the same file replaces the old one. ``extra`` (JSON-able) is kept in the
  record. Returns the record. See :func:`start_experiment` for an example.
  """
  workdir = os.fspath(workdir)
  os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
  name = f"{method.replace('+', '-')}_s{sparsity:g}_seed{seed}.npz"
  save_run_file(os.path.join(workdir, "runs", name), logits=logits, params=params, rest=rest,
                masks=masks, multipliers=multipliers, train_class_loss=train_class_loss)
  record = {"method": method, "sparsity": float(sparsity), "seed": int(seed),
            "file": f"runs/{name}", **dict(extra or {})}
  index_path = os.path.join(workdir, INDEX)
  index = []
  if os.path.exists(index_path):
    with open(index_path) as f:
      index = json.load(f)
  index = [r for r in index if r["file"] != record["file"]] + [record]
  with open(index_path, "w") as f:
    json.dump(index, f, indent=1)
  return record


# ----------------------------------------------------------------------------- reading


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The lines of ``workdir/metrics.jsonl`` as dicts ([] if there is no file).

  Examples:
    >>> import tempfile
    >>> from train import runs
    >>> runs.read_metrics(tempfile.mkdtemp())
    []
  """
  path = os.path.join(os.fspath(workdir), METRICS)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@functools.lru_cache(maxsize=16)
def where_excluding(paths: tuple[str, ...]) -> _tree.Where | None:
  """The default prunable-leaf rule minus the leaves at ``paths`` (None when ``paths`` is empty).

  What ``keep_dense`` in an experiment's ``config.json`` means. Cached, so equal ``paths``
  give the same function (and jitted steps are reused).

  Examples:
    >>> import jax.numpy as jnp
    >>> from train.runs import where_excluding
    >>> where = where_excluding(("convs/0/kernel",))
    >>> where("convs/0/kernel", jnp.ones((5, 1, 32))), where("head/kernel", jnp.ones((4, 2)))
    (False, True)
  """
  if not paths:
    return None
  skip = frozenset(paths)
  return lambda path, leaf: path not in skip and _tree.default_where(path, leaf)


@dataclasses.dataclass
class Run:
  """One trained model's outputs (one run file)."""
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
  """A loaded directory of runs (see the module docstring)."""
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

  @property
  def where(self) -> _tree.Where | None:
    """The prunable leaves of the runs (``keep_dense`` excluded), None for the default rule."""
    return where_excluding(tuple(self.config.get("keep_dense", ()) or ()))

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


def _prefixed(z, prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}


def read_run_file(path: str | os.PathLike, *, method: str, sparsity: float, seed: int,
                  num_classes: int | None = None, labels: np.ndarray | None = None,
                  record: Mapping | None = None) -> Run:
  """Reads one run file as a :class:`Run`.

  Args:
    path: the ``.npz``.
    method, sparsity, seed: what the run is (for the analysis).
    num_classes: if given, the logits must have this many columns.
    labels: if given, the file must hold ``label`` equal to them (runs of the main loop).
    record: kept as :attr:`Run.record` (default ``{"file": path}``).

  Raises:
    ValueError: naming the file, when the logits or labels do not match.

  Examples:
    >>> import os, tempfile, numpy as np
    >>> from train import runs
    >>> path = os.path.join(tempfile.mkdtemp(), "run.npz")
    >>> runs.save_run_file(path, logits=np.zeros((2, 3)), labels=[0, 2])
    >>> runs.read_run_file(path, method="dense", sparsity=0.0, seed=0,
    ...                    labels=np.array([0, 2])).logits.shape
    (2, 3)
  """
  path = os.fspath(path)
  with np.load(path) as z:
    logits = z["logits"]
    if num_classes is not None and logits.shape[1:] != (num_classes,):
      raise ValueError(f"{path}: logits have {logits.shape[1:]} classes, expected {num_classes}")
    if labels is not None and ("label" not in z.files or not np.array_equal(z["label"], labels)):
      raise ValueError(f"{path}: its labels differ from the test split's")
    return Run(method=method, sparsity=float(sparsity), seed=int(seed), logits=logits,
               masks=_prefixed(z, "masks/"), params=_prefixed(z, "params/"),
               rest=_prefixed(z, "rest/"), arrays={k: z[k] for k in z.files if "/" not in k},
               record=dict(record) if record is not None else {"file": path})


def load_workdir(path: str | os.PathLike) -> Workdir:
  """Reads a directory of runs: an experiment's ``runs.json`` and its files, or the
  ``python -m train`` runs under it.

  A directory with ``runs.json`` is read as the module docstring says. Any other directory is
  searched (recursively, itself included) for runs of the main loop: directories holding
  ``config.json`` and ``predictions.npz``, named as the module docstring says. Runs that name
  the same (method, sparsity, seed) must have the same logits (e.g. the pruned model before
  mitigation in a mitigated and a control run); they are read once. Their test inputs are read
  again from the dataset (``dataset``, ``data_dir`` of the configs).

  Raises:
    ValueError: a missing file or field; logits whose shape does not match the labels; no run
      found; runs of the main loop that differ in dataset, model or imbalance; two different
      runs under one name; labels that do not match the test split.

  Examples:
    >>> import json, pathlib, tempfile, numpy as np
    >>> from train.runs import load_workdir
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
  if not os.path.exists(os.path.join(path, INDEX)):
    return _load_train_runs(path)
  for name in (CONFIG, TEST_DATA, INDEX):
    if not os.path.exists(os.path.join(path, name)):
      raise ValueError(f"workdir: {path} has no {name} (see train.runs' docstring)")
  with open(os.path.join(path, CONFIG)) as f:
    config = json.load(f)
  if "num_classes" not in config:
    raise ValueError(f"workdir: {path}/config.json has no 'num_classes'")
  with np.load(os.path.join(path, TEST_DATA)) as z:
    x, labels = z["x"], z["label"].astype(np.int32)
  with open(os.path.join(path, INDEX)) as f:
    records = json.load(f)
  runs = []
  for i, rec in enumerate(records):
    for key in ("method", "sparsity", "seed", "file"):
      if key not in rec:
        raise ValueError(f"workdir: runs.json[{i}] has no '{key}'")
    run = read_run_file(os.path.join(path, rec["file"]), method=str(rec["method"]),
                        sparsity=rec["sparsity"], seed=rec["seed"], record=rec)
    if run.logits.shape != (len(labels), int(config["num_classes"])):
      raise ValueError(f"workdir: {rec['file']}/logits has shape {run.logits.shape}, expected "
                       f"({len(labels)}, {config['num_classes']})")
    runs.append(run)
  return Workdir(path=path, config=config, x=x, labels=labels, runs=runs)


def _test_split(config: dict) -> tuple[np.ndarray, np.ndarray]:
  """The test split of ``config["dataset"]`` in the order the main loop evaluates it."""
  from train import input_pipeline  # tensorflow-datasets: only for runs of the main loop

  ds = input_pipeline.get_datasets(config["dataset"], batch_size=1, seed=0,
                                   eval_batch_size=1000, data_dir=config.get("data_dir"),
                                   in_memory=False)
  batches = list(ds.test)
  return (np.concatenate([b["x"][b["mask"]] for b in batches]),
          np.concatenate([b["label"][b["mask"]] for b in batches]))


def _run_name(config: Mapping[str, Any]) -> tuple[str, float, int]:
  """``(method, sparsity, seed)`` of a run of the main loop (before any mitigation)."""
  method = config["pruning"]["method"]
  structure = config["pruning"].get("structure") if method in ("oneshot", "gmp") else None
  if structure and structure != "unstructured":
    method = f"{method} {structure}"  # e.g. "oneshot 2:4" (nm24.py), apart from unstructured
  sparsity = 0.0 if method == "dense" else float(config["pruning"]["sparsity"])
  return method, sparsity, int(config["seed"])


def _check_shared_settings(configs: Mapping[str, Mapping[str, Any]]) -> None:
  (first_dir, first), *_ = configs.items()
  for d, c in configs.items():
    for key in _SHARED_SETTINGS:
      a, b = c.get(key), first.get(key)
      if key == "model":
        a, b = (a, c["model_kwargs"].get(a)), (b, first["model_kwargs"].get(b))
      if a != b:
        raise ValueError(f"workdir: runs {first_dir} and {d} differ in `{key}` ({b} vs {a}); "
                         "compare runs of one setting only")


def _load_train_runs(path: str) -> Workdir:
  """The runs of ``python -m train`` found under ``path``, as one :class:`Workdir`."""
  found = sorted(root for root, _, files in os.walk(path)
                 if PREDICTIONS in files and CONFIG in files)
  if not found:
    raise ValueError(f"workdir: {path} has no {INDEX} and no run of `python -m train` "
                     f"(a directory with {CONFIG} and {PREDICTIONS}) under it")
  configs = {}
  for d in found:
    with open(os.path.join(d, CONFIG)) as f:
      configs[d] = json.load(f)
  _check_shared_settings(configs)
  first = configs[found[0]]
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
    method, sparsity, seed = _run_name(c)
    before = os.path.join(d, PREDICTIONS_BEFORE_MITIGATION)
    after_method = method
    if os.path.exists(before):
      add(read_run_file(before, method=method, sparsity=sparsity, seed=seed,
                        num_classes=num_classes, labels=labels))
      constrained = c.get("mitigation", {}).get("constrained", True)
      after_method = method + (MITIGATION_SUFFIX if constrained else CONTROL_SUFFIX)
      if constrained:
        mitigation = c["mitigation"]
    run = read_run_file(os.path.join(d, PREDICTIONS), method=after_method, sparsity=sparsity,
                        seed=seed, num_classes=num_classes, labels=labels)
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
