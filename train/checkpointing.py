"""The one adapter around orbax-checkpoint (V1 API) that ``train/`` uses.

orbax's V1 API (``from orbax.checkpoint import v1 as ocp``) still lives under
``orbax.checkpoint.experimental`` in 0.12.x; keeping every call to it in this module means one
file changes when it moves.

What a checkpoint is: one pytree ``state`` per step, typically::

    {"model": nnx.state(model), "opt": nnx.state(optimizer), "step": step,
     "data": {"seed": seed}}

Leaves may be ``jax.Array`` (including 0-d bool), ``np.ndarray``, ``int``, ``float``, ``str``;
containers may be dicts, lists, tuples, NamedTuples (optax and jaxprune states) and
``nnx.State``. (``np.bool_`` / ``np.int32`` *scalars* are not accepted by orbax; use 0-d arrays.)
The input pipeline needs no saved iterator state: its batch at step ``t`` is a pure function of
``(seed, t)`` (see :mod:`train.input_pipeline`), so storing the step is enough to resume.

Guarantees (from orbax, checked in ``tests/test_checkpointing.py``):

* **Atomic.** orbax writes a step into ``<step>.orbax-checkpoint-tmp*`` and renames it to
  ``<step>`` only when every file is written (on GCS it writes a commit file instead). A
  process killed mid-save leaves only a temporary directory, which is ignored (and deleted
  when a :class:`Checkpoints` is next opened), so :meth:`Checkpoints.latest_step` and
  :meth:`Checkpoints.restore` see the previous complete step.
* **Blocking saves.** :meth:`Checkpoints.save` returns after the step is committed
  (``ocp.training.Checkpointer.save`` waits for its own background write).
* **Shardings.** Restored arrays get the sharding of the abstract leaves. Abstract leaves
  without one (e.g. from ``nnx.eval_shape``) get ``default_sharding`` (first device), which also
  keeps orbax from warning "Sharding info not provided".

Integrity (checked in ``tests/test_checkpoint_integrity.py``). orbax 0.12.8 (TensorStore)
checksums the index of its zarr3 shards (``crc32c`` in ``index_codecs``) and its OCDBT b-tree
nodes, not the array bytes: a flipped byte in array data mostly loads without an error. So
:meth:`Checkpoints.save` stores, in the step's ``custom_metadata`` (committed atomically with
the step by orbax), the sha256 of every leaf's dtype, shape and bytes (:func:`tree_digests`),
and :meth:`Checkpoints.restore` recomputes them on the restored tree and compares. A
checkpoint that orbax cannot read, that holds another tree (other paths, shapes or dtypes), or
whose data differ from its checksums is never returned: ``restore()`` of the latest step then
falls back to the newest intact one, warns (:class:`CheckpointIntegrityWarning`) naming the bad
ones and moves them aside (``<step>.corrupt``), so that later saves of those steps are written
again; if no checkpoint is intact it raises :class:`CheckpointIntegrityError` naming each one
and why. A checkpoint saved without checksums (before this check existed) loads with a warning
that it is unverified. Arrays that are neither fully addressable nor fully replicated on this
process (sharded across processes) have no checksum (``None``): each process only sees its own
shards.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import warnings
from typing import Any

import jax
import numpy as np
from orbax.checkpoint import v1 as ocp

__all__ = ["CheckpointIntegrityError", "CheckpointIntegrityWarning", "Checkpoints",
           "abstract_like", "load_tree", "save_tree", "tree_digests"]

DIGESTS_KEY = "jaxprune_sha256"
"""The key of the per-leaf checksums in a step's ``custom_metadata``."""
METADATA_FILE = "_CHECKPOINT_METADATA"
"""orbax's per-step metadata file (JSON) that holds ``custom_metadata``."""
CORRUPT_SUFFIX = ".corrupt"
"""Appended to the directory of a checkpoint found corrupt when an older one was restored."""


class CheckpointIntegrityError(RuntimeError):
  """No checkpoint could be restored intact; the message names each one and what is wrong.

  Attributes:
    failures: ``{step: reason}``.
  """

  def __init__(self, message: str, failures: dict[int, str]):
    super().__init__(message)
    self.failures = failures


class CheckpointIntegrityWarning(UserWarning):
  """A checkpoint was skipped (corrupt) or loaded without checksums to verify it."""


