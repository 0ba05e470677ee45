"""Paths of parameter trees, for writing your own ``where`` functions.

Every jaxprune function that takes a tree of parameters also takes ``where``: a callable
``(path, leaf) -> bool`` that says which leaves are prunable. ``path`` is a string such as
``"layers/0/kernel"``: dict keys, sequence indices and attribute names joined by ``/``. The
trailing ``value`` that Flax NNX ``Variable`` wrappers add is dropped, so a pure-dict params
tree and the ``nnx.State`` of the same model give the same paths. The default ``where`` is
:func:`default_where`: floating leaves with ``ndim >= 2`` that are not biases or norm scales
(by name: ``bias``, ``scale``, ``offset``, ...; see :data:`NOT_PRUNED_NAMES`).

**Layouts.** Structured pruning needs to know which axis of a weight is its input (N:M groups
run along it) and which its output (:func:`jaxprune.channels` removes output units).
:func:`default_layout` reads it from the leaf's name: Flax ``kernel`` and Haiku ``w`` are
``(..., in, out)`` (:data:`IN_OUT`); Equinox and PyTorch-style ``weight`` is ``(out, in, ...)``
(:data:`OUT_IN`); Haiku's transposed convolutions (``w`` under a ``..._transpose`` module) are
``(..., out, in)``; any other name is taken as ``(..., in, out)``. Override it for one call
with the structure's ``axis`` (``jp.n_of_m(2, 4, axis=1)``) or for a whole tree with
``layout=`` (``"flax"``, ``"haiku"``, ``"torch"``, ``"equinox"``, a :class:`Layout`, or a
callable ``(path, leaf) -> Layout``) on :func:`jaxprune.topk_mask`, :func:`jaxprune.prune` and
the pruning transforms.

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

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._typing import PyTree, Where

__all__ = ["Where", "path_str", "flatten", "leaves_with_paths", "paths", "is_float",
           "default_where", "leaf_name", "NOT_PRUNED_NAMES", "Layout", "IN_OUT", "OUT_IN",
           "default_layout", "layout_fn"]

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


NOT_PRUNED_NAMES = frozenset({
    "bias", "scale", "offset", "gamma", "beta", "mean", "var", "running_mean", "running_var",
    "moving_mean", "moving_variance"})
"""Leaf names that :func:`default_where` never selects, whatever their shape: biases (Flax,
Equinox, PyTorch ``bias``; also ``bias_*`` such as a GRU's ``bias_hh``) and the scales, offsets
and statistics of normalization layers (Flax and Haiku ``scale``/``offset``, Keras
``gamma``/``beta``, ``mean``/``var`` and their running averages)."""


def leaf_name(path: str) -> str:
  """The last component of a path: ``"conv/weight"`` -> ``"weight"``.

  A dotted name (a PyTorch ``state_dict`` key such as ``"features.0.weight"``) gives its last
  part.

  Examples:
    >>> import jaxprune as jp
    >>> jp.tree.leaf_name("layers/0/kernel"), jp.tree.leaf_name("features.0.weight")
    ('kernel', 'weight')
  """
  return path.rsplit("/", 1)[-1].rsplit(".", 1)[-1]


def _is_bias_or_norm_name(name: str) -> bool:
  return name in NOT_PRUNED_NAMES or name.startswith("bias_")


def default_where(path: str, leaf: Any) -> bool:
  """The default prunable-leaf rule: floating arrays with ``ndim >= 2`` that are not biases or
  norm scales (by name, :data:`NOT_PRUNED_NAMES`), i.e. the kernels and weights of any framework.

  Equinox's ``Conv2d`` bias, of shape ``(C, 1, 1)``, and Haiku's ``BatchNorm`` scale, of shape
  ``(1, 1, 1, C)``, are not selected. Called with ``where=None``, jaxprune also looks at each
  leaf's container: it skips a normalization layer's ``weight`` (an ``eqx.nn.LayerNorm`` whose
  shape has several axes) and a Haiku bias ``b`` next to its ``w`` (a ``(C, 1, 1)`` bias of an
  NCHW convolution).

  Build your own ``where`` on top of it to narrow it by path (see the module example).

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> jp.tree.default_where("dense/kernel", jnp.ones((2, 2)))
    True
    >>> jp.tree.default_where("dense/bias", jnp.ones(2))
    False
    >>> jp.tree.default_where("conv/bias", jnp.ones((8, 1, 1)))   # Equinox Conv2d
    False
  """
  return (is_float(leaf) and np.ndim(leaf) >= 2
          and not _is_bias_or_norm_name(leaf_name(path)))


# ----------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which axis of a weight is its input and which its output (negative axes count from the end).

  Attributes:
    in_axis: the input (contraction) axis: :func:`jaxprune.n_of_m` groups run along it.
    out_axis: the output axis: :func:`jaxprune.channels` and :func:`jaxprune.per_output` take
      their units along it.

  Examples:
    >>> import jaxprune as jp
    >>> jp.tree.OUT_IN
    Layout(in_axis=1, out_axis=0)
  """
  in_axis: int
  out_axis: int


IN_OUT = Layout(in_axis=-2, out_axis=-1)
"""``(..., in, out)``: Flax ``kernel`` (``Dense``, ``Conv``), Haiku ``w`` (``Linear``, ``Conv``)."""

OUT_IN = Layout(in_axis=1, out_axis=0)
"""``(out, in, ...)``: Equinox and PyTorch ``weight`` (``Linear``, ``Conv``, ``ConvTranspose``)."""

_TRANSPOSED = Layout(in_axis=-1, out_axis=-2)  # Haiku ConvNDTranspose: kernel + (out, in)

_LAYOUT_NAMES = {"flax": IN_OUT, "haiku": IN_OUT, "in_out": IN_OUT,
                 "torch": OUT_IN, "pytorch": OUT_IN, "equinox": OUT_IN, "out_in": OUT_IN}


def default_layout(path: str, leaf: Any = None) -> Layout:
  """The layout of a weight, read from its name (see the module docstring).

  ``weight`` and ``weight_*`` (Equinox, PyTorch: ``weight_ih`` of a GRU) are
  :data:`OUT_IN`; a Haiku ``w`` under a module whose name contains ``transpose`` is
  ``(..., out, in)``; everything else (Flax ``kernel``, Haiku ``w``, any other name) is
  :data:`IN_OUT`.

  Examples:
    >>> import jaxprune as jp
    >>> jp.tree.default_layout("conv/weight"), jp.tree.default_layout("dense/kernel")
    (Layout(in_axis=1, out_axis=0), Layout(in_axis=-2, out_axis=-1))
  """
  del leaf
  name = leaf_name(path)
  if name == "weight" or name.startswith("weight_"):
    return OUT_IN
  parts = path.split("/")
  if name == "w" and len(parts) > 1 and "transpose" in parts[-2]:
    return _TRANSPOSED
  return IN_OUT


def layout_fn(layout: str | Layout | Callable[[str, Any], Layout] | None
              ) -> Callable[[str, Any], Layout]:
  """The ``(path, leaf) -> Layout`` function a ``layout=`` argument stands for.

  Args:
    layout: None (:func:`default_layout`, by name), ``"flax"``/``"haiku"``/``"in_out"``
      (:data:`IN_OUT` for every leaf), ``"torch"``/``"pytorch"``/``"equinox"``/``"out_in"``
      (:data:`OUT_IN`), a :class:`Layout`, or a callable ``(path, leaf) -> Layout``.

  Raises:
    ValueError: for anything else.

  Examples:
    >>> import jaxprune as jp
    >>> jp.tree.layout_fn("torch")("dense/kernel", None)
    Layout(in_axis=1, out_axis=0)
  """
  if layout is None:
    return default_layout
  if isinstance(layout, Layout):
    return lambda path, leaf: layout
  if isinstance(layout, str):
    if layout.lower() not in _LAYOUT_NAMES:
      raise ValueError(f"layout must be one of {sorted(_LAYOUT_NAMES)}, a jp.tree.Layout or a "
                       f"callable (path, leaf) -> Layout; got {layout!r}.")
    return layout_fn(_LAYOUT_NAMES[layout.lower()])
  if callable(layout):
    return layout
  raise ValueError("layout must be None, a name ('flax', 'haiku', 'torch', 'equinox'), a "
                   f"jp.tree.Layout or a callable (path, leaf) -> Layout; got "
                   f"{type(layout).__name__}.")
