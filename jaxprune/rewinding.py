"""Lottery-ticket rewinding: the masked starting point for the next round of iterative pruning.

Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2020):

1. train (with a pruning transform) and read the masks: ``masks = jp.masks_from_state(state)``;
2. rewind: ``params = jp.rewind(masks, params_at_k)`` — the weights saved at step ``k``
   (``k = 0``: the initialization) with the pruned ones set to 0;
3. train the next round from there with the same masks: build the next round's optimizer and
   put the masks in its state with :func:`jaxprune.replace_masks`; a
   ``magnitude_pruning`` link with a higher sparsity then prunes further from the ticket, one
   with sparsity 0 keeps it fixed.

:func:`ticket_masks` computes the next round's masks from the trained weights directly, for
loops that prune between rounds instead of during them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _tree
from jaxprune._typing import Masks, Params, Where
from jaxprune.masks import apply_masks, topk_mask
from jaxprune.scores import magnitude_scores

__all__ = ["rewind", "ticket_masks"]


def rewind(masks: Masks, rewind_params: Params) -> Params:
  """The rewound, masked starting point: ``rewind_params`` with the pruned weights set to 0.

  Pure: ``masks`` are the keep-masks of the trained model (e.g. from
  :func:`jaxprune.masks_from_state`), ``rewind_params`` the parameters saved at step ``k`` of the
  first round (or at initialization). Nothing of the trained weights is kept.

  Args:
    masks: bool keep-masks with the params' tree (scalar ``True`` for unpruned leaves).
    rewind_params: the parameters to rewind to (same tree and shapes).

  Returns:
    ``apply_masks(rewind_params, masks)``.

  Raises:
    ValueError: naming the path, if the trees or shapes differ.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> init = {"w": jnp.array([[0.1, -0.2], [0.3, 0.4]])}
    >>> masks = {"w": jnp.array([[False, True], [True, False]])}
    >>> jp.rewind(masks, init)["w"]
    Array([[ 0. , -0.2],
           [ 0.3,  0. ]], dtype=float32)

  References:
    Frankle and Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural
    Networks", ICLR 2019; Frankle, Dziugaite, Roy and Carbin, "Linear Mode Connectivity and the
    Lottery Ticket Hypothesis", ICML 2020 (rewinding to step k).
  """
  return apply_masks(rewind_params, masks)


def ticket_masks(trained_params: Params, sparsity: float | jax.Array, *,
                 masks: Masks | None = None, scope: str = "global",
                 where: Where | None = None) -> Masks:
  """The next round's masks: prune the trained weights of smallest magnitude, keeping earlier
  pruning (a weight pruned in ``masks`` stays pruned).

  Exactly ``round(sparsity · N)`` prunable weights are pruned in total (``scope="global"``, as in
  the lottery-ticket papers) or ``round(sparsity · n)`` per leaf (``"layerwise"``), as long as
  ``masks`` prunes no more than that.

  Args:
    trained_params: the weights at the end of the round.
    sparsity: the total fraction pruned after this round (e.g. ``1 − 0.8^r`` after ``r`` rounds
      of 20%, see :func:`jaxprune.iterative_schedule`).
    masks: the previous round's masks, or None.
    scope: ``"global"`` or ``"layerwise"``.
    where: ``(path, leaf) -> bool`` choosing prunable leaves.

  Returns:
    Bool keep-masks like ``trained_params``.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> trained = {"w": jnp.array([[4., 3.], [2., 1.]])}
    >>> m1 = jp.ticket_masks(trained, 0.25)
    >>> m1["w"]
    Array([[ True,  True],
           [ True, False]], dtype=bool)
    >>> jp.ticket_masks({"w": jnp.array([[4., 0.5], [2., 0.]])}, 0.5, masks=m1)["w"]
    Array([[ True, False],
           [ True, False]], dtype=bool)
  """
  scores = magnitude_scores(trained_params, where=where)
  if masks is not None:
    _tree.check_same_structure(trained_params, masks, "trained_params", "masks")
    paths, leaves, treedef, chosen = _tree.selected(scores, where, what="trained_params")
    m_leaves = treedef.flatten_up_to(masks)
    out = []
    for p, s, m, c in zip(paths, leaves, m_leaves, chosen, strict=True):
      if c and np.shape(m) not in ((), np.shape(s)):
        raise ValueError(f"mask for '{p}' has shape {np.shape(m)}; the leaf has shape "
                         f"{np.shape(s)}.")
      out.append(jnp.where(m, s, jnp.full((), jnp.nan, s.dtype)) if c else s)
    scores = jax.tree.unflatten(treedef, out)
  new = topk_mask(scores, sparsity, scope=scope, where=where)
  if masks is not None:
    new = jax.tree.map(jnp.logical_and, new, masks)
  return new
