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
"""

from __future__ import annotations

import os
from typing import Any

import jax
from orbax.checkpoint import v1 as ocp

__all__ = ["Checkpoints", "abstract_like", "load_tree", "save_tree"]


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
    return bool(self._ckptr.save(step, state, force=force))

  def restore(self, abstract_state: Any, step: int | None = None, *,
              default_sharding: jax.sharding.Sharding | None = None) -> Any:
    """Loads the checkpoint at ``step`` (default: the latest) into ``abstract_state``'s structure.

    Args:
      abstract_state: the target tree: abstract (``nnx.state(nnx.eval_shape(...))``,
        ``jax.ShapeDtypeStruct``) or concrete (a freshly initialized state); passed through
        :func:`abstract_like`. Leaves keep their type (jax arrays with their sharding, numpy
        arrays, Python scalars), containers their class (``nnx.State``, NamedTuples).
      step: which checkpoint; ``None`` means :meth:`latest_step`.
      default_sharding: sharding for abstract arrays that have none (default: first device).

    Returns:
      The restored tree. Put model and optimizer states back with ``nnx.update``.

    Raises:
      FileNotFoundError: no checkpoint at all, or none at ``step``.

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
      step = steps[-1]
    elif int(step) not in steps:
      raise FileNotFoundError(f"step: no checkpoint at step {step} in {self.directory}; "
                              f"have {steps}")
    target = abstract_like(abstract_state, default_sharding=default_sharding)
    return self._ckptr.load(int(step), target)

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
