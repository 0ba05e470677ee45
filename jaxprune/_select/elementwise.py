"""Scores given as an elementwise function of arrays, computed where the selection uses them.

A pruning step that computes its scores in the same program (``|w|``, with the pruned weights
set to NaN) would otherwise hold them for every leaf at once: a loop's or a cond's operands
are buffers, so XLA wrote the whole score tree, 4 bytes a parameter, before the selection's
loops began (127 MB for a magnitude step on the half-width GPT-2 tree, whose largest leaf is
39 MB). Given as :class:`Elementwise`, the scores are computed inside each pass from the
operands the step holds anyway, and only operands cross a loop or a cond (41 MB).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax

from jaxprune._select import counts


class Elementwise:
  """Scores ``fn(*operands)``: ``fn`` elementwise over operands of the scores' shape.

  A leaf of a score tree (not a pytree node). The engine's selections (``lowest``,
  ``lowest_each``) keep it lazy; every other path takes :func:`value`. ``fn`` must be a
  module-level function, so that equal scores make equal (cached) selection programs.

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


def then(g: Callable[[jax.Array], jax.Array], scores):
  """``g`` applied to the scores: lazily (composed into ``fn``) for :class:`Elementwise`."""
  if isinstance(scores, Elementwise):
    fn = scores.fn
    return Elementwise(lambda *operands: g(fn(*operands)), *scores.operands)
  return g(scores)


def opaque(arrays, token) -> list[jax.Array]:
  """The scores of ``arrays`` computed from operands behind :func:`counts.opaque` (so inside
  each pass of a loop, not hoisted out of it and materialized)."""
  parts = [operands_and_fn(a) for a in arrays]
  barred = counts.opaque([o for o, _ in parts], token)
  return [value(from_parts(o, f)) for o, (_, f) in zip(barred, parts)]


def value(scores):
  """The scores as an array (computed, for :class:`Elementwise`)."""
  return scores.value() if isinstance(scores, Elementwise) else scores


def operands_and_fn(scores) -> tuple[tuple[jax.Array, ...], Callable | None]:
  """``(operands, fn)`` of :class:`Elementwise` scores; ``((scores,), None)`` of an array."""
  if isinstance(scores, Elementwise):
    return scores.operands, scores.fn
  return (scores,), None


def from_parts(operands, fn):
  """The inverse of :func:`operands_and_fn`."""
  return Elementwise(fn, *operands) if fn else operands[0]


def type_of(scores):
  """What makes two score arrays share a compiled selection: ``jax.typeof`` of an array; the
  function and the operands' types of :class:`Elementwise` scores."""
  if isinstance(scores, Elementwise):
    return scores.fn, tuple(jax.typeof(o) for o in scores.operands)
  return jax.typeof(scores)


def template(scores) -> jax.Array:
  """An array of the scores' shape and sharding, for what is made like them (the masks)."""
  return scores.operands[-1] if isinstance(scores, Elementwise) else scores
