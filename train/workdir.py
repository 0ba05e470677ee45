"""The work directory as a contract: one config per run, atomic files, an append-only log.

A run's directory (``--workdir``) belongs to one config. :func:`check_config` compares the
config of a new invocation with the ``config.json`` the run wrote and refuses, before anything
in the directory is touched, to continue with a different one, listing every key that differs
(``num_steps: 600 -> 900``). Keys that cannot change a result (:data:`EXEMPT`: ``progress``)
are not compared. To continue a run under new values on purpose, name the keys in
``config.allow_config_change`` (``--config.allow_config_change=num_steps,pruning.sparsity``;
``*``: any key); :func:`write_config` then records the change in ``config_changes.jsonl``
(one JSON line per change: time, ``{key: [old, new]}``) and the report notes it
(:func:`change_notes`).

Files are written with :func:`train.runs.atomic_open` (temporary file in the same directory,
``fsync``, ``os.replace``), so a reader or a killed process never sees half a ``config.json``
or ``params.npz``.

``metrics.jsonl`` (:class:`MetricsLog`) is only ever appended to. A run resumed from the
checkpoint at step ``s`` cuts the file after the last line it keeps (lines with ``step <= s``,
never a previous ``final`` line): the lines a killed run wrote after its last checkpoint,
which the resumed run writes again. It does so at its first write, i.e. only after the
checkpoint was restored: a rerun that fails before leaves the file as it was. A torn last
line (what a kill in the middle of a write leaves) is tolerated by
:func:`train.runs.read_metrics` and cut off on resume, with a warning naming the file; a
damaged line elsewhere is an error naming the file and the line.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from train import runs
from train.runs import CONFIG, METRICS

__all__ = ["CONFIG_CHANGES", "EXEMPT", "RUN_FILES", "ConfigChange", "ConfigMismatchError",
           "MetricsLog", "change_notes", "check_config", "config_diff", "write_config"]

CONFIG_CHANGES = "config_changes.jsonl"
"""One JSON line per allowed config change of a resumed run."""
EXEMPT = ("progress", "allow_config_change")
"""Config keys that may differ between the invocations of one run (they change no result)."""
RUN_FILES = (METRICS, runs.PARAMS, runs.PREDICTIONS, "report.md")
"""Files whose presence (or a ``checkpoints*`` directory) marks a directory as a run's."""

_MISSING = "<missing>"


class ConfigMismatchError(ValueError):
  """A workdir holds a run of another config; nothing in it was changed.

  Attributes:
    differences: ``{key: (old, new)}`` of the keys that differ and were not allowed.
  """

  def __init__(self, message: str, differences: dict[str, tuple[Any, Any]]):
    super().__init__(message)
    self.differences = differences


@dataclasses.dataclass(frozen=True)
class ConfigChange:
  """An allowed change of a resumed run's config.

  Attributes:
    changed: ``{key: (old, new)}``; ``"<missing>"`` for a key one side lacks.
    allowed: the value of ``config.allow_config_change`` that allowed it.
  """

  changed: dict[str, tuple[Any, Any]]
  allowed: str


# ----------------------------------------------------------------------------- the config contract


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping) and tree:
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _as_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  if isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=str))


