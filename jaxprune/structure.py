"""Layer 2 — structure: how scores become a keep/drop decision inside one leaf.

A structure maps a leaf's element scores to *unit* scores (an element, a block, a whole output
channel), says how many units a leaf has, and expands a decision on units back to a mask of the
leaf's shape. Two structures also restrict *where* the count is taken: :func:`n_of_m` (every group
of ``m`` consecutive weights keeps ``n``) and :func:`per_output` (every output unit loses the same
number of inputs, as in Wanda).

Structures are small frozen dataclasses: hashable, so they can be static arguments of ``jax.jit``.

**Layouts.** Made without an ``axis``, :func:`n_of_m` runs along each leaf's input axis and
:func:`channels` / :func:`per_output` take each leaf's output axis, from the leaf's layout
(:func:`jaxprune.tree.default_layout`: Flax ``kernel`` and Haiku ``w`` are ``(..., in, out)``,
Equinox and PyTorch ``weight`` is ``(out, in, ...)``; ``layout=`` of :func:`jaxprune.topk_mask`
overrides it for a whole tree). Such a structure stores the ``(..., in, out)`` axis (``-2`` or
``-1``) with ``by_layout=True`` (not shown in its repr); :func:`for_leaf` resolves it for one
leaf. An explicit ``axis`` is used as given for every leaf.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _floats
from jaxprune.tree import Layout


def _norm_axis(axis: int, ndim: int, path: str, what: str) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"{what} axis {axis} is out of range for leaf '{path}' with {ndim} "
                     "dimensions.")
  return axis % ndim


@dataclasses.dataclass(frozen=True)
class Unstructured:
  """Every weight is its own unit."""

  def validate(self, path: str, shape: tuple[int, ...]) -> None:
    del path, shape

  def num_units(self, shape: tuple[int, ...]) -> int:
    return math.prod(shape)

  def unit_scores(self, scores: jax.Array) -> jax.Array:
    return scores

  def expand(self, keep: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    del shape
    return keep


@dataclasses.dataclass(frozen=True)
class Channels:
  """Whole slices along ``axis`` (output neurons / channels) are units.

  A channel's score is the ``reduce`` ("l2", "l1", "mean" or "max") of its element scores.
  """
  axis: int = -1
  reduce: str = "l2"
  by_layout: bool = dataclasses.field(default=False, repr=False)  # axis from the leaf's layout

  def __post_init__(self):
    if self.reduce not in ("l2", "l1", "mean", "max"):
      raise ValueError(f"channels(reduce=...) must be 'l2', 'l1', 'mean' or 'max', got "
                       f"{self.reduce!r}.")

  def validate(self, path: str, shape: tuple[int, ...]) -> None:
    _norm_axis(self.axis, len(shape), path, "channels()")

  def num_units(self, shape: tuple[int, ...]) -> int:
    return shape[self.axis % len(shape)]

  def unit_scores(self, scores: jax.Array) -> jax.Array:
    # Scaled by a power of two per channel before squaring or summing, and back, exactly: no
    # underflow for tiny weights, no overflow for huge ones (see jaxprune/_floats.py).
    ax = self.axis % scores.ndim
    others = tuple(i for i in range(scores.ndim) if i != ax)
    return _floats.unit_reduce(scores, others, self.reduce).reshape(scores.shape[ax])

  def expand(self, keep: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    ax = self.axis % len(shape)
    bshape = tuple(n if i == ax else 1 for i, n in enumerate(shape))
    return jnp.broadcast_to(keep.reshape(bshape), shape)


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Rectangular blocks over the last ``len(shape)`` axes are units (scored by their L2 norm)."""
  shape: tuple[int, ...] = (4, 4)

  def __post_init__(self):
    b = self.shape
    if not isinstance(b, tuple) or not b or not all(
        isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1 for k in b):
      raise ValueError(f"blocks(shape) needs a non-empty tuple of ints >= 1 (one block size "
                       f"per trailing axis, e.g. (4, 4)), got {b!r}.")

  def validate(self, path: str, shape: tuple[int, ...]) -> None:
    b = self.shape
    if len(shape) < len(b):
      raise ValueError(f"blocks({b}) needs at least {len(b)} dimensions; leaf '{path}' has "
                       f"shape {shape}.")
    for n, k in zip(shape[-len(b):], b):
      if k <= 0 or n % k:
        raise ValueError(f"blocks({b}) does not tile leaf '{path}' of shape {shape}: each of "
                         f"the last {len(b)} dimensions must be a multiple of the block size.")

  def _split(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    lead, tail = shape[:-len(self.shape)], shape[-len(self.shape):]
    split = sum(((n // k, k) for n, k in zip(tail, self.shape)), ())
    return lead, split

  def num_units(self, shape: tuple[int, ...]) -> int:
    lead, _ = self._split(shape)
    return math.prod(lead) * math.prod(n // k for n, k in zip(shape[-len(self.shape):],
                                                               self.shape))

  def unit_scores(self, scores: jax.Array) -> jax.Array:
    lead, split = self._split(scores.shape)
    inner = tuple(len(lead) + 2 * i + 1 for i in range(len(self.shape)))
    # The L2 norm of each block, without under- or overflow (see jaxprune/_floats.py).
    norms = _floats.unit_reduce(scores.reshape(lead + split), inner, "l2")
    return norms.reshape(lead + tuple(split[0::2]))

  def expand(self, keep: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    lead, split = self._split(shape)
    unit_shape = lead + tuple(split[0::2])
    k = keep.reshape(lead + sum(((n, 1) for n in unit_shape[len(lead):]), ()))
    return jnp.broadcast_to(k, lead + split).reshape(shape)


@dataclasses.dataclass(frozen=True)
class NOfM:
  """In every group of ``m`` consecutive weights along ``axis``, keep the ``n`` largest."""
  n: int = 2
  m: int = 4
  axis: int = -2
  by_layout: bool = dataclasses.field(default=False, repr=False)  # axis from the leaf's layout

  def __post_init__(self):
    if not (isinstance(self.n, int) and isinstance(self.m, int)) or not 0 <= self.n <= self.m \
        or self.m < 1:
      raise ValueError(f"n_of_m(n={self.n}, m={self.m}) needs integers with 0 <= n <= m, m >= 1.")

  @property
  def sparsity(self) -> float:
    return 1.0 - self.n / self.m

  def validate(self, path: str, shape: tuple[int, ...]) -> None:
    ax = _norm_axis(self.axis, len(shape), path, f"n_of_m({self.n}, {self.m})")
    if shape[ax] % self.m:
      raise ValueError(f"n_of_m({self.n}, {self.m}) along axis {self.axis}: leaf '{path}' of "
                       f"shape {shape} has length {shape[ax]} there, not a multiple of {self.m}.")

  def num_units(self, shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@dataclasses.dataclass(frozen=True)
class PerOutput:
  """Unstructured, but every slice along ``axis`` (every output unit) loses the same count."""
  axis: int = -1
  by_layout: bool = dataclasses.field(default=False, repr=False)  # axis from the leaf's layout

  def validate(self, path: str, shape: tuple[int, ...]) -> None:
    _norm_axis(self.axis, len(shape), path, "per_output()")

  def num_units(self, shape: tuple[int, ...]) -> int:
    return math.prod(shape) // shape[self.axis % len(shape)]


Structure = Unstructured | Channels | Blocks | NOfM | PerOutput

_STRUCTURES = (Unstructured, Channels, Blocks, NOfM, PerOutput)


def check_structure(structure) -> None:
  """Raises ``ValueError`` unless ``structure`` is one of the structures of this module."""
  if isinstance(structure, _STRUCTURES):
    return
  hint = ""
  if isinstance(structure, str):
    hint = (f" For the string {structure!r}: 'N:M' is jp.n_of_m(N, M), 'HxW' is "
            "jp.blocks((H, W)), and 'channels' is jp.channels().")
  raise ValueError("structure must be jp.unstructured(), jp.n_of_m(n, m), jp.blocks(shape), "
                   f"jp.channels() or jp.per_output(), got {structure!r} "
                   f"({type(structure).__name__}).{hint}")


def for_leaf(structure: Structure, layout: Layout) -> Structure:
  """``structure`` with the axis of a leaf of this ``layout``, when it was made without one.

  :class:`NOfM` takes the input axis, :class:`Channels` and :class:`PerOutput` the output axis;
  structures with an explicit axis, :class:`Unstructured` and :class:`Blocks` are returned as
  they are.

  Examples:
    >>> import jaxprune as jp
    >>> from jaxprune import structure
    >>> structure.for_leaf(jp.n_of_m(2, 4), jp.tree.OUT_IN)      # an Equinox weight (out, in)
    NOfM(n=2, m=4, axis=1)
    >>> structure.for_leaf(jp.channels(), jp.tree.OUT_IN)
    Channels(axis=0, reduce='l2')
  """
  if not getattr(structure, "by_layout", False):
    return structure
  axis = layout.in_axis if isinstance(structure, NOfM) else layout.out_axis
  return dataclasses.replace(structure, axis=axis, by_layout=False)


def unstructured() -> Unstructured:
  """Each weight is pruned on its own.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> jp.topk_mask({"w": jnp.array([[3., 1.], [2., 4.]])}, 0.5, structure=jp.unstructured())["w"]
    Array([[ True, False],
           [False,  True]], dtype=bool)
  """
  return Unstructured()


def n_of_m(n: int, m: int, axis: int | None = None) -> NOfM:
  """N:M semi-structured sparsity: in each group of ``m`` consecutive weights along ``axis``,
  exactly ``n`` are kept. The sparsity is ``1 - n/m``; pass that (or 0 for no pruning).

  Any other sparsity is an error, a traced one too (a schedule's value: it raises when the
  program runs). So a gradual ramp (``polynomial_schedule``) with ``n_of_m`` fails at its
  first value between 0 and ``1 - n/m`` instead of jumping to ``1 - n/m``; reach N:M with a
  schedule that jumps, e.g. ``jp.one_shot_schedule(1 - n/m, at_step)``.

  ``axis=None`` (default) is each leaf's input (contraction) axis from its layout: ``-2`` for
  Flax ``kernel`` and Haiku ``w`` ``(..., in, out)``, ``1`` for Equinox / PyTorch ``weight``
  ``(out, in, ...)`` (see :mod:`jaxprune.tree`); an int is used for every leaf.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> w = jnp.array([[1.], [4.], [3.], [2.]])          # (in=4, out=1)
    >>> jp.topk_mask({"w": w}, 0.5, structure=jp.n_of_m(2, 4))["w"][:, 0]
    Array([False,  True,  True, False], dtype=bool)

  References:
    Mishra et al., "Accelerating Sparse Deep Neural Networks" (NVIDIA 2:4), arXiv 2021.
  """
  return NOfM(n, m, -2, by_layout=True) if axis is None else NOfM(n, m, axis)


def blocks(shape: tuple[int, ...] = (4, 4)) -> Blocks:
  """Block sparsity: blocks of ``shape`` over the last axes are kept or dropped whole, ranked
  by the L2 norm of their scores.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> w = jnp.array([[1., 1., 5., 5.], [1., 1., 5., 5.]])
    >>> jp.topk_mask({"w": w}, 0.5, structure=jp.blocks((2, 2)))["w"][0]
    Array([False, False,  True,  True], dtype=bool)
  """
  if not isinstance(shape, (tuple, list)):
    raise ValueError(f"blocks(shape) needs a non-empty tuple of ints >= 1, got {shape!r}.")
  return Blocks(tuple(shape))


def channels(axis: int | None = None, reduce: str = "l2") -> Channels:
  """Whole output channels / neurons (slices along ``axis``), ranked by the ``reduce`` ("l2"
  by default) of their scores. Attention heads are channels of a kernel reshaped to
  ``(d_model, heads, head_dim)`` with ``axis=-2``.

  ``axis=None`` (default) is each leaf's output axis from its layout: ``-1`` for Flax
  ``kernel`` and Haiku ``w`` ``(..., in, out)``, ``0`` for Equinox / PyTorch ``weight``
  ``(out, in, ...)`` (see :mod:`jaxprune.tree`); an int is used for every leaf.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> w = jnp.array([[1., 9., 2.], [1., 9., 2.]])      # (in=2, out=3)
    >>> jp.topk_mask({"w": w}, 1/3, structure=jp.channels())["w"][0]
    Array([False,  True,  True], dtype=bool)

  References:
    Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017.
  """
  if axis is None:
    return Channels(-1, reduce, by_layout=True)
  return Channels(axis, reduce)


def per_output(axis: int | None = None) -> PerOutput:
  """Unstructured pruning in which every output unit (slice along ``axis``) loses exactly the
  same number of weights: the comparison group of Wanda (Sun et al., 2023).

  ``axis=None`` (default) is each leaf's output axis from its layout (``-1`` for ``(..., in,
  out)`` kernels, ``0`` for ``(out, in, ...)`` weights); an int is used for every leaf.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> w = jnp.array([[1., 8.], [2., 9.]])              # column 1 is larger overall
    >>> jp.topk_mask({"w": w}, 0.5, structure=jp.per_output())["w"]
    Array([[False, False],
           [ True,  True]], dtype=bool)
  """
  return PerOutput(-1, by_layout=True) if axis is None else PerOutput(axis)
