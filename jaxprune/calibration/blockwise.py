"""Sequential (block-by-block) one-shot pruning, as SparseGPT and Wanda run it on LLMs.

A model ``embed → block_0 → … → block_{L-1} → head`` is pruned one block at a time: block
``l`` is calibrated on the outputs of the blocks before it *after* they were pruned, pruned,
and then run on the calibration inputs to give the next block's inputs. Only one block's
statistics exist at a time, and the errors of earlier blocks are seen (and, with SparseGPT's
update, partly compensated) by the later ones.

Memory: the calibration activations at one depth, twice (a block's inputs and its outputs:
``2 × tokens × width × 4`` bytes in float32, e.g. 128 sequences of 2048 tokens at width 4096
is 8 GiB), plus one block's params and Gram matrices (``n_in² × 4`` bytes per kernel). The full
model is never run on the calibration data; the batches are held, not streamed, because every
block needs them. With ``chunk_size`` a block's intermediate activations exist for one chunk
at a time, and ``rows / chunk_size`` Gram matrices per kernel briefly, once per batch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxprune import _tree
from jaxprune.calibration import _chunks
from jaxprune.calibration.activation import wanda
from jaxprune.calibration.collect import calibrate
from jaxprune.calibration.obs import sparsegpt

_METHODS = {"wanda": wanda, "sparsegpt": sparsegpt}


def _resolve(method):
  if callable(method):
    return method
  if method in _METHODS:
    return _METHODS[method]
  raise ValueError(f"sequential: method must be 'wanda', 'sparsegpt' or a callable "
                   f"(params, cal, sparsity, **kwargs) -> (params, masks); got {method!r}.")


_forward_cache: dict = {}


def _chunked_forward(block_fn, chunk_size: int):
  program = jax.jit(lambda p, x, where: _chunks.map_chunks(block_fn, p, x, chunk_size, where,
                                                           rows_out=True), static_argnums=2)

  def run(params, x):
    where = _chunks.batch_mesh(x)
    _chunks.check_rows(x, chunk_size, 1 if where is None else _chunks.shards(*where),
                       "sequential")
    return program(params, x, where)
  return run


def _forward(block_fn, chunk_size: int | None):
  make = (lambda: jax.jit(block_fn)) if chunk_size is None else (
      lambda: _chunked_forward(block_fn, chunk_size))
  try:
    fwd = _forward_cache.get((block_fn, chunk_size))
    if fwd is None:
      fwd = _forward_cache[(block_fn, chunk_size)] = make()
    return fwd
  except TypeError:
    return make()


def sequential(block_fn: Callable[[Any, Any], Any], blocks, inputs: Sequence[Any],
               method: str | Callable = "sparsegpt", sparsity=0.5, *,
               where: _tree.Where | None = None, chunk_size: int | None = None, **kwargs):
  """Prunes a stack of blocks in order, each calibrated on the pruned earlier blocks' outputs.

  Args:
    block_fn: ``(block_params, x) -> y``, one block (pure; ``y`` is the next block's ``x``).
    blocks: a list or tuple of per-block params trees, or ONE stacked tree whose every leaf
      has the layer on axis 0 (``nnx.scan``/``lax.scan`` layout).
    inputs: the first block's inputs, one per calibration batch (e.g. the embeddings of the
      calibration tokens). They are held: every block needs them.
    method: ``"sparsegpt"``, ``"wanda"``, or ``fn(params, cal, sparsity, **kwargs) ->
      (params, masks)``.
    sparsity: passed to the method for every block.
    where: leaf selection inside a block (paths are relative to the block).
    chunk_size: rows of an input's leading axis evaluated at a time, in calibration and in the
      forward passes, for masks that are the same bits on any number of data-parallel devices
      (see :func:`jaxprune.calibrate`); None runs each input at once.
    **kwargs: passed to the method (``structure``, ``block_size``, ``dampening``).

  Returns:
    ``(blocks, masks)`` in the form ``blocks`` came in (a list, or stacked trees).

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> def block(p, x):
    ...   return x + jnp.tanh(x @ p["w1"]) @ p["w2"]
    >>> keys = jax.random.split(jax.random.key(0), 6)
    >>> blocks = [{"w1": jax.random.normal(keys[2 * i], (8, 16)),
    ...            "w2": jax.random.normal(keys[2 * i + 1], (16, 8))} for i in range(3)]
    >>> xs = [jax.random.normal(jax.random.key(9), (64, 8))]
    >>> pruned, masks = jp.sequential(block, blocks, xs, "sparsegpt", 0.5)
    >>> [int(m["w2"].sum()) for m in masks]
    [64, 64, 64]
    >>> stacked = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
    >>> pruned_s, masks_s = jp.sequential(block, stacked, xs, "sparsegpt", 0.5)
    >>> bool(jnp.allclose(pruned_s["w1"][2], pruned[2]["w1"], atol=1e-5))
    True

  References:
    Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot", ICML 2023 (sequential layer-wise pruning).
    Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", 2023.
  """
  prune = _resolve(method)
  is_list = isinstance(blocks, (list, tuple))
  if is_list:
    per_block = list(blocks)
  else:
    leaves = jax.tree.leaves(blocks)
    sizes = {x.shape[0] if x.ndim else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
      paths, lv, _ = _tree.flatten(blocks)
      raise ValueError("sequential: a stacked `blocks` tree needs the layer on axis 0 of every "
                       "leaf; got leading sizes "
                       f"{ {p: (x.shape[0] if x.ndim else None) for p, x in zip(paths, lv)} }.")
    per_block = [jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(sizes.pop())]
  xs = list(inputs)
  if not xs:
    raise ValueError("sequential needs at least one calibration input; `inputs` was empty.")
  fwd = _forward(block_fn, chunk_size)
  out_params, out_masks = [], []
  for params in per_block:
    cal = calibrate(block_fn, params, xs, where=where, chunk_size=chunk_size)
    params, masks = prune(params, cal, sparsity, where=where, **kwargs)
    xs = [fwd(params, x) for x in xs]
    out_params.append(params)
    out_masks.append(masks)
  if is_list:
    return type(blocks)(out_params), type(blocks)(out_masks)
  stack = lambda trees: jax.tree.map(lambda *a: jax.numpy.stack(a), *trees)
  stacked_masks = [jax.tree.map(lambda m, x: jax.numpy.broadcast_to(m, x.shape), m, p)
                   for m, p in zip(out_masks, out_params)]
  return stack(out_params), _rescalar(stack(stacked_masks), out_masks)


def _rescalar(stacked, per_block):
  """Stacked masks with a scalar ``True`` where every block's mask was the scalar ``True``."""
  flat = [jax.tree.leaves(m) for m in per_block]
  leaves, treedef = jax.tree.flatten(stacked)
  out = []
  for j, leaf in enumerate(leaves):
    scalar = all(getattr(f[j], "shape", None) == () for f in flat)
    out.append(jax.numpy.ones((), bool) if scalar else leaf)
  return jax.tree.unflatten(treedef, out)
