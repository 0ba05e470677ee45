"""The Flax NNX adapter: :func:`module_fn`, :func:`shrink_module`, and a registry of how each
layer class's size attributes (``Linear.out_features``, ``BatchNorm.num_features``, ...) follow
its arrays, extensible with :func:`register_layer`.

Flax is an optional dependency: it is imported when these functions run, not with the package.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxprune import _tree
from jaxprune.surgery._shrink import shrink

Resize = Callable[[Any], None]
_LAYERS: dict[type, Resize] = {}


def _shape(v) -> tuple[int, ...]:
  """The shape of an NNX ``Variable``'s value (or of an array)."""
  return tuple(np.shape(v.get_value() if hasattr(v, "get_value") else v))


def _linear(m) -> None:
  m.in_features, m.out_features = _shape(m.kernel)


def _linear_general(m) -> None:
  ks = _shape(m.kernel)
  nb, ni = len(m.batch_axis), len(m.in_features)
  m.in_features, m.out_features = tuple(ks[nb:nb + ni]), tuple(ks[nb + ni:])


def _conv(m) -> None:
  ks = _shape(m.kernel)
  m.in_features, m.out_features = ks[-2] * m.feature_group_count, ks[-1]


def _embed(m) -> None:
  m.num_embeddings, m.features = _shape(m.embedding)


def _attention(m) -> None:
  qin, heads, head_dim = _shape(m.query.kernel)
  m.in_features, m.num_heads, m.head_dim = qin, heads, head_dim
  m.qkv_features = heads * head_dim
  m.in_kv_features, m.num_kv_heads = _shape(m.key.kernel)[:2]
  m.out_features = _shape(m.out.kernel)[-1]


def _norm(m) -> None:
  from flax import nnx

  for attr in ("scale", "bias", "mean"):
    v = getattr(m, attr, None)
    if isinstance(v, nnx.Variable):
      m.num_features = _shape(v)[-1]
      break


def _cell(m) -> None:
  """GRU/LSTM/simple cells: hidden units from the recurrent kernel, inputs from the input one."""
  from flax import nnx

  rec = getattr(m, "dense_h", getattr(m, "hi", None))
  inp = getattr(m, "dense_i", getattr(m, "ii", None))
  if isinstance(rec, nnx.Linear) and isinstance(inp, nnx.Linear):
    m.hidden_features = _shape(rec.kernel)[0]
    m.in_features = _shape(inp.kernel)[0]


def _layers() -> dict[type, Resize]:
  """The registry, with flax's own layers in it (added on first use: flax is optional)."""
  if not _LAYERS:
    from flax import nnx
    from flax.nnx.nn.recurrent import RNNCellBase

    _LAYERS.update({
        nnx.Linear: _linear, nnx.LinearGeneral: _linear_general, nnx.Conv: _conv,
        nnx.Embed: _embed, nnx.MultiHeadAttention: _attention,
        nnx.BatchNorm: _norm, nnx.LayerNorm: _norm, nnx.RMSNorm: _norm, nnx.GroupNorm: _norm,
        RNNCellBase: _cell})
  return _LAYERS


def register_layer(cls: type, resize: Resize | None = None) -> Any:
  """Registers how the size attributes of an NNX layer class follow its (shrunk) arrays.

  :func:`module_fn` and :func:`shrink_module` call ``resize(layer)`` on every sub-module that is
  an instance of ``cls`` (the most specific registered class of its MRO wins), after
  :func:`shrink` changed its arrays, so that attributes its ``__call__`` reads (a hidden size
  for a carry, a head count for a reshape) describe the new shapes. Flax's ``Linear``,
  ``LinearGeneral``, ``Conv``, ``Embed``, ``MultiHeadAttention``, ``BatchNorm``/``LayerNorm``/
  ``RMSNorm``/``GroupNorm`` and RNN cells (``RNNCellBase``) are registered already; registering
  one of them again replaces its rule.

  Args:
    cls: a ``flax.nnx.Module`` subclass.
    resize: ``resize(layer) -> None``, setting the layer's size attributes from its arrays'
      shapes. If omitted, ``register_layer(cls)`` is a decorator for it.

  Returns:
    ``resize`` (or the decorator).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune import surgery
    >>> class Mix(nnx.Module):  # a square mixing layer that keeps its width in an attribute
    ...   def __init__(self, n):
    ...     self.n = n
    ...     self.w = nnx.Param(jnp.eye(n))
    ...   def __call__(self, x):
    ...     return x @ self.w[...].reshape(self.n, self.n)
    >>> @surgery.register_layer(Mix)
    ... def _(m):
    ...   m.n = m.w.shape[0]
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu, Mix(4),
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> x = jnp.ones((1, 3))
    >>> fn, state = surgery.module_fn(model)
    >>> masks = surgery.group_masks(surgery.channel_groups(fn, state, x), state, 0.5)
    >>> surgery.shrink_module(model, masks, x).layers[2].n
    2
  """
  if not isinstance(cls, type):
    raise TypeError(f"register_layer: cls must be a class, got {cls!r}.")
  if resize is None:
    return lambda fn: register_layer(cls, fn)
  if not callable(resize):
    raise TypeError(f"register_layer: resize must be callable, got {resize!r}.")
  _layers()[cls] = resize
  return resize


