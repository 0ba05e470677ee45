"""Stacked layers: leaves that hold ``L`` layers on a leading (or any) stacking axis.

Models built with ``nnx.scan`` / ``flax.linen.scan`` (or ``nnx.vmap`` to create the layers)
keep the ``L`` layers of a block in one leaf of shape ``(L, ...)``. Passing ``stacked=`` to
:func:`jaxprune.topk_mask`, :func:`jaxprune.prune`, :func:`jaxprune.erk_sparsities`,
:func:`jaxprune.summary` and the pruning transforms makes every slice along that axis its own
layer: layerwise allocation prunes exactly ``round(s·n_slice)`` units of each slice, ERK sees
the slice's shape, structures (N:M, blocks, channels, ``per_output``) act within each slice
(their ``axis`` counts in the slice's dimensions), and ``summary`` reports one row per slice.
Masks are computed on the stacked leaf as it is, without unstacking or copying it.

``stacked`` may be
  * ``None``: no leaf is stacked;
  * an int: the stacking axis of every prunable leaf;
  * a dict ``{path_regex: axis}``: the first pattern that ``re.fullmatch``-es a prunable
    leaf's path gives its axis (``None`` for "not stacked"); a pattern that matches no
    prunable leaf is an error;
  * a callable ``(path, leaf) -> axis or None``.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Union

import numpy as np

from jaxprune.tree import default_where

Stacked = Union[None, int, Mapping[str, Union[int, None]], Callable, tuple]

__all__ = ["Stacked", "freeze", "resolve", "slice_shape", "where_for"]


class _Frozen(tuple):
  """A dict ``{regex: axis}`` as a hashable tuple of pairs (for cached, static arguments)."""


def freeze(stacked: Stacked) -> Stacked:
  """``stacked`` in a hashable form (a dict becomes a tuple of pairs); others unchanged."""
  if isinstance(stacked, Mapping):
    return _Frozen((str(k), v) for k, v in stacked.items())
  return stacked


def _check_axis(axis, path: str, shape: tuple[int, ...]) -> int | None:
  if axis is None:
    return None
  if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
    raise ValueError(f"stacked axis for leaf '{path}' must be an int or None, got "
                     f"{type(axis).__name__}.")
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(f"stacked: leaf '{path}' of shape {shape} cannot be stacked (a stacked "
                     "leaf needs its layer axis and at least one more).")
  if not -ndim <= axis < ndim:
    raise ValueError(f"stacked axis {axis} is out of range for leaf '{path}' of shape {shape}.")
  return int(axis) % ndim


def resolve(stacked: Stacked, paths: list[str], leaves: list,
            chosen: list[bool]) -> list[int | None]:
  """The stacking axis (non-negative) of each leaf, ``None`` for leaves that are not stacked
  and for leaves that are not prunable."""
  if stacked is None:
    return [None] * len(leaves)
  if isinstance(stacked, (int, np.integer)) and not isinstance(stacked, bool):
    return [_check_axis(stacked, p, tuple(np.shape(x))) if c else None
            for p, x, c in zip(paths, leaves, chosen)]
  if isinstance(stacked, (Mapping, _Frozen)):
    items = list(stacked.items()) if isinstance(stacked, Mapping) else list(stacked)
    patterns = [(re.compile(k), k, v) for k, v in items]
    used, out = set(), []
    for p, x, c in zip(paths, leaves, chosen):
      axis = None
      if c:
        for rx, k, v in patterns:
          if rx.fullmatch(p):
            axis = _check_axis(v, p, tuple(np.shape(x)))
            used.add(k)
            break
      out.append(axis)
    unused = [k for _, k, _ in patterns if k not in used]
    if unused:
      raise ValueError(f"stacked patterns {unused} match no prunable leaf (prunable paths: "
                       f"{[p for p, c in zip(paths, chosen) if c][:8]}).")
    return out
  if callable(stacked):
    return [_check_axis(stacked(p, x), p, tuple(np.shape(x))) if c else None
            for p, x, c in zip(paths, leaves, chosen)]
  raise ValueError("stacked must be None, an int, a dict {path_regex: axis} or a callable "
                   f"(path, leaf) -> axis; got {type(stacked).__name__}.")


def _axis_of(stacked: Stacked, path: str, leaf) -> int | None:
  """The stacking axis of one leaf, unvalidated (``None``: not stacked)."""
  if stacked is None:
    return None
  if isinstance(stacked, (int, np.integer)) and not isinstance(stacked, bool):
    return int(stacked)
  if isinstance(stacked, (Mapping, _Frozen)):
    items = list(stacked.items()) if isinstance(stacked, Mapping) else list(stacked)
    for k, v in items:
      if re.fullmatch(k, path):
        return v
    return None
  return stacked(path, leaf) if callable(stacked) else None


@functools.lru_cache(maxsize=64)
def _default_where_stacked(stacked):
  def where(path, leaf):
    axis = _axis_of(stacked, path, leaf)
    ndim = np.ndim(leaf) - (axis is not None and isinstance(axis, (int, np.integer)))
    return default_where(path, leaf) and ndim >= 2
  return where


def where_for(where, stacked: Stacked):
  """``where``, or, when it is None and leaves are stacked, the default rule applied to each
  slice: a stacked leaf is prunable when one of its layers would be (so a stacked bias of
  shape ``(L, d)`` is not)."""
  if where is not None or stacked is None:
    return where
  return _default_where_stacked(freeze(stacked))


def slice_shape(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
  """The shape of one layer of a leaf stacked on ``axis`` (the shape itself if ``None``)."""
  shape = tuple(shape)
  return shape if axis is None else shape[:axis] + shape[axis + 1:]


def full_axis(slice_axis: int, axis: int, slice_ndim: int) -> int:
  """The axis of the stacked leaf that is axis ``slice_axis`` of one of its slices."""
  a = slice_axis % slice_ndim
  return a if a < axis else a + 1
