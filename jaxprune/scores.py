"""Layer 1 — scores: ``params (, grads, key, activations) -> scores``, same tree.

A score says how much a weight is worth keeping: larger is kept. Every function is pure and
jit-able. Scores are computed for the leaves ``where`` selects (default: floating leaves with
``ndim >= 2``); the other leaves are returned unchanged, and :func:`jaxprune.topk_mask` with the
same ``where`` ignores them.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxprune import _tree
from jaxprune._typing import Params, PyTree, Scores, Where


def magnitude_scores(params: Params, *, where: Where | None = None) -> Scores:
  """Magnitude scores ``|w|`` (Han et al., 2015).

  Args:
    params: a pytree of arrays.
    where: ``(path, leaf) -> bool`` choosing prunable leaves.

  Returns:
    A tree like ``params`` with ``|w|`` on the selected leaves.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> jp.magnitude_scores({"w": jnp.array([[-2., 1.]])})["w"]
    Array([[2., 1.]], dtype=float32)

  References:
    Han et al., "Learning both Weights and Connections for Efficient Neural Networks", 2015.
  """
  return _tree.map_selected(lambda _, p: jnp.abs(p), params, where)


def random_scores(params: Params, key: jax.Array, *, where: Where | None = None) -> Scores:
  """Uniform random scores: pruning by them removes a random subset of each leaf.

  Each selected leaf gets its own stream, ``fold_in(key, leaf_index)``, so the scores of a leaf
  do not change when other leaves are added after it.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> s = jp.random_scores({"w": jnp.ones((2, 3))}, jax.random.key(0))
    >>> s["w"].shape
    (2, 3)
  """
  paths, leaves, treedef, chosen = _tree.selected(params, where)
  out = []
  for i, (leaf, pick) in enumerate(zip(leaves, chosen)):
    if pick:
      leaf = jax.random.uniform(jax.random.fold_in(key, i), leaf.shape, jnp.float32)
    out.append(leaf)
  return jax.tree.unflatten(treedef, out)


def _check_grads(params, grads, name="grads"):
  _tree.check_same_structure(params, grads, "params", name)


def saliency_scores(params: Params, grads: PyTree, *, where: Where | None = None) -> Scores:
  """Connection saliency ``|w · g|``: the first-order Taylor estimate of the loss change.

  With the gradient of a single mini-batch at initialization this is SNIP (Lee et al., 2019);
  during training it is the first-order Taylor criterion (Molchanov et al., 2019).

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> p = {"w": jnp.array([[1., -2.]])}
    >>> g = {"w": jnp.array([[3., 0.5]])}
    >>> jp.saliency_scores(p, g)["w"]
    Array([[3., 1.]], dtype=float32)

  References:
    Lee et al., "SNIP: Single-shot Network Pruning based on Connection Sensitivity", ICLR 2019.
    Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019.
  """
  _check_grads(params, grads)
  g_leaves = jax.tree.leaves(grads)
  paths, leaves, treedef, chosen = _tree.selected(params, where)
  out = [jnp.abs(p * g) if c else p for p, g, c in zip(leaves, g_leaves, chosen)]
  return jax.tree.unflatten(treedef, out)


def movement_scores(params: Params, grads: PyTree, *, accumulated: Scores | None = None,
                    where: Where | None = None) -> Scores:
  """Movement scores ``S ← S − w · g`` (Sanh et al., 2020).

  Weights moving away from zero score high, weights moving toward zero score low. Call it once
  per step with the step's gradient and the previous scores as ``accumulated`` (or use
  :func:`jaxprune.movement_pruning`, which keeps them in its state).

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> p, g = {"w": jnp.array([[1., 1.]])}, {"w": jnp.array([[-1., 1.]])}
    >>> s = jp.movement_scores(p, g)
    >>> jp.movement_scores(p, g, accumulated=s)["w"]
    Array([[ 2., -2.]], dtype=float32)

  References:
    Sanh, Wolf and Rush, "Movement Pruning: Adaptive Sparsity by Fine-Tuning", NeurIPS 2020.
  """
  _check_grads(params, grads)
  if accumulated is not None:
    _tree.check_same_structure(params, accumulated, "params", "accumulated")
    acc = jax.tree.leaves(accumulated)
  else:
    acc = [None] * len(jax.tree.leaves(params))
  g_leaves = jax.tree.leaves(grads)
  paths, leaves, treedef, chosen = _tree.selected(params, where)
  out = []
  for p, g, a, c in zip(leaves, g_leaves, acc, chosen):
    if c:
      s = -(p * g)
      out.append(s if a is None else a + s)
    else:
      out.append(p)
  return jax.tree.unflatten(treedef, out)


def activation_scores(params: Params, input_norms: PyTree, *,
                      where: Where | None = None, layout: Any = None) -> Scores:
  """Wanda scores ``|W_ij| · ‖X_i‖₂``: weight magnitude times the norm of its input feature.

  ``input_norms`` holds, for every selected leaf, a vector with the L2 norm (over all tokens or
  examples of a calibration batch) of each input feature, i.e. of each index of the weight's
  input axis: ``-2`` for Flax ``kernel`` and Haiku ``w`` ``(..., in, out)``, ``1`` for Equinox /
  PyTorch ``weight`` ``(out, in, ...)`` (the leaf's layout, see :mod:`jaxprune.tree`; override
  it with ``layout=`` as in :func:`jaxprune.topk_mask`). Give leaves that are not selected any
  placeholder (e.g. ``None`` is not allowed as a leaf; use ``0.``).

  Wanda compares weights per output unit: prune with ``structure=jp.per_output()`` so that
  every output unit loses the same fraction of its inputs, as in the paper.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> p = {"w": jnp.array([[1., -1.], [2., 2.]])}      # (in=2, out=2)
    >>> norms = {"w": jnp.array([3., 0.5])}              # one norm per input feature
    >>> jp.activation_scores(p, norms)["w"]
    Array([[3., 3.],
           [1., 1.]], dtype=float32)

  References:
    Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (Wanda),
    ICLR 2024 (arXiv 2023).
  """
  _tree.check_same_structure(params, input_norms, "params", "input_norms")
  n_leaves = jax.tree.leaves(input_norms)
  paths, leaves, treedef, chosen = _tree.selected(params, where)
  leaf_layout = _tree.layout_fn(layout)
  out = []
  for path, p, n, c in zip(paths, leaves, n_leaves, chosen):
    if c:
      n = jnp.asarray(n)
      given = leaf_layout(path, p).in_axis
      ax = given % p.ndim
      if n.ndim != 1 or n.shape[0] != p.shape[ax]:
        raise ValueError(f"input_norms for '{path}' must be a vector of length {p.shape[ax]} "
                         f"(the kernel's input axis {given} of shape {p.shape}); got shape "
                         f"{n.shape}.")
      p = jnp.abs(p) * n.astype(p.dtype).reshape(
          tuple(-1 if i == ax else 1 for i in range(p.ndim)))
    out.append(p)
  return jax.tree.unflatten(treedef, out)
