"""``calibrate``: the input statistics of every kernel of ``fn(params, batch)`` over batches."""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _tree
from jaxprune.calibration import _chunks, walk
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


# Adds one batch's statistics into the running ones (in place of them).
_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)


@functools.lru_cache(maxsize=64)
def batch_programs(fn, where):
  """``run(params, batch) -> statistics`` of a whole batch in one program (``run.lower``:
  that program, lowered), and the accumulating ``add``."""
  jitted = jax.jit(_per_batch_fn(fn, where), static_argnums=1)

  def run(params, batch):
    arrays, static = _split_static(params)
    return jitted(arrays, static, batch)

  run.lower = lambda params, batch: jitted.lower(*_split_static(params), batch)
  run.lower_all = lambda params, batch: [run.lower(params, batch)]
  return run, _add


@functools.lru_cache(maxsize=64)
def chunked_programs(fn, where, chunk_size: int):
  """Like :func:`batch_programs`, with each batch evaluated in chunks of ``chunk_size`` rows
  (:mod:`jaxprune.calibration._chunks`): the same bits on any number of data-parallel devices."""
  per_batch = _per_batch_fn(fn, where)

  @functools.partial(jax.jit, static_argnums=(1, 3))
  def per_chunk(arrays, static, batch, mesh_axis):
    return _chunks.map_chunks(lambda a, b: per_batch(a, static, b), arrays, batch, chunk_size,
                              mesh_axis)

  def programs(params, batch):
    mesh_axis = _chunks.batch_mesh(batch)
    devices = 1 if mesh_axis is None else _chunks.shards(*mesh_axis)
    _chunks.check_rows(batch, chunk_size, devices, "calibrate")
    chunks = functools.partial(per_chunk, *_split_static(params), batch, mesh_axis)
    return chunks, _chunks.ordered_sum_program(None if mesh_axis is None else mesh_axis[0])

  def run(params, batch):
    chunks, total = programs(params, batch)
    return total(chunks())

  def lower_all(params, batch):
    """The two programs of a batch, lowered: per-chunk statistics, then the ordered sum."""
    chunks, total = programs(params, batch)
    first = chunks.func.lower(*chunks.args)
    stacked = jax.tree.map(lambda o, sh: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=sh),
                           jax.eval_shape(chunks), first.compile().output_shardings)
    return [first, total.lower(stacked)]

  run.lower_all = lower_all
  return run, _add


def programs_for(fn, where, chunk_size: int | None):
  """``(run, add)`` of :func:`batch_programs` (``chunk_size=None``) or
  :func:`chunked_programs`, cached per ``fn`` and ``where`` when both are hashable;
  ``run.lower_all(params, batch)`` lowers every program a batch runs."""
  programs, args = ((batch_programs, (fn, where)) if chunk_size is None
                    else (chunked_programs, (fn, where, chunk_size)))
  try:
    return programs(*args)
  except TypeError:  # an unhashable fn or where: no program cache
    return programs.__wrapped__(*args)


def calibrate(fn: Callable[[Any, Any], Any], params, batches: Iterable[Any], *,
              where: _tree.Where | None = None, chunk_size: int | None = None) -> Calibration:
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

  Reproducibility across device counts: XLA sums in an order that depends on the shapes and
  the sharding, so the default path gives Gram matrices equal only to float rounding on 8
  devices and on 1, and SparseGPT can turn those last bits into a few different mask entries.
  With ``chunk_size``, every batch is cut into chunks of that many rows (its leading axis),
  each chunk goes through the same compiled per-chunk program (``lax.map``; ``shard_map`` over
  the devices of a batch sharded on its leading axis, params replicated), and the chunks'
  matrices are summed in chunk order: the statistics are then the same bits on any number of
  devices whose share of a batch is a whole number of chunks. It costs one gather of the
  per-chunk matrices per batch (``rows / chunk_size`` times a Gram matrix's memory, briefly)
  instead of one all-reduce, and it needs ``fn`` to treat rows independently (as any
  data-parallel model does).

  Args:
    fn: ``(params, batch) -> anything``, a pure function of both.
    params: a pytree of arrays (NNX ``State`` trees too).
    batches: an iterable of batches (any pytree ``fn`` accepts); at least one.
    where: ``(path, leaf) -> bool`` choosing the leaves to calibrate (default: floating
      leaves with ``ndim >= 2``). A chosen leaf that no contraction reads gets no statistics.
    chunk_size: rows of a batch's leading axis evaluated at a time, for device-count
      independent results (see above); None evaluates a batch at once.

  Returns:
    A :class:`jaxprune.calibration.Calibration` (a pytree): ``grams[path]`` float32
    ``(n_in, n_in)`` (``(L, n_in, n_in)`` for a stacked leaf), ``counts[path]``, and each
    leaf's layout (which axes are its inputs).

  Raises:
    ValueError: for no batches, a leaf contracted in two different ways, or batches that
      are not a whole number of chunks per device.

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
  per_batch, add = programs_for(fn, where, chunk_size)
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
