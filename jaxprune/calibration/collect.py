"""``calibrate``: the input statistics of every kernel of ``fn(params, batch)`` over batches."""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _tree
from jaxprune.calibration import walk
from jaxprune.calibration.stats import Calibration, LeafLayout


def _key(layout: LeafLayout, path: str):
  """Output dict keys carry the layout, so it survives ``jax.jit`` and ``eval_shape`` as
  static tree structure (no host round trip, no side effects at trace time)."""
  return (path, layout.in_axes, -1 if layout.stack_axis is None else layout.stack_axis)


def _per_batch_fn(fn: Callable, where):
  def per_batch(arrays, static, batch):
    params = static.rebuild(arrays)
    paths, leaves, _, chosen = _tree.selected(params, where, require_any=False)
    is_arr = [_is_array(x) for x in leaves]
    paths = [p for p, a in zip(paths, is_arr) if a]
    chosen = [c for c, a in zip(chosen, is_arr) if a]
    closed = jax.make_jaxpr(lambda a, b: fn(static.rebuild(a), b))(arrays, batch)
    walker = walk.Walker(paths, [tuple(np.shape(x)) for x in arrays])
    args = [walk.View(x, i, tuple((a, None) for a in range(x.ndim))) if chosen[i] else x
            for i, x in enumerate(arrays)]
    walker.run_closed(closed, args + list(jax.tree.leaves(batch)))
    return {_key(layout, paths[i]): (gram, count)
            for i, (gram, count, layout) in walker.stats.items()}
  return per_batch


class _Static:
  """The leaves of ``params`` that are not arrays (an Equinox module's activation functions),
  as a static jit argument: equal when the same objects are in the same places."""

  def __init__(self, treedef, others):
    self.treedef, self.others = treedef, others

  def _key(self):
    return self.treedef, tuple((i, id(o)) for i, o in self.others)

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, _Static) and self._key() == other._key()

  def rebuild(self, arrays):
    leaves = list(arrays)
    for i, o in self.others:
      leaves.insert(i, o)
    return jax.tree.unflatten(self.treedef, leaves)


def _is_array(x) -> bool:
  """Arrays are traced; anything else (functions, Python numbers: Equinox's static fields) is
  a static part of the program, as ``eqx.partition(m, eqx.is_array)`` splits a module."""
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _split_static(params):
  leaves, treedef = jax.tree.flatten(params)
  others = tuple((i, x) for i, x in enumerate(leaves) if not _is_array(x))
  return [x for x in leaves if _is_array(x)], _Static(treedef, others)


@functools.lru_cache(maxsize=64)
def batch_programs(fn, where):
  jitted = jax.jit(_per_batch_fn(fn, where), static_argnums=1)

  def run(params, batch):
    arrays, static = _split_static(params)
    return jitted(arrays, static, batch)

  run.lower = lambda params, batch: jitted.lower(*_split_static(params), batch)
  add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)
  return run, add


def calibrate(fn: Callable[[Any, Any], Any], params, batches: Iterable[Any], *,
              where: _tree.Where | None = None) -> Calibration:
  """Collects, for every prunable kernel that ``fn(params, batch)`` contracts with an input,
  the Gram matrix ``Σ xᵀx`` of those inputs and the number of rows, over ``batches``.

  ``fn`` is traced to a jaxpr and evaluated equation by equation inside ``jax.jit`` (one
  compiled program per batch shape, returning all Gram matrices of a batch); a kernel is
  found wherever it, or a transpose, dtype cast or layer slice of it, is an operand of a
  ``dot_general`` or ``conv_general_dilated`` (see :mod:`jaxprune.calibration.walk`). The
  second layer of an MLP is therefore calibrated on the first layer's outputs, computed from
  ``params`` as they are. The batches are consumed one at a time and not held.

  Any framework works through a pure function: Flax NNX ``lambda p, x: nnx.merge(graphdef, p,
  rest)(x)``, Linen ``lambda p, x: model.apply({"params": p}, x)``, Equinox
  ``lambda m, x: jax.vmap(m)(x)`` with ``params = m`` (arrays are its leaves), Haiku's
  ``transformed.apply``. Sharded ``params`` and batches work as they are: the program is
  compiled for their shardings and every Gram matrix is reduced over the batch shards in it.

  Args:
    fn: ``(params, batch) -> anything``, a pure function of both.
    params: a pytree of arrays (NNX ``State`` trees too).
    batches: an iterable of batches (any pytree ``fn`` accepts); at least one.
    where: ``(path, leaf) -> bool`` choosing the leaves to calibrate (default: floating
      leaves with ``ndim >= 2``). A chosen leaf that no contraction reads gets no statistics.

  Returns:
    A :class:`jaxprune.calibration.Calibration` (a pytree): ``grams[path]`` float32
    ``(n_in, n_in)`` (``(L, n_in, n_in)`` for a stacked leaf), ``counts[path]``, and each
    leaf's layout (which axes are its inputs).

  Raises:
    ValueError: for no batches, or a leaf contracted in two different ways.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"l1": jnp.ones((3, 4)), "l2": jnp.ones((4, 2))}
    >>> fn = lambda p, x: jnp.tanh(x @ p["l1"]) @ p["l2"]
    >>> cal = jp.calibrate(fn, params, [jnp.eye(3), jnp.eye(3)])
    >>> cal.grams["l1"]                     # Σ xᵀx of the inputs: two identity batches
    Array([[2., 0., 0.],
           [0., 2., 0.],
           [0., 0., 2.]], dtype=float32)
    >>> cal.grams["l2"].shape, int(cal.counts["l2"]), cal.layout("l2").in_axes
    ((4, 4), 6, (0,))
  """
  try:
    per_batch, add = batch_programs(fn, where)
  except TypeError:  # an unhashable fn or where: no program cache
    per_batch, add = batch_programs.__wrapped__(fn, where)
  acc = None
  for batch in batches:
    stats = per_batch(params, batch)
    if acc is not None and jax.tree.structure(stats) != jax.tree.structure(acc):
      raise ValueError("calibrate: batches of different shapes reach different kernels "
                       f"({sorted(k[0] for k in acc)} vs {sorted(k[0] for k in stats)}).")
    acc = stats if acc is None else add(acc, stats)
  if acc is None:
    raise ValueError("calibrate needs at least one batch; `batches` was empty.")
  paths, leaves, _, _ = _tree.selected(params, where, require_any=False)
  shapes = {p: tuple(np.shape(x)) for p, x in zip(paths, leaves) if _is_array(x)}
  grams, counts, layouts = {}, {}, []
  for (path, in_axes, stack), (gram, count) in acc.items():
    grams[path], counts[path] = gram, count
    layouts.append((path, LeafLayout(shapes[path], tuple(in_axes),
                                     None if stack < 0 else stack)))
  return Calibration(grams, counts, tuple(layouts))
