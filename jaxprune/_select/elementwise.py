"""Scores given as an elementwise function of arrays, computed where the selection uses them.

A pruning step that computes its scores in the same program (``|w|``, with the pruned weights
set to NaN) would otherwise hold them for every leaf at once: the leaves of one type share one
selection loop (:func:`engine.lowest_each`), and a loop's operands are buffers, so XLA wrote
the whole score tree, 4 bytes a parameter, before the loop began (117 MB for the half-width
GPT-2 tree, whose largest leaf is 39 MB). Given as :class:`Elementwise`, the scores of one
leaf are computed inside the shared loop, from the operands that exist anyway, and again in
its final pass.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax


class Elementwise:
  """Scores ``fn(*operands)``: ``fn`` elementwise over operands of the scores' shape.

  A leaf of a score tree (not a pytree node). Only :func:`engine.lowest_each` keeps it lazy;
  every other path takes :func:`value`. ``fn`` must be a module-level function, so that equal
  scores make equal (cached) selection programs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune._select.elementwise import Elementwise, value
    >>> s = Elementwise(jnp.abs, jnp.array([-2., 1.]))
    >>> s.shape, value(s)
    ((2,), Array([2., 1.], dtype=float32))
  """

  def __init__(self, fn: Callable[..., jax.Array], *operands: jax.Array):
    out = jax.eval_shape(fn, *operands)
    if any(o.shape != out.shape for o in operands):
      raise ValueError(f"Elementwise scores need operands of the scores' shape {out.shape}, got "
                       f"{[o.shape for o in operands]}.")
    self.fn, self.operands = fn, operands
    self.shape, self.dtype = out.shape, out.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def value(self) -> jax.Array:
    return self.fn(*self.operands)


def value(scores):
  """The scores as an array (computed, for :class:`Elementwise`)."""
  return scores.value() if isinstance(scores, Elementwise) else scores


def operands_and_fn(scores) -> tuple[tuple[jax.Array, ...], Callable | None]:
  """``(operands, fn)`` of :class:`Elementwise` scores; ``((scores,), None)`` of an array."""
  if isinstance(scores, Elementwise):
    return scores.operands, scores.fn
  return (scores,), None


def template(scores) -> jax.Array:
  """An array of the scores' shape and sharding, for what is made like them (the masks)."""
  return scores.operands[-1] if isinstance(scores, Elementwise) else scores
