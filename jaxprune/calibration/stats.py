"""The calibration object: per-leaf Gram matrices of the inputs each kernel sees, and the layout
that says which axes of the leaf those inputs are contracted with.

A kernel ``W`` with input features on ``layout.in_axes`` (the contraction axes of its
``dot_general``/``conv_general_dilated``) and outputs on the other axes is viewed as a matrix
``(n_in, n_out)``: the in axes moved to the front (in the leaf's axis order) and flattened, the
rest flattened after them. A stacked leaf (``nnx.scan``, a leading layer axis) is a stack of such
matrices, ``(L, n_in, n_out)``, with one Gram matrix per slice. Wanda and SparseGPT work on this
canonical view and give masks back in the leaf's own layout, so Flax ``(in, out)`` kernels,
Equinox ``(out, in)`` weights and multi-axis ``LinearGeneral`` kernels are all handled alike.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class LeafLayout(NamedTuple):
  """How a prunable leaf is contracted with its inputs.

  Attributes:
    shape: the leaf's shape.
    in_axes: the leaf axes contracted with the input features (e.g. ``(0,)`` for a Flax
      ``Dense`` kernel ``(in, out)``, ``(1,)`` for an Equinox ``Linear`` weight ``(out, in)``,
      ``(0, 1, 2)`` for a Flax ``Conv`` kernel ``(kh, kw, in, out)``).
    stack_axis: the axis holding stacked layers (``nnx.scan``), or None.
  """
  shape: tuple[int, ...]
  in_axes: tuple[int, ...]
  stack_axis: int | None = None

  @property
  def out_axes(self) -> tuple[int, ...]:
    return tuple(a for a in range(len(self.shape))
                 if a not in self.in_axes and a != self.stack_axis)

  @property
  def num_layers(self) -> int:
    return 1 if self.stack_axis is None else self.shape[self.stack_axis]

  @property
  def n_in(self) -> int:
    return math.prod(self.shape[a] for a in self.in_axes)

  @property
  def n_out(self) -> int:
    return math.prod(self.shape[a] for a in self.out_axes)

  def _perm(self) -> tuple[int, ...]:
    lead = () if self.stack_axis is None else (self.stack_axis,)
    return lead + tuple(self.in_axes) + self.out_axes

  def to_matrix(self, leaf: jax.Array) -> jax.Array:
    """The leaf as ``(L, n_in, n_out)`` (``L = 1`` for a leaf that is not stacked)."""
    return jnp.transpose(leaf, self._perm()).reshape(self.num_layers, self.n_in, self.n_out)

  def from_matrix(self, mat: jax.Array) -> jax.Array:
    """Inverse of :meth:`to_matrix`."""
    perm = self._perm()
    permuted_shape = tuple(self.shape[a] for a in perm)
    return jnp.transpose(mat.reshape(permuted_shape), np.argsort(perm))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Calibration:
  """Input statistics of every calibrated kernel, keyed by leaf path.

  A pytree (a registered dataclass): ``grams`` and ``counts`` are its leaves, ``layouts`` is
  static, so a ``Calibration`` passes through ``jax.jit`` and ``jax.tree.map``.

  Attributes:
    grams: ``{path: float32 (n_in, n_in)}`` — ``Σ xᵀx`` over every row ``x`` of the inputs the
      kernel was contracted with; ``(L, n_in, n_in)`` for a stacked leaf, one per slice.
    counts: ``{path: int32}`` — the number of rows summed (``(L,)`` for a stacked leaf).
    layouts: ``((path, LeafLayout), ...)`` — see :class:`LeafLayout`.
  """
  grams: dict[str, jax.Array]
  counts: dict[str, jax.Array]
  layouts: tuple[tuple[str, LeafLayout], ...] = dataclasses.field(metadata={"static": True})

  @property
  def paths(self) -> tuple[str, ...]:
    return tuple(p for p, _ in self.layouts)

  def layout(self, path: str) -> LeafLayout:
    for p, lay in self.layouts:
      if p == path:
        return lay
    raise KeyError(f"no calibration statistics for leaf '{path}' (calibrated: "
                   f"{list(self.paths)[:8]}).")

  def __contains__(self, path: str) -> bool:
    return any(p == path for p, _ in self.layouts)

  def input_norms(self, path: str) -> jax.Array:
    """``‖X_j‖₂`` of every input feature (``sqrt`` of the Gram diagonal): ``(L, n_in)``."""
    g = self.grams[path].reshape((-1,) + self.grams[path].shape[-2:])
    return jnp.sqrt(jnp.maximum(jnp.diagonal(g, axis1=-2, axis2=-1), 0.0))

  def hessian(self, path: str) -> jax.Array:
    """The layer-wise reconstruction Hessian ``H = 2 XᵀX / n`` (row-normalized): ``(L, n, n)``."""
    g = self.grams[path].reshape((-1,) + self.grams[path].shape[-2:])
    n = jnp.maximum(self.counts[path].reshape(-1), 1).astype(jnp.float32)
    return 2.0 * g / n[:, None, None]

  def merge(self, other: Calibration) -> Calibration:
    """Sums two calibrations of the same leaves (e.g. from two hosts or two data sources)."""
    if self.layouts != other.layouts:
      raise ValueError("Calibration.merge needs the same leaves and layouts; got "
                       f"{list(self.paths)} and {list(other.paths)}.")
    return Calibration({p: self.grams[p] + other.grams[p] for p in self.grams},
                       {p: self.counts[p] + other.counts[p] for p in self.counts}, self.layouts)


def check_calibrated(cal: Calibration, path: str) -> LeafLayout:
  lay = cal.layout(path)
  counts = cal.counts[path]
  if not isinstance(counts, jax.core.Tracer) and np.any(np.asarray(counts) <= 0):
    raise ValueError(f"calibration of leaf '{path}' has no rows (counts {np.asarray(counts)}); "
                     "calibrate with at least one non-empty batch.")
  return lay


def as_mapping(cal: Calibration) -> Mapping[str, LeafLayout]:
  return dict(cal.layouts)
