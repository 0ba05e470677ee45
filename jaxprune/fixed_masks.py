"""Holding given masks fixed while training (the lottery-ticket pattern), at no cost.

:func:`keep_masks` is a chain link that only enforces masks it is given: it never recomputes
them, so a step costs what the plain optimizer step costs plus one ``where`` per pruned leaf.
Its state is a :class:`jaxprune.PruningState`, so :func:`jaxprune.masks_from_state` and
:func:`jaxprune.replace_masks` work on it as on every other pruning transform.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import _transform_utils as _util
from jaxprune import _tree
from jaxprune._typing import Masks, Params
from jaxprune.transforms import PruningState

__all__ = ["keep_masks"]


def _resolve(masks, params):
  """The masks as bool arrays shaped like the params (scalar True stays the scalar True)."""
  m = masks(params) if callable(masks) and not isinstance(masks, (dict, list, tuple)) else masks
  _tree.check_same_structure(params, m, "params", "masks")
  paths, leaves, treedef = _tree.flatten(params)
  out = []
  for p, x, mk in zip(paths, leaves, treedef.flatten_up_to(m), strict=True):
    dtype = getattr(mk, "dtype", None)
    if dtype != jnp.bool_ and not isinstance(mk, (bool, np.bool_)):
      raise ValueError(f"mask for '{p}' must be bool, got {dtype or type(mk).__name__}.")
    if np.shape(mk) not in ((), np.shape(x)):
      raise ValueError(f"mask for '{p}' has shape {np.shape(mk)}; the leaf has shape "
                       f"{np.shape(x)} (a mask is the leaf's shape, or a scalar).")
    if np.shape(mk) == () and (_tree.is_traced(mk) or bool(mk)):
      out.append(jnp.ones((), bool))   # the leaf is not pruned
    else:
      out.append(jnp.broadcast_to(jnp.asarray(mk, bool), np.shape(x)))
  return jax.tree.unflatten(treedef, out)


def keep_masks(masks: Masks | Callable[[Params], Masks]) -> optax.GradientTransformationExtraArgs:
  """A chain link that holds given masks fixed: emits ``where(mask, u, -p)`` and nothing else.

  Goes **last** in ``optax.chain`` (like :func:`jaxprune.magnitude_pruning`): every pruned
  weight lands on exactly 0 and stays there, and the masks are never recomputed, so a step
  costs what the plain optimizer step costs. Use it to train a lottery ticket, to fine-tune a
  model pruned one-shot (:func:`jaxprune.prune`, :func:`jaxprune.wanda`), or to continue with
  the masks of another run. Change the masks later with :func:`jaxprune.replace_masks`.

  Args:
    masks: a tree of bool masks like the params (a scalar ``True`` for a leaf that is not
      pruned; a scalar ``False`` prunes the whole leaf), or a callable ``params -> masks``
      called once by ``init`` (needed with ``nnx.Optimizer``, whose ``init`` sees the params as
      ``nnx.State``). With ``optax.inject_hyperparams``, list ``masks`` in ``static_args``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`jaxprune.PruningState`
    (``scores`` and ``inner_state`` are ``optax.EmptyState()``).

  Raises:
    ValueError: at ``init``, naming the leaf path, if the masks' tree differs from the params'
      or a mask is not bool of the leaf's shape (or a scalar).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxprune as jp
    >>> params = {"w": jnp.array([[1., -2.], [3., 0.5]]), "b": jnp.zeros(2)}
    >>> _, masks = jp.prune(params, 0.5)
    >>> tx = optax.chain(optax.sgd(0.1), jp.keep_masks(masks))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([[ 0. , -2.1],
           [ 2.9,  0. ]], dtype=float32)
    >>> bool(jp.masks_from_state(state)["b"])
    True
  """
  def init_fn(params):
    if _util.is_placeholder(params):  # optax.tree.map_params inits with a placeholder
      return PruningState(jnp.zeros([], jnp.int32), jax.tree.map(lambda x: x, params),
                          optax.EmptyState(), optax.EmptyState())
    return PruningState(jnp.zeros([], jnp.int32), _resolve(masks, params), optax.EmptyState(),
                        optax.EmptyState())

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(_util.NO_PARAMS_MSG)
    m_leaves = jax.tree.structure(updates).flatten_up_to(state.masks)
    chosen = [np.ndim(m) > 0 for m in m_leaves]
    updates = _util.enforce(state.masks, updates, params, chosen)
    return updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
