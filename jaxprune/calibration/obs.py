"""SparseGPT: optimal-brain-surgeon pruning of one layer at a time, with a weight update.

For a layer ``y = x W`` and calibration inputs ``X``, SparseGPT minimizes the layer-wise
reconstruction error ``‖XW − XŴ‖²`` over sparse ``Ŵ``, one output row at a time in parallel.
Its Hessian ``H = 2XᵀX + λI`` (``λ`` = ``dampening`` × the mean of ``diag H``) is shared by all
rows. Input columns are visited in order; when column ``j`` is pruned, its error ``w_j/[H⁻¹]_jj``
is spread over the columns not yet visited through row ``j`` of ``U``, the upper Cholesky factor
of ``H⁻¹`` (``H⁻¹ = UᵀU``), which equals the OBS update restricted to the remaining columns.
Columns go in blocks of ``block_size``: the update inside a block is applied column by column,
the one to all later columns once per block (the paper's lazy batch update). The mask is chosen
adaptively, from the weights as updated so far: per block of columns, the ``w²/U_jj²`` lowest
(unstructured), or per group of ``m`` columns when the block reaches it (N:M).

Everything runs in float32, jitted per leaf (static shapes; one ``fori_loop`` over the full
blocks, one over the columns of a block).

References:
  Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot", ICML 2023.
  Hassibi and Stork, "Second order derivatives for network pruning: Optimal Brain Surgeon",
  NeurIPS 1992.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import _tree, allocation
from jaxprune import masks as masks_lib
from jaxprune import structure as structure_lib
from jaxprune.calibration import _select
from jaxprune.calibration.stats import Calibration

_HI = lax.Precision.HIGHEST


def inverse_hessian_factor(h: jax.Array, dampening: float) -> tuple[jax.Array, jax.Array]:
  """``(U, dead)``: the upper Cholesky factor of ``(H + λI)⁻¹`` (``H⁻¹ = UᵀU``), with
  ``λ = dampening · mean(diag H)``, and which inputs are dead (``H_jj = 0``; their diagonal is
  set to 1 first so the factorization exists, as in the paper's code)."""
  n = h.shape[-1]
  eye = jnp.eye(n, dtype=jnp.float32)
  h = h.astype(jnp.float32)
  dead = jnp.diagonal(h) <= 0
  h = jnp.where((eye > 0) & dead[None, :], 1.0, h)
  h = h + dampening * jnp.mean(jnp.diagonal(h)) * eye
  low = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((low, True), eye)
  hinv = 0.5 * (hinv + hinv.T)
  return jnp.linalg.cholesky(hinv).T, dead


def _dyn_col(x, i):
  return lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)


def _set_col(x, col, i):
  return lax.dynamic_update_slice_in_dim(x, col[:, None], i, axis=1)


def block_counts(k_total: int, cols: int, block_size: int) -> np.ndarray:
  """How many weights each block of ``block_size`` columns loses, ``⌊k·c₁/n⌋ − ⌊k·c₀/n⌋`` for
  the block ``[c₀, c₁)``: the shares sum to exactly ``k_total``.

  Examples:
    >>> from jaxprune.calibration import obs
    >>> obs.block_counts(7, 10, 4).tolist()      # blocks of 4, 4 and 2 columns
    [2, 3, 2]
  """
  edges = list(range(0, cols, block_size)) + [cols]
  return np.array([k_total * c1 // cols - k_total * c0 // cols
                   for c0, c1 in zip(edges[:-1], edges[1:])], np.int32)