def config_diff(old: Mapping[str, Any] | ml_collections.ConfigDict,
                new: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """``{dotted key: (old, new)}`` of every leaf that differs (``"<missing>"``: absent).

  Both sides are compared as JSON (tuples and lists alike; floats exactly); keys in
  :data:`EXEMPT` are skipped.

  Examples:
    >>> from train import workdir
    >>> workdir.config_diff({"a": 1, "p": {"s": 0.9, "m": "gmp"}, "progress": True},
    ...                     {"a": 1, "p": {"s": 0.5, "m": "gmp"}, "progress": False})
    {'p.s': (0.9, 0.5)}
  """
  a, b = _flatten(_as_dict(old)), _flatten(_as_dict(new))
  out = {}
  for key in sorted(set(a) | set(b)):
    if key.split(".")[0] in EXEMPT:
      continue
    x, y = a.get(key, _MISSING), b.get(key, _MISSING)
    if x != y or isinstance(x, bool) != isinstance(y, bool):  # True == 1 in Python
      out[key] = (x, y)
  return out


def _allowed(spec: Any) -> tuple[str, ...]:
  if spec is None or spec is False:
    return ()
  if isinstance(spec, str):
    return tuple(k for k in spec.replace(",", " ").split() if k)
  return tuple(str(k) for k in spec)


def _is_allowed(key: str, allowed: tuple[str, ...]) -> bool:
  return any(a == "*" or key == a or key.startswith(a + ".") for a in allowed)


def _has_run_files(path: str) -> list[str]:
  if not os.path.isdir(path):
    return []
  return sorted(n for n in os.listdir(path) if n in RUN_FILES or n.startswith("checkpoints"))


def check_config(workdir: str | os.PathLike,
                 config: ml_collections.ConfigDict) -> ConfigChange | None:
  """Checks that ``config`` may continue the run in ``workdir``; reads, never writes.

  A directory without ``config.json`` and without run files is a new run. Otherwise the
  config must equal the one in ``config.json`` except for :data:`EXEMPT` keys and the keys
  named in ``config.allow_config_change`` (comma-separated; a section name covers its keys;
  ``*`` any key).

  Args:
    workdir: the run's directory (need not exist).
    config: the config of this invocation.

  Returns:
    None (new run, or the same config), or the :class:`ConfigChange` to record with
    :func:`write_config`.

  Raises:
    ConfigMismatchError: naming every key that differs and is not allowed, or saying that the
      directory holds run files but no ``config.json``.

  Examples:
    >>> import tempfile, ml_collections
    >>> from train import workdir
    >>> d = tempfile.mkdtemp()
    >>> config = ml_collections.ConfigDict({"num_steps": 600, "allow_config_change": ""})
    >>> workdir.write_config(d, config, workdir.check_config(d, config))
    >>> config.num_steps = 900
    >>> try:
    ...   workdir.check_config(d, config)
    ... except workdir.ConfigMismatchError as e:
    ...   print(str(e).splitlines()[1])
      num_steps: 600 -> 900
    >>> config.allow_config_change = "num_steps"
    >>> workdir.check_config(d, config).changed
    {'num_steps': (600, 900)}
  """
  path = os.fspath(workdir)
  allowed = _allowed(config.get("allow_config_change"))
  config_path = os.path.join(path, CONFIG)
  if not os.path.exists(config_path):
    found = _has_run_files(path)
    if not found or "*" in allowed:
      return None
    raise ConfigMismatchError(
        f"workdir: {path} holds run files ({', '.join(found)}) but no {CONFIG}, so whether "
        "they belong to this config cannot be checked; nothing was changed. Use another "
        "--workdir, or --config.allow_config_change='*' to continue them with this config.",
        {})
  try:
    with open(config_path, encoding="utf-8") as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigMismatchError(f"workdir: {config_path} cannot be read ({e}); nothing was "
                              "changed. Use another --workdir.", {}) from e
  diff = config_diff(stored, config)
  if not diff:
    return None
  refused = {k: v for k, v in diff.items() if not _is_allowed(k, allowed)}
  if refused:
    lines = "\n".join(f"  {k}: {_show(a)} -> {_show(b)}" for k, (a, b) in refused.items())
    raise ConfigMismatchError(
        f"workdir: {path} holds a run of another config ({CONFIG}); these keys differ:\n"
        f"{lines}\nNothing in the workdir was changed. Use another --workdir for a new run, "
        "or continue this one under the new values on purpose with "
        f"--config.allow_config_change={','.join(sorted(set(allowed) | set(refused)))} "
        f"(recorded in {CONFIG_CHANGES}).", refused)
  return ConfigChange(diff, ",".join(allowed))


def _show(v: Any) -> str:
  return v if v == _MISSING else json.dumps(v)


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict,
                 change: ConfigChange | None = None) -> None:
  """Writes ``config.json`` atomically and appends ``change`` (if any) to
  ``config_changes.jsonl``; call it after the config has been validated.

  Examples:
    >>> import json, pathlib, tempfile, ml_collections
    >>> from train import workdir
    >>> d = tempfile.mkdtemp()
    >>> workdir.write_config(d, ml_collections.ConfigDict({"seed": 0}))
    >>> json.loads((pathlib.Path(d) / "config.json").read_text())
    {'seed': 0}
  """
  path = os.fspath(workdir)
  os.makedirs(path, exist_ok=True)
  if change is not None:
    line = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "allow_config_change": change.allowed,
            "changed": {k: list(v) for k, v in change.changed.items()}}
    with open(os.path.join(path, CONFIG_CHANGES), "a", encoding="utf-8") as f:
      f.write(json.dumps(line) + "\n")
      f.flush()
      os.fsync(f.fileno())
  runs.write_config(path, config)


