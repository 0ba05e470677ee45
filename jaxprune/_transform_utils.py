"""Helpers shared by the training-time transforms (:mod:`jaxprune.transforms`,
:mod:`jaxprune.sparse_training`): option checks, leaf selection, the ``where(mask, u, -p)``
that makes ``optax.apply_updates`` land pruned weights on exactly 0, and the check that it did.
Private: not part of the API.

**The misplacement check.** A transform applied *after* a pruning transform (a link followed by
``clip_by_global_norm`` or ``reduce_on_plateau``, a link placed first in the chain,
``optax.lookahead``'s sync) changes the ``-p`` that zeroes a pruned weight, and the model
silently stays dense. So at the next update, the transform checks that every weight its
previous masks pruned is exactly 0 in the params it receives. The check is one fused variadic
reduction per prunable leaf (no intermediate of a leaf's size), and runs only inside the
conditional the transform already has: on mask-update steps, at step 1 (the first step that can
see step 0's masks applied) and at ``end_step`` — never on the other steps, which cost nothing
more. When it fails it raises through a ``jax.pure_callback`` (inside a ``lax.cond`` on the
failure, so a passing check calls nothing on the host; see :mod:`jaxprune._checks` for why not
an effectful callback): under ``jax.jit`` the error surfaces as a ``jax.errors.JaxRuntimeError``
(``ValueError`` from JAX's C++ fast path) carrying the message, which names the leaf, the step
and the fix. Misuse is a property of the optimizer, present from the first
steps, so a check on these steps finds it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune import _checks, _tree, allocation
from jaxprune import structure as structure_lib
from jaxprune._select.counts import count_many

NO_PARAMS_MSG = ("This pruning transform needs the params: call tx.update(updates, state, params) "
                 "(optax.apply_updates lands pruned weights on 0 by emitting -params).")


def as_schedule(value, name: str = "sparsity") -> Callable[[jax.Array], jax.Array]:
  """A fraction or an ``optax.Schedule`` as a schedule returning float32 in [0, 1].

  A schedule's value is checked at every step (when the program runs, if traced): NaN or a
  value outside [0, 1] raises, naming the step.
  """
  if callable(value):
    def schedule(count):
      v = jnp.asarray(value(count), jnp.float32)
      if v.ndim != 0:
        raise ValueError(f"the {name} schedule must return a scalar, got shape {v.shape}.")
      v = _checks.check(~_checks.is_fraction(v), lambda v, c: (
          f"the {name} schedule returned {float(v)} at step {int(c)}; a {name} must be in "
          "[0, 1]."), v, count)
      return jnp.clip(v, 0.0, 1.0)
    return schedule
  if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) != 0:
    raise ValueError(f"{name} must be a number, a 0-d array or a schedule; got shape "
                     f"{np.shape(value)}.")
  if allocation.is_scalar(value):
    value = allocation.check_fraction(value, "<all>", what=name)
    return lambda count: jnp.clip(jnp.asarray(value, jnp.float32), 0.0, 1.0)
  raise ValueError(f"{name} must be a number, a 0-d array or a schedule (step -> {name}); got "
                   f"{type(value).__name__}.")


def as_key(key) -> jax.Array:
  """A typed PRNG key from a key (typed or raw uint32), an int seed (maybe traced) or None (0)."""
  if key is None:
    return jax.random.key(0)
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if isinstance(key, (jax.Array, np.ndarray)) and np.shape(key) == (2,):
    return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
  return jax.random.key(key)


def is_placeholder(params) -> bool:
  """True for a tree without leaves, e.g. the placeholder ``optax.tree.map_params`` inits with."""
  return not jax.tree.leaves(params)


def selection(params, where):
  """``(paths, chosen, where_by_path)``: prunable leaves of ``params`` as chosen by ``where``.

  ``where_by_path`` is a ``where`` that answers by path alone, so that score trees (whose leaf
  dtypes may differ from the params') select exactly the same leaves.
  """
  paths, _, _, chosen = _tree.selected(params, where)
  chosen_paths = frozenset(p for p, c in zip(paths, chosen, strict=True) if c)
  return paths, chosen, (lambda path, leaf: path in chosen_paths)


def ones_masks(params, chosen):
  """All-True keep-masks: a bool array for chosen leaves, scalar True for the others."""
  treedef = jax.tree.structure(params)
  leaves = jax.tree.leaves(params)
  out = [jnp.ones_like(x, dtype=bool) if c else jnp.ones((), bool)
         for x, c in zip(leaves, chosen, strict=True)]
  return jax.tree.unflatten(treedef, out)


def enforce(masks, updates, params, chosen, override=None):
  """``where(mask, u, -p)`` on chosen leaves so that ``apply_updates`` lands pruned weights on 0.

  ``override`` (optional, same tree as masks) marks kept weights that must also land on 0
  (e.g. connections RigL just grew). The result has ``result_type(u, p)`` so ``-p`` is exact.
  """
  treedef = jax.tree.structure(updates)
  m_leaves = treedef.flatten_up_to(masks)
  u_leaves = jax.tree.leaves(updates)
  p_leaves = treedef.flatten_up_to(params)
  o_leaves = treedef.flatten_up_to(override) if override is not None else [None] * len(u_leaves)
  out = []
  for m, u, p, o, c in zip(m_leaves, u_leaves, p_leaves, o_leaves, chosen, strict=True):
    if c:
      keep = m if o is None else m & ~o
      u = jnp.where(keep, u, -p)
    out.append(u)
  return jax.tree.unflatten(treedef, out)


def model_params(params):
  """The params a pruning transform masks: an ``optax.LookaheadParams``' fast weights (its slow
  weights get the same masks, see :func:`enforce_params`), else ``params``."""
  return params.fast if isinstance(params, optax.LookaheadParams) else params


def enforce_params(masks, updates, params, chosen, override=None):
  """:func:`enforce` on ``params``; for ``optax.LookaheadParams`` (a transform wrapping
  ``optax.lookahead``) on the fast and the slow weights alike, so both stay exactly 0 where the
  masks prune and lookahead's sync (fast := slow) keeps the fast weights sparse."""
  if isinstance(params, optax.LookaheadParams):
    return optax.LookaheadParams(
        fast=enforce(masks, updates.fast, params.fast, chosen, override),
        slow=enforce(masks, updates.slow, params.slow, chosen, override))
  return enforce(masks, updates, params, chosen, override)