def _default_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def abstract_like(tree: Any, *, default_sharding: jax.sharding.Sharding | None = None) -> Any:
  """The restore target orbax needs: arrays -> ``ShapeDtypeStruct`` with a sharding.

  * ``jax.Array`` -> ``ShapeDtypeStruct`` with the array's own sharding;
  * ``ShapeDtypeStruct`` without a sharding (``nnx.eval_shape`` makes these) -> the same with
    ``default_sharding`` (default: the first device);
  * ``np.ndarray``, ``int``, ``float``, ``str`` are kept: orbax restores them as that type.

  Args:
    tree: a concrete state (e.g. a freshly initialized one) or an abstract one.
    default_sharding: sharding for abstract leaves that have none.

  Returns:
    A tree of the same structure, usable as ``abstract_state`` of :meth:`Checkpoints.restore`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from train import checkpointing
    >>> a = checkpointing.abstract_like({"w": jnp.zeros((2, 3)), "step": 0})
    >>> a["w"].shape, a["w"].sharding is not None, a["step"]
    ((2, 3), True, 0)
  """
  sharding = default_sharding or _default_sharding()

  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return x

  return jax.tree.map(leaf, tree)


def _path(keypath) -> str:
  return jax.tree_util.keystr(keypath, simple=True, separator="/")


def _host_bytes(x: Any) -> tuple[str, tuple[int, ...], bytes] | None:
  """``(dtype, shape, bytes)`` of a leaf as this process sees it, or None (not all here)."""
  if isinstance(x, str):
    return "str", (), x.encode()
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if not x.is_fully_addressable:
      if not x.is_fully_replicated:
        return None
      x = x.addressable_data(0)
  a = np.asarray(x)  # tobytes() is C order whatever the layout
  return str(a.dtype), tuple(a.shape), a.tobytes()


def tree_digests(tree: Any) -> dict[str, dict[str, Any]]:
  """The checksum of every leaf: ``{path: {"dtype", "shape", "sha256"}}``.

  ``path`` joins the tree's keys with ``/`` (``model/convs/0/kernel/value``); ``sha256`` hashes
  the dtype, shape and bytes of the leaf (``None`` for an array sharded across processes).
  Python scalars hash as the 0-d numpy array they make (``int`` as ``int64``), strings as UTF-8.

  Examples:
    >>> import jax.numpy as jnp
    >>> from train import checkpointing
    >>> d = checkpointing.tree_digests({"w": jnp.zeros((2, 3)), "step": 4})
    >>> sorted(d), d["w"]["dtype"], d["w"]["shape"], len(d["w"]["sha256"])
    (['step', 'w'], 'float32', [2, 3], 64)
    >>> d == checkpointing.tree_digests({"w": jnp.zeros((2, 3)), "step": 4})
    True
  """
  out = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    host = _host_bytes(leaf)
    if host is None:
      out[_path(keypath)] = {"dtype": str(leaf.dtype), "shape": list(leaf.shape), "sha256": None}
      continue
    dtype, shape, data = host
    h = hashlib.sha256(f"{dtype}{shape}".encode())
    h.update(data)
    out[_path(keypath)] = {"dtype": dtype, "shape": list(shape), "sha256": h.hexdigest()}
  return out


def _abstract_signature(tree: Any) -> dict[str, tuple[str, list[int]] | None]:
  """``{path: (dtype, shape)}`` of a restore target (None where a leaf is a Python value)."""
  out = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, (jax.ShapeDtypeStruct, jax.Array, np.ndarray)):
      dtype = leaf.dtype
      if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        out[_path(keypath)] = None  # stored as its key data: another dtype and shape
        continue
      out[_path(keypath)] = (str(np.dtype(dtype)), list(leaf.shape))
    else:
      out[_path(keypath)] = None
  return out


class _Unusable(Exception):
  """Why one checkpoint cannot be restored (collected by :meth:`Checkpoints.restore`)."""