def resize_layers(model) -> None:
  """Updates the size attributes of every registered layer in ``model`` from its arrays."""
  from flax import nnx

  layers = _layers()
  for _, m in nnx.iter_modules(model):
    for klass in type(m).__mro__:
      resize = layers.get(klass)
      if resize is not None:
        resize(m)
        break


def module_fn(model: Any) -> tuple[Callable[..., Any], Any]:
  """A pure function of an NNX module's full state, for :func:`channel_groups` and friends.

  The function merges the module from its state and updates the size attributes of its layers
  from the arrays' shapes (see :func:`register_layer`: ``Linear``, ``LinearGeneral``, ``Conv``,
  ``Embed``, norms, ``MultiHeadAttention`` and GRU/LSTM/simple cells are known), so that it also
  runs on shrunk states.

  Args:
    model: a ``flax.nnx.Module`` (deterministic: dropout off, BatchNorm as you want it traced).

  Returns:
    ``(fn, state)`` with ``fn(state, *inputs) == model(*inputs)`` and ``state = nnx.state(model)``
    (params, batch statistics, RNG state: everything, so BatchNorm statistics shrink too).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune import surgery
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> fn, state = surgery.module_fn(model)
    >>> [g.name for g in surgery.channel_groups(fn, state, jnp.ones((1, 3))) if g.prunable]
    ['layers/0/kernel:1']
  """
  from flax import nnx

  graphdef, state = nnx.split(model)

  def fn(state, *inputs):
    m = nnx.merge(graphdef, state)
    resize_layers(m)
    return m(*inputs)

  return fn, state


def shrink_module(model: Any, masks: Any, *inputs: Any, where: _tree.Where | None = None,
                  strict: bool = True, verify: bool = True) -> Any:
  """A new NNX module of the same class holding the smaller arrays :func:`shrink` computes.

  Args:
    model: a ``flax.nnx.Module``; left unchanged.
    masks: a mask tree for ``nnx.state(model)`` (e.g. :func:`group_masks` on
      ``module_fn(model)[1]``) or for a part of it such as ``nnx.state(model, nnx.Param)``;
      leaves are matched by path, and leaves without a mask are kept (scalar ``True``).
    *inputs: example inputs for tracing and verification.
    where: the leaves the masks apply to (default: floating, ``ndim >= 2`` leaves that
      ``masks`` has).
    strict, verify: as in :func:`shrink`.

  Returns:
    A new module whose output equals the masked ``model``'s; the size attributes of its layers
    (``Linear.out_features``, ``BatchNorm.num_features``, ``MultiHeadAttention.num_heads``, ...,
    and those :func:`register_layer` adds) describe the new shapes.

  Raises:
    ValueError: as :func:`shrink`, or naming a mask path the model does not have.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune import surgery
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> x = jnp.ones((1, 3))
    >>> fn, state = surgery.module_fn(model)
    >>> masks = surgery.group_masks(surgery.channel_groups(fn, state, x), state, 0.5)
    >>> small = surgery.shrink_module(model, masks, x)
    >>> small.layers[0].out_features, small.layers[2].kernel.shape
    (2, (2, 2))
  """
  from flax import nnx

  fn, state = module_fn(model)
  paths, leaves, treedef = _tree.flatten(state)
  mpaths, mleaves, _ = _tree.flatten(masks)
  given = dict(zip(mpaths, mleaves, strict=False))
  unknown = sorted(set(given) - set(paths))
  if unknown:
    raise ValueError(f"masks name leaves the model does not have: {unknown[:5]} (model paths: "
                     f"{paths[:8]}{', ...' if len(paths) > 8 else ''}).")
  full = jax.tree.unflatten(treedef, [given.get(p, True) for p in paths])
  if where is None:
    where = lambda p, x: p in given and _tree.default_where(p, x)
  small = shrink(fn, state, full, *inputs, where=where, strict=strict, verify=verify)
  new = nnx.merge(nnx.graphdef(model), small)
  resize_layers(new)
  return new