def mask_grads(masks, grads, chosen):
  """Zeroes the gradients of pruned weights (so inner optimizers see only surviving weights)."""
  treedef = jax.tree.structure(grads)
  m_leaves = treedef.flatten_up_to(masks)
  out = [jnp.where(m, g, jnp.zeros((), g.dtype)) if c else g
         for m, g, c in zip(m_leaves, jax.tree.leaves(grads), chosen, strict=True)]
  return jax.tree.unflatten(treedef, out)


def allocate(params, s, distribution: str, where_by_path, stacked=None):
  """Per-leaf sparsities for the global sparsity ``s`` (float32 scalar, maybe traced)."""
  if distribution == "uniform":
    return s
  return allocation.erk_sparsities(params, jnp.asarray(s, jnp.float32), where=where_by_path,
                                   stacked=stacked)


def check_options(scope: str, distribution: str, update_every, structure=None) -> None:
  if scope not in ("layerwise", "global"):
    raise ValueError(f"scope must be 'layerwise' or 'global', got {scope!r}.")
  if distribution not in ("uniform", "erk"):
    raise ValueError(f"distribution must be 'uniform' or 'erk', got {distribution!r}.")
  if scope == "global" and distribution != "uniform":
    raise ValueError("scope='global' sets one threshold over all leaves; it takes "
                     f"distribution='uniform', got {distribution!r}.")
  check_step_count("update_every", update_every)
  if structure is not None:
    structure_lib.check_structure(structure)


def check_step_count(name: str, value) -> None:
  """An int >= 1, or an integer jax array (maybe traced, e.g. by ``inject_hyperparams``)."""
  if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0 and jnp.issubdtype(
      value.dtype, jnp.integer):
    if not _tree.is_traced(value) and int(value) < 1:
      raise ValueError(f"{name} must be an int >= 1, got {int(value)}.")
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an int >= 1 (a number of steps), got {value!r}.")


# ----------------------------------------------------------------------------- misplacement check

MISPLACED_FIX = (
    "The transform lands pruned weights on exactly 0 by emitting where(mask, u, -params), so "
    "something changed its update after it: a transformation after it in optax.chain (e.g. "
    "clip_by_global_norm, optax.contrib.reduce_on_plateau, a scale or schedule), the pruning "
    "link placed first in the chain, optax.lookahead around it (its sync resets the fast "
    "weights to the dense slow ones), or params changed outside the optimizer. Fix: make the "
    "pruning transform wrap the whole optimizer, e.g. jp.magnitude_pruning(s, "
    "inner_tx=optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))) (rigl and "
    "set_training take inner_tx too; for lookahead, inner_tx=optax.lookahead(...), which prunes "
    "the fast and slow weights alike), or put the link last in optax.chain; if you changed the "
    "params yourself, apply jp.apply_masks(params, jp.masks_from_state(opt_state)) first.")