@functools.partial(jax.jit, static_argnames=("nm", "block_size"))
def prune_matrix(w: jax.Array, h: jax.Array, counts: jax.Array | None = None, *,
                 nm: tuple[int, int] | None = None, block_size: int = 128,
                 dampening: float | jax.Array = 0.01) -> tuple[jax.Array, jax.Array]:
  """SparseGPT on one matrix ``w`` of shape ``(rows, cols)`` (rows = outputs, cols = inputs)
  with Hessian ``h`` ``(cols, cols)``; returns ``(updated w, keep mask)``, float32 and bool.

  ``counts``: int32, how many weights each block of columns loses (unstructured; see
  :func:`block_counts`). ``nm = (n, m)``: keep ``n`` of every ``m`` consecutive inputs of each
  row instead (``counts`` unused). Compiled once per shape, ``nm`` and ``block_size``.
  """
  rows, cols = w.shape
  w = w.astype(jnp.float32)
  u, dead = inverse_hessian_factor(h, dampening)
  kb = jnp.zeros((-(-cols // block_size),), jnp.int32) if counts is None else counts
  keep = jnp.ones((rows, cols), bool)

  def block(c0, width, k_block, w, keep):
    w1 = lax.dynamic_slice_in_dim(w, c0, width, axis=1)
    u1 = lax.dynamic_slice(u, (c0, c0), (width, width))
    d = jnp.diagonal(u1)
    dead1 = lax.dynamic_slice_in_dim(dead, c0, width)
    group = width if nm is None else nm[1]

    def group_step(g, carry):
      w1, err1, keep1 = carry
      g0 = g * group
      wg = lax.dynamic_slice_in_dim(w1, g0, group, axis=1)
      dg = lax.dynamic_slice_in_dim(d, g0, group)
      score = jnp.where(lax.dynamic_slice_in_dim(dead1, g0, group)[None, :], 0.0,
                        jnp.square(wg) / jnp.square(dg)[None, :])
      if nm is None:
        keep_g = ~masks_lib.lowest_k(score, k_block)
      else:
        st = structure_lib.n_of_m(nm[0], nm[1], axis=1)
        keep_g = masks_lib.topk_mask({"w": score}, st.sparsity, structure=st, layout="flax")["w"]

      def column(j, carry):
        w1, err1 = carry
        i = g0 + j
        col = _dyn_col(w1, i)
        q = jnp.where(_dyn_col(keep_g, j), col, 0.0)
        err = (col - q) / d[i]
        w1 = w1 - err[:, None] * lax.dynamic_index_in_dim(u1, i, axis=0, keepdims=True)
        return _set_col(w1, q, i), _set_col(err1, err, i)

      w1, err1 = lax.fori_loop(0, group, column, (w1, err1))
      return w1, err1, lax.dynamic_update_slice_in_dim(keep1, keep_g, g0, axis=1)

    init = (w1, jnp.zeros_like(w1), jnp.ones((rows, width), bool))
    w1, err1, keep1 = lax.fori_loop(0, width // group, group_step, init)
    # Lazy batch update: the block's errors reach every later column at once. U is upper
    # triangular, so the columns before the block are left exactly as they are.
    u_rows = lax.dynamic_slice_in_dim(u, c0, width, axis=0)
    w = w - jnp.matmul(err1, u_rows, precision=_HI)
    w = lax.dynamic_update_slice_in_dim(w, w1, c0, axis=1)
    return w, lax.dynamic_update_slice_in_dim(keep, keep1, c0, axis=1)

  n_full = cols // block_size
  if n_full:
    def full(b, carry):
      return block(b * block_size, block_size, kb[b], *carry)

    w, keep = lax.fori_loop(0, n_full, full, (w, keep))
  tail = cols - n_full * block_size
  if tail:
    w, keep = block(n_full * block_size, tail, kb[n_full], w, keep)
  return jnp.where(keep, w, 0.0), keep


@functools.partial(jax.jit, static_argnames=("nm", "block_size"))
def _prune_stack(mats, hess, counts, dampening, *, nm, block_size):
  """:func:`prune_matrix` over the layer slices ``(L, n_in, n_out)`` of one leaf, one slice at
  a time (``lax.map``); one compiled program per shape, structure and block size."""
  def one(a):
    new, keep = prune_matrix(a[0].T, a[1], counts, nm=nm, block_size=block_size,
                             dampening=dampening)
    return new.T, keep.T
  return lax.map(one, (mats, hess))


def _check_args(structure, block_size, dampening):
  if structure is None:
    structure = structure_lib.unstructured()
  if isinstance(structure, structure_lib.NOfM):
    if structure.axis not in (-2, 0):
      raise ValueError(f"sparsegpt: n_of_m runs along the input axis of each kernel (axis -2 of "
                       f"its (in, out) matrix); got axis={structure.axis}.")
  elif not isinstance(structure, structure_lib.Unstructured):
    raise ValueError("sparsegpt supports structure=jp.unstructured() and jp.n_of_m(n, m); got "
                     f"{type(structure).__name__}.")
  if not (isinstance(block_size, int) and block_size >= 1):
    raise ValueError(f"sparsegpt: block_size must be a positive int, got {block_size!r}.")
  if isinstance(structure, structure_lib.NOfM) and block_size % structure.m:
    raise ValueError(f"sparsegpt: block_size {block_size} must be a multiple of m="
                     f"{structure.m} for n_of_m({structure.n}, {structure.m}).")
  if not (isinstance(dampening, (int, float)) and dampening >= 0):
    raise ValueError(f"sparsegpt: dampening must be a number >= 0, got {dampening!r}.")
  return structure


def sparsegpt(params, cal: Calibration, sparsity, *, structure=None, block_size: int = 128,
              dampening: float = 0.01, where: _tree.Where | None = None):
  """SparseGPT: prunes each calibrated kernel and updates its remaining weights so that the
  layer's outputs on the calibration inputs change as little as possible.

  Args:
    params: a pytree of arrays (the one calibrated).
    cal: statistics from :func:`jaxprune.calibrate`.
    sparsity: fraction to remove, as in :func:`jaxprune.topk_mask` (a number, a tree, a
      ``{regex: s}`` dict or a callable); must be concrete (it sets each block's count). Each
      leaf (each slice of a stacked leaf) loses exactly ``round(s · size)`` weights.
    structure: :func:`jaxprune.unstructured` (default: the mask is chosen per block of
      ``block_size`` input columns) or :func:`jaxprune.n_of_m` (``n`` of every ``m``
      consecutive inputs of each output are kept; ``sparsity`` must be ``1 − n/m`` or 0).
    block_size: input columns per block (128 in the paper); a multiple of ``m`` for N:M.
    dampening: ``λ = dampening · mean(diag H)`` is added to the Hessian's diagonal (0.01).
    where: ``(path, leaf) -> bool`` choosing leaves; default: the prunable leaves that have
      statistics in ``cal`` (others are left as they are, with a scalar ``True`` mask).

  Returns:
    ``(params, masks)``: the pruned and updated params (pruned weights exactly 0, the other
    leaves untouched) and their masks (the params' tree; scalar ``True`` for unpruned leaves).

  Raises:
    ValueError: naming the leaf, for a leaf without statistics that ``where`` selects, a
      structure that does not fit it, a traced sparsity, or a Hessian that cannot be factored
      (raise ``dampening``).

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 4)), "b": jnp.zeros(4)}
    >>> fn = lambda p, x: x @ p["w"] + p["b"][None, :]
    >>> batches = [jax.random.normal(jax.random.key(i), (32, 8)) for i in range(2)]
    >>> cal = jp.calibrate(fn, params, batches)
    >>> pruned, masks = jp.sparsegpt(params, cal, 0.5)
    >>> int(masks["w"].sum()), masks["b"]
    (16, Array(True, dtype=bool))
    >>> _, masks24 = jp.sparsegpt(params, cal, 0.5, structure=jp.n_of_m(2, 4))
    >>> masks24["w"].reshape(2, 4, 4).sum(axis=1).tolist()[0]
    [2, 2, 2, 2]

  References:
    Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot", ICML 2023.
  """
  st = _check_args(structure, block_size, dampening)
  paths, leaves, treedef, todo = _select.calibrated_leaves(params, cal, sparsity, where,
                                                          "sparsegpt")
  new_leaves, mask_leaves = list(leaves), [jnp.ones((), bool)] * len(leaves)
  for i, (lay, s) in todo.items():
    path, leaf = paths[i], leaves[i]
    if _tree.is_traced(s):
      raise ValueError(f"sparsegpt needs a concrete sparsity for leaf '{path}' (it sets the "
                       "count of every block of columns); got a traced value.")
    s = float(s)
    mats = lay.to_matrix(leaf)                             # (L, n_in, n_out)
    _select.check_structure(st, path, lay, "sparsegpt")
    if isinstance(st, structure_lib.NOfM):
      if s == 0.0:
        mask_leaves[i] = jnp.ones(leaf.shape, bool)
        continue
      if abs(s - st.sparsity) > 1e-6:
        raise ValueError(f"n_of_m({st.n}, {st.m}) gives sparsity {st.sparsity:g}, but sparsity "
                         f"{s:g} was asked for leaf '{path}' (use {st.sparsity:g} or 0).")
      nm, counts = (st.n, st.m), None
    else:
      k_total = allocation.num_to_prune(s, lay.n_in * lay.n_out)
      if k_total == 0:
        mask_leaves[i] = jnp.ones(leaf.shape, bool)
        continue
      nm, counts = None, jnp.asarray(block_counts(k_total, lay.n_in, block_size))
    w_new, keep = _prune_stack(mats, cal.hessian(path), counts, jnp.float32(dampening),
                               nm=nm, block_size=block_size)
    if not _tree.is_traced(w_new) and not bool(jnp.all(jnp.isfinite(w_new))):
      raise ValueError(f"sparsegpt: the Hessian of leaf '{path}' could not be factored (non-"
                       f"finite update); raise `dampening` (now {dampening}).")
    new_leaves[i] = lay.from_matrix(w_new).astype(leaf.dtype)
    mask_leaves[i] = lay.from_matrix(keep)
  return (_select.unflatten(treedef, new_leaves), _select.unflatten(treedef, mask_leaves))
