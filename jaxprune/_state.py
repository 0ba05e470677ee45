"""Finding and replacing the masks inside any optimizer state (private; the public functions
are :func:`jaxprune.masks_from_state` and :func:`jaxprune.replace_masks`).

A jaxprune state is recognised by its fields, in either of the forms it takes:

* the NamedTuple itself (:class:`~jaxprune.PruningState`, :class:`~jaxprune.SparseTrainingState`,
  or any NamedTuple with ``count`` and ``masks``), wherever optax nests it: ``chain``,
  ``MultiSteps``, ``inject_hyperparams``, ``apply_if_finite``, ``lookahead``, ``masked``,
  ``multi_transform``, an ``nnx.Optimizer`` (itself a pytree) or its ``opt_state``;
* a mapping with ``count``, ``masks`` and no keys but those fields: ``nnx.state(optimizer)``
  turns NamedTuples into ``nnx.State`` dicts (dropping empty fields), and a checkpoint restored
  without a target gives plain dicts.

Inside ``optax.masked`` (and so ``multi_transform``) a transform only sees some leaves: the
others are ``optax.MaskedNode`` holes in its masks (in an ``nnx.Optimizer``, a ``Variable``
holding one). Masks are matched by leaf path, holes included, so the masks of several pruning
states merge into one tree with the params' structure: a leaf's mask is the AND of the masks
that cover it, and scalar ``True`` where none does.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import _tree

# The fields of jaxprune's own states (PruningState; SparseTrainingState has no `scores`), for
# their mapping form: nnx.State (which drops empty fields such as EmptyState), restored dicts.
_STATE_FIELDS = frozenset({"count", "masks", "scores", "inner_state"})


def is_pruning_state(x) -> bool:
  if isinstance(x, tuple) and "masks" in getattr(x, "_fields", ()) and "count" in x._fields:
    return True
  if not isinstance(x, Mapping) or _tree.is_variable(x):
    return False
  keys = {k for k in x.keys() if isinstance(k, str)}
  return len(keys) == len(x) and {"count", "masks"} <= keys <= _STATE_FIELDS


def _masks_of(state):
  return state["masks"] if isinstance(state, Mapping) else state.masks


def _with_masks(state, masks):
  if isinstance(state, Mapping):
    return type(state)({k: masks if k == "masks" else v for k, v in state.items()})
  return state._replace(masks=masks)


def find(opt_state) -> list:
  """Every jaxprune pruning state inside ``opt_state`` (outermost first)."""
  if not jax.tree.leaves(opt_state, is_leaf=is_pruning_state):
    return []
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_pruning_state)
          if is_pruning_state(x)]


def _is_position(x) -> bool:
  return _tree.is_variable(x) or isinstance(x, optax.MaskedNode)


def _is_hole(x) -> bool:
  x = _tree.unwrap(x)
  return isinstance(x, optax.MaskedNode) or (isinstance(x, tuple) and not x)


def positions(masks):
  """``(paths, values, treedef)`` of a state's masks, one position per param leaf: values are
  plain arrays, or None for a hole (a leaf this transform does not see)."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_position)
  paths = [_tree.path_str(kp) for kp, _ in with_path]
  values = [None if _is_hole(x) else _tree.unwrap(x) for _, x in with_path]
  return paths, values, treedef


def _no_state_error(what: str) -> ValueError:
  return ValueError(
      f"opt_state holds no jaxprune pruning state {what}(no NamedTuple or mapping with the "
      "fields `count` and `masks`); was the optimizer built with a jaxprune transform? Pass the "
      "optax state, an nnx.Optimizer, its opt_state or nnx.state(optimizer).")


def masks_from_state(opt_state):
  found = find(opt_state)
  if not found:
    raise _no_state_error("")
  trees = [positions(_masks_of(s)) for s in found]
  paths, _, treedef = trees[0]
  for other_paths, _, _ in trees[1:]:
    if other_paths != paths:
      only_a = [p for p in paths if p not in set(other_paths)][:5]
      only_b = [p for p in other_paths if p not in set(paths)][:5]
      raise ValueError("opt_state holds several pruning states whose masks cover different "
                       f"trees (only in the first: {only_a}; only in another: {only_b}), so "
                       "they cannot be merged into one tree of masks.")
  merged = []
  for i in range(len(paths)):
    values = [t[1][i] for t in trees if t[1][i] is not None]
    if not values:
      merged.append(jnp.ones((), bool))
      continue
    out = values[0]
    for v in values[1:]:
      out = jnp.logical_and(out, v)
    merged.append(out)
  return jax.tree.unflatten(treedef, merged)


def replace_masks(opt_state, masks):
  found = find(opt_state)
  if not found:
    raise _no_state_error("to put masks into ")
  given_paths, given, _ = positions(masks)
  by_path = dict(zip(given_paths, given, strict=True))

  def swap(x):
    if not is_pruning_state(x):
      return x
    paths, olds, treedef = positions(_masks_of(x))
    wrappers = jax.tree.leaves(_masks_of(x), is_leaf=_is_position)
    missing = [p for p, o in zip(paths, olds) if o is not None and p not in by_path]
    extra = [p for p in given_paths if p not in set(paths)]
    if missing or extra:
      raise ValueError(
          "state masks and masks have different tree structures: "
          + "; ".join(([f"missing in masks: {missing[:5]}"] if missing else [])
                      + ([f"not in the state: {extra[:5]}"] if extra else [])) + ".")
    new = []
    for p, o, w in zip(paths, olds, wrappers, strict=True):
      if o is None:  # a hole stays a hole
        new.append(w)
        continue
      m = by_path[p]
      if m is None or np.shape(o) != np.shape(m) or getattr(m, "dtype", None) != jnp.bool_:
        raise ValueError(f"mask for '{p}' must be bool of shape {np.shape(o)}, got "
                         f"{getattr(m, 'dtype', type(m))} of shape {np.shape(m)}.")
      m = jnp.asarray(m, bool)
      new.append(w.replace(m) if _tree.is_variable(w) else m)
    return _with_masks(x, jax.tree.unflatten(treedef, new))

  # Rebuilding the whole tree copies its Variable wrappers: the result shares none with opt_state.
  return jax.tree.map(swap, jax.tree.map(lambda x: x, opt_state), is_leaf=is_pruning_state)