def change_notes(change: ConfigChange | None) -> list[str]:
  """Report lines for an allowed config change (none for None).

  Examples:
    >>> from train import workdir
    >>> workdir.change_notes(workdir.ConfigChange({"num_steps": (600, 900)}, "num_steps"))
    ['resumed with a changed config (allow_config_change=num_steps): `num_steps` 600 -> 900']
  """
  if change is None:
    return []
  items = ", ".join(f"`{k}` {_show(a)} -> {_show(b)}" for k, (a, b) in change.changed.items())
  return [f"resumed with a changed config (allow_config_change={change.allowed}): {items}"]


# ----------------------------------------------------------------------------- metrics.jsonl


def _jsonable(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "__array__"):
    a = np.asarray(v)
    return a.item() if a.ndim == 0 else a.tolist()
  return v


class MetricsLog:
  """Appends metrics to ``metrics.jsonl`` (and TensorBoard); resumes by cutting the tail.

  The same ``write`` as :class:`train.reporting.MetricsWriter`, but nothing happens to the
  file before the first :meth:`write`: call :meth:`resume` with the restored step first, and
  the lines after it (and a torn last line, with a warning) are cut off then, so a run that
  fails before writing anything leaves the file as it was.

  Args:
    workdir: the run's directory.
    tensorboard: write TensorBoard event files too (``workdir/tensorboard``; events after the
      resumed step are purged).
    enabled: write anything at all (False on every JAX process but the first).

  Examples:
    >>> import tempfile
    >>> from train import workdir
    >>> d = tempfile.mkdtemp()
    >>> with workdir.MetricsLog(d, tensorboard=False) as log:
    ...   log.write(10, {"loss": 1.5})
    ...   log.write(20, {"loss": 1.0})
    >>> with workdir.MetricsLog(d, tensorboard=False) as log:
    ...   log.resume(10)
    ...   log.write(20, {"loss": 0.5})
    >>> from train import runs
    >>> [(m["step"], m["loss"]) for m in runs.read_metrics(d)]
    [(10, 1.5), (20, 0.5)]
  """

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True,
               enabled: bool = True):
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, METRICS)
    self.enabled = enabled
    self._tensorboard = tensorboard
    self._resume = 0
    self._file = self._tb = None

  def resume(self, step: int) -> None:
    """The run continues after ``step`` (its restored checkpoint): lines with a larger step
    and earlier ``final`` lines are cut off at the next :meth:`write`."""
    self._resume = int(step)
    if self._file is not None:  # a later phase restored: cut again, reopen
      self.close()

  def _open(self) -> None:
    os.makedirs(self.workdir, exist_ok=True)
    if os.path.exists(self.path):
      self._cut(self._resume)
    self._file = open(self.path, "a", encoding="utf-8")
    if self._tensorboard and self._tb is None:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"),
                               purge_step=self._resume + 1 if self._resume else None)

  def _cut(self, step: int) -> None:
    lines, torn = runs.metrics_lines(self.path)
    if torn is not None:
      warnings.warn(f"{self.path}: cut off a torn last line at byte {torn} (a run was killed "
                    "while writing it)", stacklevel=3)
    keep = [m.get("step", 0) <= step and not m.get("final") for _, m in lines]
    first_dropped = keep.index(False) if False in keep else len(keep)
    if all(not k for k in keep[first_dropped:]):  # the kept lines are a prefix: truncate
      end = lines[first_dropped][0] if first_dropped < len(lines) else (
          torn if torn is not None else os.path.getsize(self.path))
      if end != os.path.getsize(self.path):
        with open(self.path, "r+b") as f:
          f.truncate(end)
          f.flush()
          os.fsync(f.fileno())
      return
    with runs.atomic_open(self.path, encoding="utf-8") as f:  # out-of-order lines: rewrite
      f.writelines(json.dumps(m) + "\n" for (_, m), k in zip(lines, keep, strict=True) if k)

  def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "") -> None:
    """Appends one line ``{"step": step, **metrics}``; numbers also go to TensorBoard.

    Args:
      step: the global step.
      metrics: name -> number (or bool/str, kept in the JSON line only).
      prefix: TensorBoard tag prefix, e.g. ``"train/"``.
    """
    if not self.enabled:
      return
    if self._file is None:
      self._open()
    line = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(line) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in line.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(prefix + k, v, int(step))

  def close(self) -> None:
    """Flushes and closes the file (TensorBoard stays open until :meth:`__exit__`)."""
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self) -> MetricsLog:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None