def _check_signature(expected: dict[str, Any], target: dict[str, Any]) -> None:
  """Raises :class:`_Unusable` when the saved tree's paths, dtypes or shapes differ from the
  restore target's (a checkpoint of another model or optimizer)."""
  missing = sorted(set(target) - set(expected))
  extra = sorted(set(expected) - set(target))
  changed = sorted(k for k, sig in target.items() if k in expected and sig is not None
                   and (expected[k]["dtype"], list(expected[k]["shape"])) != (sig[0], sig[1]))
  if missing or extra or changed:
    parts = []
    if missing:
      parts.append(f"{len(missing)} leaves it lacks ({missing[:3]})")
    if extra:
      parts.append(f"{len(extra)} leaves not expected ({extra[:3]})")
    if changed:
      k = changed[0]
      parts.append(f"{len(changed)} leaves of another dtype or shape ({k}: saved "
                   f"{expected[k]['dtype']}{tuple(expected[k]['shape'])}, expected "
                   f"{target[k][0]}{tuple(target[k][1])})")
    raise _Unusable("it holds another tree than the one to restore (another model, optimizer "
                    "or config?): " + "; ".join(parts))


def _short(e: BaseException, limit: int = 300) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class Checkpoints:
  """Saves a training state every ``every`` steps, keeps the last ``keep``, restores it.

  A thin wrapper around ``ocp.training.Checkpointer`` with a
  ``FixedIntervalPolicy(every)`` (plus orbax's preemption policy) and ``LatestN(keep)``. Use it
  as a context manager, or call :meth:`close`, so no save is left half-done in the background.
  With several processes, call every method on all of them (orbax coordinates the writes).

  Args:
    directory: root directory; each step is a sub-directory named by its number.
    every: save when ``step % every == 0`` (and whenever ``save(..., force=True)``).
    keep: number of most recent checkpoints preserved; ``None`` keeps all.

  Examples:
    >>> import tempfile, jax.numpy as jnp
    >>> from train import checkpointing
    >>> state = {"w": jnp.arange(3.0), "step": 4}
    >>> with checkpointing.Checkpoints(tempfile.mkdtemp(), every=2, keep=1) as ckpts:
    ...   ckpts.save(4, state), ckpts.save(5, state), ckpts.latest_step()
    ...   restored = ckpts.restore(state)
    (True, False, 4)
    >>> restored["step"], restored["w"].tolist()
    (4, [0.0, 1.0, 2.0])
  """

  def __init__(self, directory: str | os.PathLike, *, every: int = 1, keep: int | None = None):
    if every < 1:
      raise ValueError(f"every: must be >= 1, got {every}")
    if keep is not None and keep < 1:
      raise ValueError(f"keep: must be >= 1 or None, got {keep}")
    policies = ocp.training.save_decision_policies
    preserve = ocp.training.preservation_policies
    self.directory = os.fspath(directory)
    self.every = every
    self.keep = keep
    self._ckptr = ocp.training.Checkpointer(
        self.directory,
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(every),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=preserve.PreserveAll() if keep is None else preserve.LatestN(keep),
        cleanup_tmp_directories=True,  # remove what a killed save left behind
    )

  def steps(self) -> list[int]:
    """Steps with a complete checkpoint, ascending.

    Examples:
      >>> import tempfile
      >>> from train import checkpointing
      >>> with checkpointing.Checkpoints(tempfile.mkdtemp()) as ckpts:
      ...   ckpts.steps()
      []
    """
    return [c.step for c in self._ckptr.checkpoints]

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or ``None`` when there is none.

    Examples:
      >>> import tempfile
      >>> from train import checkpointing
      >>> with checkpointing.Checkpoints(tempfile.mkdtemp()) as ckpts:
      ...   ckpts.latest_step() is None
      True
    """
    latest = self._ckptr.latest
    return None if latest is None else latest.step

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves ``state`` at ``step`` if ``step % every == 0`` or ``force``; blocks until committed.

    The step's ``custom_metadata`` holds the checksums :meth:`restore` verifies
    (:func:`tree_digests`).

    A step that already has a checkpoint is not written again (e.g. the final forced save of a
    run that was just restored at that step).

    Args:
      step: training step, ``>= 0``.
      state: the pytree to save (see the module docstring for the allowed leaves).
      force: save regardless of ``every``.

    Returns:
      Whether a checkpoint was written.

    Examples:
      >>> import tempfile, jax.numpy as jnp
      >>> from train import checkpointing
      >>> with checkpointing.Checkpoints(tempfile.mkdtemp(), every=10) as ckpts:
      ...   ckpts.save(3, {"x": jnp.zeros(2)}), ckpts.save(3, {"x": jnp.zeros(2)}, force=True)
      (False, True)
    """
    step = int(step)
    if step < 0:
      raise ValueError(f"step: must be >= 0, got {step}")
    if step in self.steps():
      return False
    if not (force or self._ckptr.should_save(step)):
      return False
    return bool(self._ckptr.save(step, state, force=force,
                                 custom_metadata={DIGESTS_KEY: tree_digests(state)}))

  def restore(self, abstract_state: Any, step: int | None = None, *,
              default_sharding: jax.sharding.Sharding | None = None) -> Any:
    """Loads the checkpoint at ``step`` (default: the newest intact one), verified.

    Every restored leaf is checked against the checksums written at save
    (:func:`tree_digests`). With ``step=None`` a checkpoint that fails (orbax cannot read it,
    it holds another tree, or its data differ from the checksums) is skipped for the next
    older one; the skipped ones are named in a :class:`CheckpointIntegrityWarning` and moved
    aside to ``<step>.corrupt`` (so that the run can save those steps again).

    Args:
      abstract_state: the target tree: abstract (``nnx.state(nnx.eval_shape(...))``,
        ``jax.ShapeDtypeStruct``) or concrete (a freshly initialized state); passed through
        :func:`abstract_like`. Leaves keep their type (jax arrays with their sharding, numpy
        arrays, Python scalars), containers their class (``nnx.State``, NamedTuples).
      step: which checkpoint; ``None`` means the newest intact one.
      default_sharding: sharding for abstract arrays that have none (default: first device).

    Returns:
      The restored tree. Put model and optimizer states back with ``nnx.update``.

    Raises:
      FileNotFoundError: no checkpoint at all, or none at ``step``.
      CheckpointIntegrityError: the checkpoint at ``step``, or (``step=None``) every
        checkpoint, is corrupt or holds another tree; the message says which and why.

    Examples:
      >>> import tempfile, jax.numpy as jnp
      >>> from train import checkpointing
      >>> with checkpointing.Checkpoints(tempfile.mkdtemp()) as ckpts:
      ...   _ = ckpts.save(1, {"m": jnp.array(True)})
      ...   ckpts.restore({"m": jnp.array(False)})["m"].item()
      True
    """
    steps = self.steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
      candidates = steps[::-1]
    elif int(step) not in steps:
      raise FileNotFoundError(f"step: no checkpoint at step {step} in {self.directory}; "
                              f"have {steps}")
    else:
      candidates = [int(step)]
    target = abstract_like(abstract_state, default_sharding=default_sharding)
    failures: dict[int, str] = {}
    for s in candidates:
      try:
        restored = self._load_verified(s, target)
      except _Unusable as e:
        failures[s] = str(e)
        continue
      if failures:
        moved = self._move_aside(list(failures))
        warnings.warn(
            f"checkpoints: restored step {s} of {self.directory}, skipping newer ones that "
            f"are not intact: " + "; ".join(f"step {k} ({v})" for k, v in failures.items())
            + f". Moved aside to {', '.join(moved)}.", CheckpointIntegrityWarning, stacklevel=2)
      return restored
    lines = "\n".join(f"  {os.path.join(self.directory, str(k))}: {v}"
                       for k, v in failures.items())
    raise CheckpointIntegrityError(
        f"checkpoints: no intact checkpoint in {self.directory}; tried:\n{lines}\n"
        "Move the bad step directories away to start this phase over, or restore from a copy.",
        failures)

  def _load_verified(self, step: int, target: Any) -> Any:
    """Loads ``step`` into ``target`` and checks it against its checksums, or raises
    :class:`_Unusable` saying why not."""
    expected = self._saved_digests(step)
    if expected is not None:
      try:
        _check_signature(expected, _abstract_signature(target))
      except (KeyError, TypeError, ValueError) as e:
        raise _Unusable(f"its checksums are malformed: {_short(e)}") from e
    failure = None
    try:
      restored = self._ckptr.load(step, target)
    except Exception as e:  # noqa: BLE001 -- orbax/TensorStore raise many kinds
      failure = f"orbax cannot read it: {_short(e)}"
    if failure is not None:
      # A failed orbax load leaves coroutines that were never awaited; collect them here, so
      # their RuntimeWarnings do not surface later (as errors under -W error).
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        gc.collect()
      raise _Unusable(failure)
    if expected is None:
      warnings.warn(f"checkpoints: step {step} of {self.directory} has no checksums (saved "
                    "before they were written); loaded unverified", CheckpointIntegrityWarning,
                    stacklevel=3)
      return restored
    actual = tree_digests(restored)
    try:
      bad = sorted(k for k, v in expected.items()
                   if v["sha256"] is not None and actual[k]["sha256"] is not None
                   and v["sha256"] != actual[k]["sha256"])
    except (KeyError, TypeError) as e:
      raise _Unusable(f"its checksums are malformed: {_short(e)}") from e
    if bad:
      raise _Unusable(f"the data of {len(bad)} of {len(expected)} leaves differ from the "
                      f"checksums written at save: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    return restored

  def _saved_digests(self, step: int) -> dict[str, Any] | None:
    """The checksums saved with ``step`` (None: saved without them), or :class:`_Unusable`.

    Read from the step's metadata file directly: orbax logs and ignores a metadata file it
    cannot parse, which would make a damaged checkpoint look like one saved without checksums.
    """
    path = os.path.join(self.directory, str(step), METADATA_FILE)
    try:
      with open(path, encoding="utf-8") as f:
        raw = f.read()
      meta = json.loads(raw)
    except (OSError, ValueError) as e:
      raise _Unusable(f"its metadata file {METADATA_FILE} cannot be read: {_short(e)}") from e
    custom = meta.get("custom_metadata") if isinstance(meta, dict) else None
    expected = custom.get(DIGESTS_KEY) if isinstance(custom, dict) else None
    if expected is None:
      if "sha256" in raw:  # checksums were written, but their entry is damaged
        raise _Unusable(f"its checksums in {METADATA_FILE} are damaged")
      return None
    if not isinstance(expected, dict) or not all(
        isinstance(v, dict) and {"dtype", "shape", "sha256"} <= set(v) for v in expected.values()):
      raise _Unusable(f"its checksums in {METADATA_FILE} are malformed")
    return expected

  def _move_aside(self, steps: list[int]) -> list[str]:
    """Renames each step's directory to ``<step>.corrupt`` (on process 0), so that orbax no
    longer lists it; returns the new paths."""
    moved = []
    for s in steps:
      src = os.path.join(self.directory, str(s))
      dst = src + CORRUPT_SUFFIX
      n = 1
      while os.path.exists(dst):
        dst, n = f"{src}{CORRUPT_SUFFIX}{n}", n + 1
      if jax.process_index() == 0:
        os.rename(src, dst)
      moved.append(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("checkpoints: corrupt steps moved aside")
    self._ckptr.reload()
    return moved

  def wait(self) -> None:
    """Blocks until background work (garbage collection of old steps) has finished."""
    self._ckptr.wait()

  def close(self) -> None:
    """Finishes pending work and releases orbax's resources. Safe to call twice."""
    self._ckptr.close()

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc) -> None:
    self.close()



def save_tree(path: str | os.PathLike, tree: Any, *, overwrite: bool = True) -> None:
  """Writes one pytree to ``path`` (a directory) with ``ocp.save``; blocks until committed.

  Numpy leaves are written as numpy arrays and come back as numpy arrays from
  :func:`load_tree` with no target (jax arrays would come back as jax arrays, with orbax's
  "Sharding info not provided" warning). orbax cannot write empty arrays.

  Examples:
    >>> import os, tempfile, numpy as np
    >>> from train import checkpointing
    >>> path = os.path.join(tempfile.mkdtemp(), "tree")
    >>> checkpointing.save_tree(path, {"a": {"w": np.arange(3.0)}})
    >>> checkpointing.load_tree(path)["a"]["w"].tolist()
    [0.0, 1.0, 2.0]
  """
  ocp.save(os.fspath(path), tree, overwrite=overwrite)


def load_tree(path: str | os.PathLike, abstract: Any = None) -> Any:
  """Reads a pytree written by :func:`save_tree`: with no ``abstract`` target, as nested dicts
  and lists of the saved arrays; with one, into its structure (see :func:`abstract_like`)."""
  if abstract is None:
    return ocp.load(os.fspath(path))
  return ocp.load(os.fspath(path), abstract_like(abstract))