def check_step(count, every, end):
  """Whether this update checks the previous masks: update steps after 0, step 1, ``end``."""
  return (count > 0) & (((count % every == 0) & (count < end)) | (count == 1) | (count == end))


def check_or_update(is_update, is_check, keep, check, update, operand):
  """``update(operand)`` on update steps, ``keep(operand)`` on other steps, after
  ``zero = check(operand)`` (the misplacement check, which returns an int32 0 computed from its
  counts) on check steps. Every update step after step 0 is a check step (see
  :func:`check_step`); a transform that updates at step 0 guards ``check`` there (there is
  nothing to check yet).

  Two nested conds, ``cond(is_update | is_check, check; cond(is_update, update, fresh), keep)``,
  where ``fresh`` is ``keep`` written to new buffers (``m | (zero != 0)``; masks are bool). So
  the step that does neither (nearly every step) passes ``operand`` through one 2-way cond,
  which XLA:CPU does in place, and no branch both reads the masks and passes them through:
  such a branch (the former keep / check / check + update ``lax.switch``) made XLA:CPU copy
  every mask at every step, taken or not (7,600 page faults a step: a magnitude step without an
  update cost 2.0x an adam step on the half-width GPT-2 tree, 1.4x after it, ``model_scale``;
  ``tests/test_mask_footprint.py`` pins that no mask is copied)."""
  def fresh(x, zero):
    return jax.tree.map(lambda m: m | (zero != 0), keep(x))

  def check_then(x):
    zero = check(x)
    return lax.cond(is_update, update, lambda x: fresh(x, zero), x)

  return lax.cond(is_update | is_check, check_then, keep, operand)


def nonzero_pruned(masks, params, chosen) -> tuple[jax.Array, jax.Array]:
  """Per chosen leaf (in order): how many weights ``masks`` prune are nonzero in ``params``, and
  how many it prunes; int32 vectors. One fused two-output reduction per leaf. A non-finite
  pruned weight is not counted: ``p + (-p)`` is NaN for it whatever the chain does (see
  "Non-finite params" in :mod:`jaxprune.transforms`), so it says nothing about misplacement."""
  treedef = jax.tree.structure(params)
  bad, pruned = [], []
  for m, p, c in zip(treedef.flatten_up_to(masks), jax.tree.leaves(params), chosen, strict=True):
    if not c:
      continue
    if np.ndim(m) == 0:
      bad.append(jnp.zeros((), jnp.int32))
      pruned.append(jnp.zeros((), jnp.int32))
      continue
    counts = count_many(
        [p], [lambda a, m=m: ~m & (a != 0) & jnp.isfinite(a), lambda a, m=m: ~m], None)
    bad.append(counts[0])
    pruned.append(counts[1])
  if not bad:
    return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32)
  return jnp.stack(bad), jnp.stack(pruned)


def _raise_misplaced(name: str, paths: Sequence[str], bad, pruned, count) -> None:
  bad = np.asarray(bad).reshape(-1, len(paths))       # leading axes: vmap, if any
  pruned = np.asarray(pruned).reshape(-1, len(paths))
  rows = np.flatnonzero(bad.any(axis=1))
  if not len(rows):
    return
  r = rows[0]
  leaves = np.flatnonzero(bad[r])
  i = leaves[0]
  more = f" (and {len(leaves) - 1} more leaves)" if len(leaves) > 1 else ""
  step = int(np.asarray(count).reshape(-1)[r])
  raise ValueError(
      f"jaxprune.{name}: at step {step}, {int(bad[r, i])} of the {int(pruned[r, i])} weights of "
      f"'{paths[i]}' that its masks prune are not 0 in the params{more}. {MISPLACED_FIX}")


def check_misplaced(name: str, paths: Sequence[str], bad, pruned, count) -> jax.Array:
  """Raises (through a host callback, only when the check failed) the misplacement error;
  returns ``min(Σ bad, 0)``, an int32 0 computed from the counts, for :func:`check_or_update`
  to make its check-only branch write fresh masks."""
  if not paths:
    return jnp.zeros((), jnp.int32)
  raise_if_bad = lambda b, n, c: _raise_misplaced(name, tuple(paths), b, n, c)
  zero = _checks.host_check(raise_if_bad, jnp.any(bad > 0), bad, pruned, count)
  return _checks.depend_on(jnp.minimum(jnp.sum(bad), 0), zero)
