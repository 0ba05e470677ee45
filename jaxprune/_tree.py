"""Leaf selection and validation shared by every layer of jaxprune (private).

Paths, the default ``where`` and layouts are in the public :mod:`jaxprune.tree`.

Two trees "have the same structure" here when they have the same leaf paths in the same order
(:func:`check_same_structure`): so the ``nnx.State`` of a model (leaves wrapped in NNX
``Variable``\\ s) matches the masks :func:`jaxprune.masks_from_state` returns for it (plain
arrays in the same ``State``), a ``FrozenDict`` matches a ``dict``, and results are built with
the treedef of the tree the caller gave (the "same kind" comes back).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

# The path and ``where`` basics are public, in :mod:`jaxprune.tree`; re-exported for the
# library's modules, which import everything tree-related from here.
from jaxprune.tree import (  # noqa: F401
                           Where,
                           default_layout,
                           default_where,
                           flatten,
                           is_float,
                           layout_fn,
                           leaf_name,
                           path_str,
)

_NNX_VALUE_ATTRS = ("value", "raw_value")


def is_variable(x) -> bool:
  """A Flax NNX ``Variable`` (``nnx.Param``, ``nnx.OptVariable``...): has ``get_value``."""
  return callable(getattr(x, "get_value", None)) and not isinstance(x, jax.Array)


def unwrap(x):
  """The array inside an NNX ``Variable``, else ``x``."""
  return x.get_value() if is_variable(x) else x


def pure(tree):
  """``tree`` with every NNX ``Variable`` replaced by its value (containers kept)."""
  return jax.tree.map(unwrap, tree, is_leaf=is_variable)


def _child(node, key):
  if isinstance(key, jax.tree_util.DictKey):
    return node[key.key]
  if isinstance(key, jax.tree_util.SequenceKey):
    return node[key.idx]
  if isinstance(key, jax.tree_util.GetAttrKey):
    return getattr(node, key.name)
  raise KeyError(key)


def containers(tree) -> list[Any]:
  """For each leaf (``jax.tree.leaves`` order), the object holding it: the dict, module or
  NamedTuple it is a field of (an NNX ``Variable`` wrapper is looked through), or None where
  the key path cannot be followed (custom nodes without keys)."""
  out = []
  for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    chain = [tree]
    try:
      for k in kp[:-1]:
        chain.append(_child(chain[-1], k))
    except (KeyError, IndexError, AttributeError, TypeError):
      out.append(None)
      continue
    if (kp and isinstance(kp[-1], jax.tree_util.GetAttrKey) and kp[-1].name in _NNX_VALUE_ATTRS
        and is_variable(chain[-1])):
      chain.pop()
    out.append(chain[-1] if chain else None)
  return out


def _default_chosen(paths, leaves, tree) -> list[bool]:
  """:func:`default_where`, plus what the containers say: a normalization layer's ``weight``
  (class name ending in ``Norm``: Equinox ``LayerNorm``/``RMSNorm``/``GroupNorm``) and a Haiku
  bias ``b`` beside its ``w`` are not prunable, whatever their shape."""
  chosen = [bool(default_where(p, x)) for p, x in zip(paths, leaves, strict=True)]
  if not any(chosen):
    return chosen
  for i, parent in enumerate(containers(tree)):
    if not chosen[i] or parent is None:
      continue
    name = leaf_name(paths[i])
    if type(parent).__name__.endswith("Norm"):
      chosen[i] = False
    elif name == "b" and isinstance(parent, Mapping) and "w" in parent:
      chosen[i] = False
  return chosen


def selected(tree, where: Where | None = None, *, require_any: bool = True,
             require_float: bool = True, what: str = "params"):
  """Flattens ``tree`` and applies ``where`` (None: the default rule, with containers).

  Returns ``(paths, leaves, treedef, chosen)`` where ``chosen`` is a list of bools.
  Raises ``ValueError`` naming the path if ``where`` selects a non-float leaf, or if it
  selects nothing and ``require_any``.
  """
  paths, leaves, treedef = flatten(tree)
  if where is None or where is default_where:
    chosen = _default_chosen(paths, leaves, tree)
  else:
    chosen = [bool(where(p, x)) for p, x in zip(paths, leaves, strict=True)]
  for path, leaf, pick in zip(paths, leaves, chosen, strict=True):
    if pick and require_float and not is_float(leaf):
      dtype = getattr(leaf, "dtype", type(leaf).__name__)
      raise ValueError(f"`where` selected the non-float leaf '{path}' (dtype {dtype}); only "
                       "floating-point leaves can be pruned.")
  if require_any and not any(chosen):
    raise ValueError(f"`where` selects no leaf of the {what} tree (paths: "
                     f"{', '.join(paths[:8])}{', ...' if len(paths) > 8 else ''}).")
  return paths, leaves, treedef, chosen


def map_selected(fn: Callable[[str, Any], Any], tree, where: Where | None = None, **kw):
  """Applies ``fn(path, leaf)`` to the leaves ``where`` selects; others pass unchanged."""
  paths, leaves, treedef, chosen = selected(tree, where, **kw)
  out = [fn(p, x) if c else x for p, x, c in zip(paths, leaves, chosen)]
  return jax.tree.unflatten(treedef, out)


def _listing(items, n=5) -> str:
  return ", ".join(f"'{x}'" for x in items[:n]) + (", ..." if len(items) > n else "")


def structure_mismatch(a, b, name_a: str, name_b: str) -> str | None:
  """None if ``a`` and ``b`` have the same leaf paths in the same order, else a short message
  naming the paths that differ (never the whole treedefs)."""
  pa, pb = flatten(a)[0], flatten(b)[0]
  if pa == pb:
    return None
  only_a = [p for p in pa if p not in set(pb)]
  only_b = [p for p in pb if p not in set(pa)]
  if only_a or only_b:
    detail = "; ".join(
        ([f"only in {name_a}: {_listing(only_a)}"] if only_a else [])
        + ([f"only in {name_b}: {_listing(only_b)}"] if only_b else []))
  elif len(pa) != len(pb):
    detail = f"{name_a} has {len(pa)} leaves, {name_b} {len(pb)} (repeated paths)"
  else:
    i = next(i for i, (x, y) in enumerate(zip(pa, pb)) if x != y)
    detail = f"same paths in another order (leaf {i}: '{pa[i]}' vs '{pb[i]}')"
  return f"{name_a} and {name_b} have different tree structures: {detail}."


def check_same_structure(a, b, name_a: str, name_b: str) -> None:
  """Raises ``ValueError`` naming the differing paths unless ``a`` and ``b`` have the same leaf
  paths in the same order (NNX ``Variable`` wrappers, ``FrozenDict`` vs ``dict`` and
  ``nnx.State`` vs ``dict`` do not count as differences)."""
  msg = structure_mismatch(a, b, name_a, name_b)
  if msg is not None:
    raise ValueError(msg)


def is_function(x, like) -> bool:
  """Whether ``x`` is to be called rather than read as a tree like ``like``: it is callable and
  not a tree of non-callables with ``like``'s paths (an ``eqx.Module`` of scores or sparsities
  is callable, but it is a tree)."""
  if not callable(x):
    return False
  paths, leaves, _ = flatten(x)
  return paths != flatten(like)[0] or any(callable(v) for v in leaves)


def is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)
