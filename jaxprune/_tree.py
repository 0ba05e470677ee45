"""Leaf selection and validation shared by every layer of jaxprune (private).

Paths and the default ``where`` are in the public :mod:`jaxprune.tree`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

# The path and ``where`` basics are public, in :mod:`jaxprune.tree`; re-exported for the
# library's modules, which import everything tree-related from here.
from jaxprune.tree import Where, default_where, flatten, is_float, path_str  # noqa: F401


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
