"""Paths of parameter trees, for writing your own ``where`` functions.

Every jaxprune function that takes a tree of parameters also takes ``where``: a callable
``(path, leaf) -> bool`` that says which leaves are prunable. ``path`` is a string such as
``"layers/0/kernel"``: dict keys, sequence indices and attribute names joined by ``/``. The
trailing ``value`` that Flax NNX ``Variable`` wrappers add is dropped, so a pure-dict params
tree and the ``nnx.State`` of the same model give the same paths. The default ``where`` is
:func:`default_where`: floating leaves with ``ndim >= 2`` (kernels, not biases or norm scales).

Examples:
  Prune only the MLP kernels of a model (print the paths first to see what to match):

  >>> import jax.numpy as jnp, jaxprune as jp
  >>> params = {"attn": {"kernel": jnp.ones((4, 4))},
  ...           "mlp": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)}}
  >>> jp.tree.paths(params)
  ['attn/kernel', 'mlp/bias', 'mlp/kernel']
  >>> mlp_only = lambda path, leaf: jp.tree.default_where(path, leaf) and "mlp" in path
  >>> masks = jp.topk_mask(jp.magnitude_scores(params, where=mlp_only), 0.5, where=mlp_only)
  >>> {p: m.shape for p, m in jp.tree.leaves_with_paths(masks)}
  {'attn/kernel': (), 'mlp/bias': (), 'mlp/kernel': (4, 8)}
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._typing import PyTree, Where

__all__ = ["Where", "path_str", "flatten", "leaves_with_paths", "paths", "is_float",
           "default_where"]

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


def path_str(keypath: tuple[Any, ...]) -> str:
  """Turns a JAX key path into ``"a/b/0/kernel"`` (dropping NNX's trailing ``value``).

  Args:
    keypath: a key path from ``jax.tree_util.tree_flatten_with_path`` (or ``jax.tree.map``
      with ``jax.tree_util.tree_map_with_path``).

  Returns:
    The path string that ``where`` functions receive.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> tree = {"layers": [{"kernel": jnp.ones((2, 2))}]}
    >>> [jp.tree.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    ['layers/0/kernel']
  """
  names = [_key_name(k) for k in keypath]
  if names and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and names[-1] in _NNX_VALUE_ATTRS:
    names = names[:-1]
  return "/".join(names)


def flatten(tree: PyTree) -> tuple[list[str], list[Any], jax.tree_util.PyTreeDef]:
  """Like ``jax.tree.flatten``, with the leaves' path strings: ``(paths, leaves, treedef)``.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> paths, leaves, treedef = jp.tree.flatten({"b": jnp.zeros(2), "w": jnp.ones((2, 2))})
    >>> paths
    ['b', 'w']
    >>> jax.tree.unflatten(treedef, [x + 1 for x in leaves])["b"]
    Array([1., 1.], dtype=float32)
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [path_str(kp) for kp, _ in with_path]
  leaves = [leaf for _, leaf in with_path]
  return paths, leaves, treedef


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
  """``[(path, leaf), ...]`` in ``jax.tree.leaves`` order (``dict(...)`` of it maps paths).

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> [(p, x.shape) for p, x in jp.tree.leaves_with_paths({"w": jnp.ones((2, 3))})]
    [('w', (2, 3))]
  """
  paths_, leaves, _ = flatten(tree)
  return list(zip(paths_, leaves, strict=True))


def paths(tree: PyTree) -> list[str]:
  """The path strings of the leaves of ``tree``, in ``jax.tree.leaves`` order.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> jp.tree.paths({"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}})
    ['dense/bias', 'dense/kernel']
  """
  return flatten(tree)[0]


def is_float(leaf: Any) -> bool:
  """Whether ``leaf`` is a floating-point array (only those can be pruned).

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> jp.tree.is_float(jnp.ones(2)), jp.tree.is_float(jnp.ones(2, int)), jp.tree.is_float(1.)
    (True, False, False)
  """
  return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def default_where(path: str, leaf: Any) -> bool:
  """The default prunable-leaf rule: floating arrays with ``ndim >= 2`` (kernels, not biases).

  Build your own ``where`` on top of it to narrow it by path (see the module example).

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> jp.tree.default_where("dense/kernel", jnp.ones((2, 2)))
    True
    >>> jp.tree.default_where("dense/bias", jnp.ones(2))
    False
  """
  del path
  return is_float(leaf) and np.ndim(leaf) >= 2
