"""Layer 9 — export: pruned kernels as sparse matrices for inference.

:func:`sparsify_for_inference` replaces each pruned 2-D kernel (``(in, out)``, Flax/Haiku
layout) that is sparse enough with a :class:`SparseKernel`, a pytree holding a
``jax.experimental.sparse`` matrix; ``x @ kernel`` then runs a sparse matmul. Everything else is
``apply_masks(params, masks)``, unchanged.

When it pays (``benchmarks/sparse_inference.py``: XLA:CPU, float32, a 2-core machine shared
with other jobs; a run at load 13 and one at load 6 differed by up to 2.5x in these ratios, the
figures below are the quieter run): a sparse matmul reads the kept values and their indices
instead of the whole dense kernel, and does scattered work per kept weight, so it wins only on
very sparse kernels. Time ÷ dense, MLP 1024→4096→1024:

=================  =======  =======  =======  =======  =======  =======
rows of ``x``      50%      80%      90%      95%      99%      2:4
=================  =======  =======  =======  =======  =======  =======
1, ``"bcoo"``      14×      2.9×     1.8×     1.0×     0.24×    12×
64, ``"bcsr"``     2.5×     1.1×     0.60×    0.45×    0.08×    2.5×
=================  =======  =======  =======  =======  =======  =======

A transformer block (d_model 512, sequences of 16 tokens, ``"bcsr"``) gains from 90% both at
batch 1 (16 rows, 0.73×) and at batch 64 (1024 rows, 0.84×; 0.45× at 99%). N:M never gains on
CPU: 2:4 is only 50% sparse and the CPU has no N:M kernel (a compact gather-and-matmul of the
2:4 values was 12-67× slower than dense).

Formats:

* ``"bcsr"`` (default for float32/float64 kernels): the transposed kernel in CSR, multiplied by
  XLA:CPU's native CSR kernel (``cpu_csr_sparse_dense_ffi``). The faster one for many rows.
  Other dtypes would fall back to the BCOO algorithm with a ``SparseEfficiencyWarning``, so
  they get ``"bcoo"`` by default.
* ``"bcoo"``: ``x @ BCOO(kernel)``, a gather of ``x`` and a scatter-add per kept weight. The
  faster one for a single row (matrix-vector); its cost grows quickly with the rows of ``x``.

On GPU, ``jax.experimental.sparse`` lowers these matmuls to cuSPARSE; not measured here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from jaxprune import _tree
from jaxprune import masks as masks_lib

__all__ = ["SparseKernel", "sparsify_for_inference"]

_FORMATS = ("bcoo", "bcsr")


@jax.tree_util.register_pytree_with_keys_class
class SparseKernel:
  """A pruned ``(in, out)`` kernel as a sparse matrix; ``x @ kernel`` is a sparse matmul.

  ``x`` may have any leading axes (``(..., in) @ kernel -> (..., out)``). The format is static
  (in the treedef), so a tree of these passes through ``jax.jit``.

  Attributes:
    matrix: ``BCOO`` of the kernel (``"bcoo"``) or ``BCSR`` of its transpose (``"bcsr"``).
    format: ``"bcoo"`` or ``"bcsr"``.
    shape: the kernel's ``(in, out)``.
  """

  __slots__ = ("matrix", "format", "shape")

  def __init__(self, matrix, format: str, shape):  # noqa: A002 - the format's name
    self.matrix, self.format, self.shape = matrix, format, tuple(shape)

  def tree_flatten_with_keys(self):
    return [(jax.tree_util.GetAttrKey("matrix"), self.matrix)], (self.format, self.shape)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], *aux)

  @property
  def dtype(self):
    return self.matrix.dtype

  @property
  def nse(self) -> int:
    """Stored (kept) entries."""
    return int(self.matrix.nse)

  def todense(self) -> jax.Array:
    """The dense kernel (pruned entries 0)."""
    dense = self.matrix.todense()
    return dense.T if self.format == "bcsr" else dense

  def __rmatmul__(self, x) -> jax.Array:
    x = jnp.asarray(x)
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    if self.format == "bcoo":
      out = rows @ self.matrix
    elif rows.shape[0] == 1:
      out = (self.matrix @ rows[0])[None]
    else:
      out = (self.matrix @ rows.T).T
    return out.reshape(lead + (self.shape[1],))

  def __repr__(self):
    return f"SparseKernel({self.format!r}, shape={self.shape}, dtype={self.dtype})"


def _matrix(dense: np.ndarray, mask: np.ndarray, format: str):  # noqa: A002
  """The sparse matrix of the kept entries (kept zeros included), indices int32 and sorted."""
  if format == "bcoo":
    idx = np.argwhere(mask).astype(np.int32)
    data = dense[mask]
    return jsparse.BCOO((jnp.asarray(data), jnp.asarray(idx)), shape=dense.shape,
                        indices_sorted=True, unique_indices=True)
  mt = mask.T
  _, cols = np.nonzero(mt)
  indptr = np.concatenate([[0], np.cumsum(np.count_nonzero(mt, axis=1))]).astype(np.int32)
  return jsparse.BCSR((jnp.asarray(dense.T[mt]), jnp.asarray(cols.astype(np.int32)),
                       jnp.asarray(indptr)), shape=mt.shape, indices_sorted=True,
                      unique_indices=True)


def _density(mask) -> float:
  m = np.asarray(mask)
  return float(np.count_nonzero(m)) / m.size


def sparsify_for_inference(params, masks, *, min_sparsity: float = 0.9,
                           format: str | None = None):  # noqa: A002 - the format's name
  """Pruned 2-D kernels of sparsity ``>= min_sparsity`` as :class:`SparseKernel` matrices.

  Runs outside ``jax.jit`` (the kept counts set the sparse matrices' sizes). Use the result
  with functions that multiply with ``@`` (``x @ params["w"]``), or convert back with
  :meth:`SparseKernel.todense`.

  Args:
    params: a pytree of arrays.
    masks: keep-masks like ``params`` (e.g. from :func:`jaxprune.topk_mask`); concrete.
    min_sparsity: kernels pruned less than this stay dense (the benchmark, CPU: ``"bcsr"``
      wins from about 0.9 with 16 or more rows; ``"bcoo"`` on one row only near 0.99).
    format: ``"bcsr"`` (many rows; float32/float64), ``"bcoo"`` (one row), or None (default):
      ``"bcsr"`` for float32/float64 kernels, ``"bcoo"`` for others.

  Returns:
    ``apply_masks(params, masks)`` with the chosen kernels replaced by :class:`SparseKernel`.

  Raises:
    ValueError: an unknown format, a ``min_sparsity`` outside [0, 1], masks that do not fit
      the params, or traced masks, naming the leaf.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32)), "b": jnp.zeros(32)}
    >>> masks = jp.topk_mask(jp.magnitude_scores(params), 0.95)
    >>> sp = jp.sparsify_for_inference(params, masks)
    >>> sp["w"], sp["w"].nse
    (SparseKernel('bcsr', shape=(64, 32), dtype=float32), 102)
    >>> x = jnp.ones((1, 64))
    >>> dense = jp.apply_masks(params, masks)
    >>> bool(jnp.allclose(jax.jit(lambda p, x: x @ p["w"])(sp, x), x @ dense["w"], atol=1e-5))
    True
  """
  if format is not None and format not in _FORMATS:
    raise ValueError(f"sparsify_for_inference: format must be one of {_FORMATS}, got "
                     f"{format!r}.")
  if not 0.0 <= float(min_sparsity) <= 1.0:
    raise ValueError(f"sparsify_for_inference: min_sparsity must be in [0, 1], got "
                     f"{min_sparsity}.")
  dense = masks_lib.apply_masks(params, masks)
  paths, leaves, mleaves = masks_lib._check_masks(params, masks)
  out = []
  for path, x, m, d in zip(paths, leaves, mleaves, jax.tree.leaves(dense), strict=True):
    if _tree.is_traced(m):
      raise ValueError(f"sparsify_for_inference: the mask of '{path}' is traced; call it "
                       "outside jax.jit.")
    if np.ndim(m) != 2 or np.ndim(x) != 2 or 1.0 - _density(m) < float(min_sparsity):
      out.append(d)
      continue
    fmt = format or ("bcsr" if jnp.dtype(d.dtype) in (jnp.float32, jnp.float64) else "bcoo")
    out.append(SparseKernel(_matrix(np.asarray(d), np.asarray(m, bool), fmt), fmt, np.shape(d)))
  return jax.tree.unflatten(jax.tree.structure(params), out)


