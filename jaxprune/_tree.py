"""Paths, leaf selection and validation shared by every layer of jaxprune.

Paths are strings such as ``"layers/0/kernel"``: dict keys, sequence indices and attribute
names joined by ``/``. The trailing ``value`` that Flax NNX ``Variable`` wrappers add is dropped,
so a pure-dict params tree and the ``nnx.State`` of the same model give the same paths.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Where = Callable[[str, Any], bool]

_NNX_VALUE_ATTRS = ("value", "raw_value")


def _key_name(key) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(keypath) -> str:
  """Turns a JAX key path into ``"a/b/0/kernel"`` (dropping NNX's trailing ``value``)."""
  names = [_key_name(k) for k in keypath]
  if names and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and names[-1] in _NNX_VALUE_ATTRS:
    names = names[:-1]
  return "/".join(names)


def is_float(leaf) -> bool:
  return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def default_where(path: str, leaf) -> bool:
  """The default prunable-leaf rule: floating arrays with ``ndim >= 2`` (kernels, not biases)."""
  del path
  return is_float(leaf) and np.ndim(leaf) >= 2


def flatten(tree):
  """Returns ``(paths, leaves, treedef)`` with string paths."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [path_str(kp) for kp, _ in with_path]
  leaves = [leaf for _, leaf in with_path]
  return paths, leaves, treedef


def selected(tree, where: Where | None = None, *, require_any: bool = True,
             require_float: bool = True, what: str = "params"):
  """Flattens ``tree`` and applies ``where``.

  Returns ``(paths, leaves, treedef, chosen)`` where ``chosen`` is a list of bools.
  Raises ``ValueError`` naming the path if ``where`` selects a non-float leaf, or if it
  selects nothing and ``require_any``.
  """
  where = default_where if where is None else where
  paths, leaves, treedef = flatten(tree)
  chosen = []
  for path, leaf in zip(paths, leaves):
    pick = bool(where(path, leaf))
    if pick and require_float and not is_float(leaf):
      dtype = getattr(leaf, "dtype", type(leaf).__name__)
      raise ValueError(f"`where` selected the non-float leaf '{path}' (dtype {dtype}); only "
                       "floating-point leaves can be pruned.")
    chosen.append(pick)
  if require_any and not any(chosen):
    raise ValueError(f"`where` selects no leaf of the {what} tree (paths: "
                     f"{', '.join(paths[:8])}{', ...' if len(paths) > 8 else ''}).")
  return paths, leaves, treedef, chosen


def map_selected(fn: Callable[[str, Any], Any], tree, where: Where | None = None, **kw):
  """Applies ``fn(path, leaf)`` to the leaves ``where`` selects; others pass unchanged."""
  paths, leaves, treedef, chosen = selected(tree, where, **kw)
  out = [fn(p, x) if c else x for p, x, c in zip(paths, leaves, chosen)]
  return jax.tree.unflatten(treedef, out)


def check_same_structure(a, b, name_a: str, name_b: str) -> None:
  """Raises ``ValueError`` naming the first differing path if two trees differ in structure."""
  pa, _, ta = flatten(a)
  pb, _, tb = flatten(b)
  if ta != tb:
    only_a = sorted(set(pa) - set(pb))
    only_b = sorted(set(pb) - set(pa))
    detail = (f" only in {name_a}: {only_a[:5]}" if only_a else "") + (
        f" only in {name_b}: {only_b[:5]}" if only_b else "")
    raise ValueError(f"{name_a} and {name_b} have different tree structures.{detail}"
                     f" ({name_a}: {ta}; {name_b}: {tb})" if not detail else
                     f"{name_a} and {name_b} have different tree structures:{detail}")


def is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)
