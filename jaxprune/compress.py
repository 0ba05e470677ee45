"""Layer 9 — export: pruned parameters stored compactly, and back.

:func:`compress` turns ``(params, masks)`` into a pytree whose every leaf is a numpy array, so
that orbax, ``np.savez`` or any checkpointer stores it as it is. Each pruned leaf becomes a
:class:`Compressed` node holding only what it needs; every other leaf passes through.
:func:`decompress` gives back exactly ``apply_masks(params, masks)``: same dtypes and shapes, the
same bits in every kept weight (kept zeros, ``-0.0`` and NaN included), ``+0.0`` elsewhere.

Formats of a pruned leaf of ``N`` weights, ``k`` of them kept, values of ``b`` bytes each (the
cheapest one that fits the mask is chosen, leaf by leaf; ``formats=`` restricts the choice):

==============  ================================================================  ============
format          arrays                                                            bytes
==============  ================================================================  ============
``"n_of_m"``    ``values``: the kept weights, shaped like the leaf with ``n``     ``k·b + k·c/8``
                of every ``m`` along the group axis; ``nm_index``: each kept
                weight's position in its group, ``c = ceil(log2 m)`` bits each
                (2 bits for 2:4), packed
``"bitmask"``   ``values``: the ``k`` kept weights in row-major order; ``bits``:  ``k·b + N/8``
                the mask, 8 entries per byte (little bit order)
``"indices"``   ``values`` as above; ``gaps``: the differences between their    ``k·b + g·k``
                flat indices (the first one is the index itself), in the
                narrowest of uint8/16/32 (``g`` bytes) that holds the largest:
                smaller than a bitmask above 87.5% sparsity with uint8 gaps,
                93.75% with uint16
``"dense"``     the leaf with its pruned weights zeroed (nothing is cheaper:      ``N·b``
                masks that keep almost everything)
==============  ================================================================  ============

A leaf with nothing kept stores no values at all (orbax cannot write empty arrays); a leaf whose
mask keeps everything, or a scalar ``True`` mask (an unpruned leaf), passes through unchanged.
N:M is detected, not declared: a mask with the same number kept in every group of ``m`` in
``(2, 4, 8, 16)`` consecutive entries along an axis (the input axis ``-2`` of Flax/Haiku kernels
first, as :func:`jaxprune.n_of_m` groups, then the others) is stored as N:M when that is no
larger than a bitmask. Blocks and channels are stored as bitmasks.

Every node carries an int32 array ``jaxprune_format`` (format version, kind, dtype, ``n``,
``m``, axis, shape) so that a tree restored from disk with no target — nested dicts of arrays —
is enough for :func:`decompress`. The node's class also keeps that description in its treedef,
so ``jax.jit(decompress)`` works on what :func:`compress` (or :func:`as_compressed`) returns.

Restoring with orbax::

    from orbax.checkpoint import v1 as ocp
    ocp.save(path, jp.compress(params, masks))
    params = jp.decompress(ocp.load(path))                  # no target needed
    small = jp.as_compressed(ocp.load(path))                # or: nodes again, for jax.jit
    params = jax.jit(jp.decompress)(small)

``compress`` runs on the host, outside ``jax.jit``: the kept counts set array shapes, so the
masks must be concrete. It copies each leaf to host memory (gather arrays spread over several
processes first, e.g. with ``jax.experimental.multihost_utils.process_allgather``).
:func:`decompress` is pure jnp: it jits, and it runs on sharded arrays (its output is laid out as
XLA decides; ask for the params' shardings with ``jax.jit(jp.decompress, out_shardings=...)``).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _tree
from jaxprune import masks as masks_lib

__all__ = ["Compressed", "FORMATS", "as_compressed", "compress", "decompress", "nbytes",
           "size_summary"]

FORMAT_VERSION = 1
FORMAT_KEY = "jaxprune_format"
"""The key of the int32 description array in every compressed node."""
FORMATS = ("n_of_m", "bitmask", "indices", "dense")
"""Storage formats :func:`compress` chooses from, in the order that breaks ties in size."""
_NM_GROUPS = (2, 4, 8, 16)

_KINDS = ("bitmask", "indices", "n_of_m", "zeros")
_ARRAYS = {"bitmask": ("values", "bits"), "indices": ("values", "gaps"),
           "n_of_m": ("values", "nm_index"), "zeros": ()}
_DTYPES = ("float32", "bfloat16", "float16", "float64", "float8_e4m3fn", "float8_e5m2",
           "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
           "complex64", "complex128")
_HEAD = 7  # version, kind, dtype, n, m, axis, ndim; then the shape


def _dtype_code(dtype, path: str) -> int:
  name = jnp.dtype(dtype).name
  if name not in _DTYPES:
    raise ValueError(f"compress: leaf '{path}' has dtype {name}, which has no storage code "
                     f"(supported: {', '.join(_DTYPES)}).")
  return _DTYPES.index(name)


def _index_bits(m: int) -> int:
  return max(1, (m - 1).bit_length())


# ----------------------------------------------------------------------------- the node

@jax.tree_util.register_pytree_with_keys_class
class Compressed:
  """One pruned leaf in compressed form: a pytree node whose children are its arrays.

  The description (``kind``, ``shape``, ``dtype``, ``n``, ``m``, ``axis``) is static: it lives
  in the treedef, so :func:`decompress` jits. It is also written into the ``jaxprune_format``
  array, so that a checkpoint restored without a target (plain dicts) still describes itself.

  Attributes:
    kind: ``"bitmask"``, ``"indices"``, ``"n_of_m"`` or ``"zeros"`` (nothing kept).
    shape: the leaf's shape.
    dtype: the leaf's dtype.
    n, m, axis: for ``"n_of_m"``: ``n`` kept in every ``m`` along ``axis`` (non-negative);
      0 otherwise.
    arrays: name -> array: ``jaxprune_format`` plus ``values`` and ``bits`` / ``gaps`` /
      ``nm_index`` as the kind says.
  """

  __slots__ = ("kind", "shape", "dtype", "n", "m", "axis", "arrays")

  def __init__(self, kind: str, shape: Sequence[int], dtype, arrays: Mapping[str, Any], *,
               n: int = 0, m: int = 0, axis: int = 0):
    self.kind = kind
    self.shape = tuple(int(d) for d in shape)
    self.dtype = jnp.dtype(dtype)
    self.n, self.m, self.axis = int(n), int(m), int(axis)
    self.arrays = dict(arrays)

  def _names(self):
    return (FORMAT_KEY,) + _ARRAYS[self.kind]

  def tree_flatten_with_keys(self):
    names = self._names()
    children = [(jax.tree_util.GetAttrKey(k), self.arrays[k]) for k in names]
    return children, (self.kind, self.shape, self.dtype.name, self.n, self.m, self.axis)

  @classmethod
  def tree_unflatten(cls, aux, children):
    kind, shape, dtype, n, m, axis = aux
    names = (FORMAT_KEY,) + _ARRAYS[kind]
    return cls(kind, shape, dtype, dict(zip(names, children, strict=True)), n=n, m=m, axis=axis)

  @property
  def size(self) -> int:
    """Number of weights of the leaf."""
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes of the arrays held (description included)."""
    return sum(int(np.prod(np.shape(a))) * jnp.dtype(a.dtype).itemsize
               for a in self.arrays.values())

  def __repr__(self):
    nm = f", n={self.n}, m={self.m}, axis={self.axis}" if self.kind == "n_of_m" else ""
    return f"Compressed({self.kind!r}, shape={self.shape}, dtype={self.dtype.name}{nm})"


def _format_array(kind, shape, dtype, path, n=0, m=0, axis=0) -> np.ndarray:
  if any(d > np.iinfo(np.int32).max for d in shape):
    raise ValueError(f"compress: leaf '{path}' has a dimension above 2**31-1: {shape}.")
  head = [FORMAT_VERSION, _KINDS.index(kind), _dtype_code(dtype, path), n, m, axis, len(shape)]
  return np.array(head + list(shape), np.int32)


def _node(kind, shape, dtype, path, arrays, n=0, m=0, axis=0) -> Compressed:
  arrays = {FORMAT_KEY: _format_array(kind, shape, dtype, path, n, m, axis), **arrays}
  return Compressed(kind, shape, dtype, arrays, n=n, m=m, axis=axis)


# ----------------------------------------------------------------------------- compress

def _nm_candidates(mask: np.ndarray, kept: int):
  """``(axis, n, m)`` for every axis and ``m`` in _NM_GROUPS where each group keeps ``n``."""
  shape, total = mask.shape, mask.size
  first = [mask.ndim - 2] if mask.ndim >= 2 else []
  for ax in first + [a for a in range(mask.ndim) if a not in first]:
    for m in _NM_GROUPS:
      if shape[ax] % m or (kept * m) % total:
        continue
      n = kept * m // total
      if not 0 < n < m:
        continue
      groups = mask.reshape(shape[:ax] + (shape[ax] // m, m) + shape[ax + 1:])
      if np.all(np.count_nonzero(groups, axis=ax + 1) == n):
        yield ax, n, m


def _sizes(mask: np.ndarray, itemsize: int, formats) -> list[tuple[int, str, tuple]]:
  """Candidate ``(bytes, format, detail)`` for one leaf, in the order of FORMATS."""
  total, kept = mask.size, int(np.count_nonzero(mask))
  out = []
  if "n_of_m" in formats:
    for ax, n, m in _nm_candidates(mask, kept):
      out.append((kept * itemsize + -(-kept * _index_bits(m) // 8), "n_of_m", (ax, n, m)))
  if "bitmask" in formats:
    out.append((kept * itemsize + -(-total // 8), "bitmask", ()))
  if "indices" in formats:
    gaps = _gaps(mask)
    out.append((kept * (itemsize + gaps.dtype.itemsize), "indices", (gaps,)))
  if "dense" in formats:
    out.append((total * itemsize, "dense", ()))
  return out


def _gaps(mask: np.ndarray) -> np.ndarray:
  """Differences between the flat indices of the kept entries (the first: its index), in the
  narrowest unsigned type that holds them all."""
  gaps = np.diff(np.flatnonzero(mask.reshape(-1)), prepend=0)
  for t in (np.uint8, np.uint16, np.uint32):
    if gaps.size == 0 or gaps.max() <= np.iinfo(t).max:
      return gaps.astype(t)
  raise ValueError("compress: a leaf of more than 2**32 weights")


def _pack_positions(pos: np.ndarray, m: int) -> np.ndarray:
  c = _index_bits(m)
  bits = (pos.reshape(-1, 1).astype(np.uint32) >> np.arange(c, dtype=np.uint32)) & 1
  return np.packbits(bits.astype(bool).reshape(-1), bitorder="little")


def _compress_leaf(path: str, x: np.ndarray, mask: np.ndarray, formats) -> Any:
  shape, dtype = x.shape, x.dtype
  _dtype_code(dtype, path)
  kept = int(np.count_nonzero(mask))
  if kept == 0:
    return _node("zeros", shape, dtype, path, {})
  if kept == mask.size:
    return x
  candidates = _sizes(mask, dtype.itemsize, formats)
  if not candidates:
    raise ValueError(f"compress: no format in {tuple(formats)} can store leaf '{path}' (its "
                     "mask is not N:M); add 'bitmask', 'indices' or 'dense'.")
  best = min(range(len(candidates)), key=lambda i: (candidates[i][0], i))
  _, kind, detail = candidates[best]
  if kind == "dense":
    return np.where(mask, x, np.zeros((), dtype))
  if kind == "n_of_m":
    ax, n, m = detail
    grouped = shape[:ax] + (shape[ax] // m, m) + shape[ax + 1:]
    g_mask = mask.reshape(grouped)
    # Positions of the kept entries of each group, in increasing order: a stable argsort of
    # "not kept" puts the kept entries first, in their order.
    order = np.argsort(~g_mask, axis=ax + 1, kind="stable")
    pos = np.take(order, np.arange(n), axis=ax + 1)
    values = np.take_along_axis(x.reshape(grouped), pos, axis=ax + 1)
    values = values.reshape(shape[:ax] + (shape[ax] // m * n,) + shape[ax + 1:])
    return _node("n_of_m", shape, dtype, path,
                 {"values": values, "nm_index": _pack_positions(pos, m)}, n=n, m=m, axis=ax)
  values = x.reshape(-1)[mask.reshape(-1)]
  if kind == "bitmask":
    bits = np.packbits(mask.reshape(-1), bitorder="little")
    return _node("bitmask", shape, dtype, path, {"values": values, "bits": bits})
  return _node("indices", shape, dtype, path, {"values": values, "gaps": detail[0]})


def _host(x, path: str, what: str):
  if _tree.is_traced(x):
    raise ValueError(f"compress: {what} of leaf '{path}' is traced; compress runs outside "
                     "jax.jit (the kept counts set the shapes of its arrays).")
  return np.asarray(x)


def compress(params, masks, *, formats: Sequence[str] = FORMATS):
  """Compact form of ``apply_masks(params, masks)``: a pytree whose every leaf is an array.

  Each leaf with a non-trivial mask becomes a :class:`Compressed` node in the cheapest of
  ``formats`` that fits its mask (see the module docstring); leaves with a scalar ``True`` mask
  (and masks that keep everything) pass through as numpy arrays.
  Save the result with any checkpointer; :func:`decompress` gives the masked params back
  bit for bit.

  Args:
    params: a pytree of arrays (pure dicts, Flax NNX ``State``, Equinox modules...).
    masks: keep-masks with the params' tree structure (bool arrays of the leaf's shape, or
      scalars), e.g. from :func:`jaxprune.topk_mask`. Must be concrete (not traced).
    formats: the formats allowed for leaves that lose weights, a subset of :data:`FORMATS`
      (``"n_of_m"``, ``"bitmask"``, ``"indices"``, ``"dense"``). Leaves that lose none pass
      through, leaves that keep none store no values, whatever this says.

  Returns:
    The params' tree with :class:`Compressed` nodes in place of pruned leaves and numpy
    arrays everywhere else (non-array leaves, e.g. Python numbers, are kept as they are).

  Raises:
    ValueError: masks whose tree or shapes differ from the params', traced masks or params,
      an unknown format, or formats that cannot store a leaf, naming the leaf path.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 16)), "b": jnp.ones(16)}
    >>> masks = jp.topk_mask(jp.magnitude_scores(params), 0.9)      # keeps 26 of 256
    >>> small = jp.compress(params, masks)
    >>> small["w"], small["w"].arrays["values"].shape, small["w"].arrays["gaps"].dtype
    (Compressed('indices', shape=(16, 16), dtype=float32), (26,), dtype('uint8'))
    >>> bool((jp.decompress(small)["w"] == jp.apply_masks(params, masks)["w"]).all())
    True
  """
  formats = tuple(formats)
  unknown = [f for f in formats if f not in FORMATS]
  if unknown:
    raise ValueError(f"compress: unknown formats {unknown}; choose from {FORMATS}.")
  paths, leaves, mleaves = masks_lib._check_masks(params, masks)
  treedef = jax.tree.structure(params)
  out = []
  for path, x, m in zip(paths, leaves, mleaves, strict=True):
    mask = _host(m, path, "the mask")
    if not hasattr(x, "shape"):
      if mask.shape == () and bool(mask):
        out.append(x)
        continue
      x = np.asarray(x)
    x = _host(x, path, "the value")
    if mask.shape == () and bool(mask):
      out.append(x)
    else:
      out.append(_compress_leaf(path, x, np.broadcast_to(mask.astype(bool), x.shape), formats))
  return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- decompress

def _is_dict_node(x) -> bool:
  return isinstance(x, Mapping) and FORMAT_KEY in x


def _is_node(x) -> bool:
  return isinstance(x, Compressed) or _is_dict_node(x)


def _from_dict(path: str, d: Mapping) -> Compressed:
  fmt = d[FORMAT_KEY]
  if _tree.is_traced(fmt):
    raise ValueError(f"decompress: the '{FORMAT_KEY}' array of '{path}' is traced: a tree "
                     "restored without a target describes its leaves in arrays, which jit "
                     "cannot read. Call jp.as_compressed(tree) outside jit first.")
  fmt = np.asarray(fmt)
  if fmt.ndim != 1 or fmt.size < _HEAD or fmt[0] != FORMAT_VERSION:
    raise ValueError(f"decompress: '{path}/{FORMAT_KEY}' is not a jaxprune format array of "
                     f"version {FORMAT_VERSION}: {fmt.tolist()}.")
  _, kind_i, dtype_i, n, m, axis, ndim = (int(v) for v in fmt[:_HEAD])
  if not (0 <= kind_i < len(_KINDS) and 0 <= dtype_i < len(_DTYPES)
          and fmt.size == _HEAD + ndim):
    raise ValueError(f"decompress: '{path}/{FORMAT_KEY}' is malformed: {fmt.tolist()}.")
  kind, shape = _KINDS[kind_i], tuple(int(v) for v in fmt[_HEAD:])
  missing = [k for k in _ARRAYS[kind] if k not in d]
  if missing:
    raise ValueError(f"decompress: node '{path}' of kind {kind!r} lacks arrays {missing}.")
  node = Compressed(kind, shape, _DTYPES[dtype_i], {k: d[k] for k in (FORMAT_KEY,)
                                                    + _ARRAYS[kind]}, n=n, m=m, axis=axis)
  _check_node(path, node)
  return node


def _check_node(path: str, node: Compressed) -> None:
  a, total = node.arrays, node.size
  if node.kind == "zeros":
    return
  v = a["values"]
  if jnp.dtype(v.dtype) != node.dtype:
    raise ValueError(f"decompress: '{path}/values' has dtype {jnp.dtype(v.dtype).name}, the "
                     f"leaf {node.dtype.name}.")
  if node.kind == "n_of_m":
    ax, n, m = node.axis, node.n, node.m
    want = node.shape[:ax] + (node.shape[ax] // m * n,) + node.shape[ax + 1:]
    if not (0 < n < m and ax < len(node.shape) and node.shape[ax] % m == 0) \
        or tuple(v.shape) != want:
      raise ValueError(f"decompress: '{path}' ({n}:{m} along axis {ax} of {node.shape}) has "
                       f"values of shape {tuple(v.shape)}, expected {want}.")
    k = math.prod(want)
    if tuple(a["nm_index"].shape) != (-(-k * _index_bits(m) // 8),):
      raise ValueError(f"decompress: '{path}/nm_index' has shape {tuple(a['nm_index'].shape)}.")
    return
  if np.ndim(v) != 1 or not 0 < v.shape[0] <= total:
    raise ValueError(f"decompress: '{path}/values' has shape {tuple(v.shape)} for a leaf of "
                     f"{total} weights.")
  if node.kind == "bitmask" and tuple(a["bits"].shape) != (-(-total // 8),):
    raise ValueError(f"decompress: '{path}/bits' has shape {tuple(a['bits'].shape)}, expected "
                     f"({-(-total // 8)},).")
  if node.kind == "indices" and tuple(a["gaps"].shape) != tuple(v.shape):
    raise ValueError(f"decompress: '{path}/gaps' and values differ in shape.")


def as_compressed(tree):
  """Rebuilds :class:`Compressed` nodes in a tree restored without a target.

  A checkpoint restored with no target (``ocp.load(path)``) is plain nested dicts; each
  compressed leaf is a dict with a ``jaxprune_format`` array. This reads those arrays (on the
  host, outside jit) and puts the nodes back, with their description in the treedef, so that
  ``jax.jit(decompress)`` accepts the tree. Nodes already built pass through.

  Raises:
    ValueError: a malformed node, naming its path.

  Examples:
    >>> import jax, numpy as np, jaxprune as jp
    >>> small = jp.compress({"w": np.eye(4, dtype=np.float32)}, {"w": np.eye(4, dtype=bool)})
    >>> restored = {"w": {k: np.asarray(v) for k, v in small["w"].arrays.items()}}
    >>> sorted(restored["w"])                   # what ocp.load(path) gives, with no target
    ['jaxprune_format', 'nm_index', 'values']
    >>> nodes = jp.as_compressed(restored)
    >>> nodes["w"]
    Compressed('n_of_m', shape=(4, 4), dtype=float32, n=1, m=4, axis=0)
    >>> jax.jit(jp.decompress)(nodes)["w"].tolist() == np.eye(4).tolist()
    True
  """
  def fix(kp, x):
    return _from_dict(_tree.path_str(kp), x) if _is_dict_node(x) else x
  return jax.tree_util.tree_map_with_path(fix, tree, is_leaf=_is_node)


def _unpack_positions(packed, count: int, m: int) -> jax.Array:
  c = _index_bits(m)
  bits = jnp.unpackbits(packed.astype(jnp.uint8), count=count * c, bitorder="little")
  weights = (1 << np.arange(c)).astype(np.int32).reshape(1, c)
  return jnp.sum(bits.reshape(count, c).astype(jnp.int32) * weights, axis=-1)


def _decompress_node(node: Compressed) -> jax.Array:
  # One jitted program per description: eager calls compile once instead of op by op, and
  # under an outer jit it is inlined.
  desc = (node.kind, node.shape, node.dtype.name, node.n, node.m, node.axis)
  return _decompress_arrays(desc, {k: v for k, v in node.arrays.items() if k != FORMAT_KEY})


def _unshard_axes(x: jax.Array, axes=None) -> jax.Array:
  """``x`` with ``axes`` (default: all) not split over mesh axes, when its type says they are
  (``Explicit`` axes: cumsum, gathers on a flat index and reshapes that split a sharded
  dimension are refused there). Arrays without such a sharding are returned as they are."""
  sharding = jax.typeof(x).sharding
  spec = getattr(sharding, "spec", None)
  if spec is None:
    return x
  axes = range(len(spec)) if axes is None else axes
  if all(i >= len(spec) or spec[i] is None for i in axes):
    return x
  keep = jax.sharding.PartitionSpec(*[None if i in axes else s for i, s in enumerate(spec)])
  return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, keep))


@functools.partial(jax.jit, static_argnums=0)
def _decompress_arrays(desc, a) -> jax.Array:
  kind, shape, dtype, n, m, ax = desc
  dtype = jax.dtypes.canonicalize_dtype(dtype)  # float64 -> float32 unless jax_enable_x64
  zero = jnp.zeros((), dtype)
  if kind == "zeros":
    return jnp.zeros(shape, dtype)
  values = a["values"]
  if kind == "n_of_m":
    groups = shape[ax] // m
    split = shape[:ax] + (groups, n) + shape[ax + 1:]
    vals = _unshard_axes(values, (ax,)).reshape(split)
    pos = _unpack_positions(_unshard_axes(a["nm_index"]), math.prod(split), m).reshape(split)
    j = np.arange(m, dtype=np.int32).reshape((1,) * (ax + 1) + (m,) + (1,) * (len(shape) - ax - 1))
    out = jnp.zeros(shape[:ax] + (groups, m) + shape[ax + 1:], dtype)
    for i in range(n):  # selects, not sums: every bit of a kept value (-0.0 too) survives
      v_i = jax.lax.slice_in_dim(vals, i, i + 1, axis=ax + 1)
      p_i = jax.lax.slice_in_dim(pos, i, i + 1, axis=ax + 1)
      out = jnp.where(p_i == j, v_i, out)
    return out.reshape(shape)
  total = math.prod(shape)
  values = _unshard_axes(values)
  if kind == "indices":
    positions = jnp.cumsum(_unshard_axes(a["gaps"]).astype(jnp.int32), dtype=jnp.int32)
    flat = jnp.zeros((total,), dtype).at[positions].set(
        values, indices_are_sorted=True, unique_indices=True)
    return flat.reshape(shape)
  bits = _unshard_axes(a["bits"]).astype(jnp.uint8)
  mask = jnp.unpackbits(bits, count=total, bitorder="little").astype(bool)
  rank = jnp.maximum(jnp.cumsum(mask, dtype=jnp.int32) - 1, 0)
  return jnp.where(mask, values[rank], zero).reshape(shape)


def decompress(compressed):
  """The params :func:`compress` was given, with the masks applied, bit for bit.

  Works on what :func:`compress` returned, on that tree after a save/restore with any
  checkpointer (with orbax, ``ocp.load(path)`` with no target gives nested dicts, which this
  reads), and under ``jax.jit`` (for a tree restored without a target, call
  :func:`as_compressed` first). Sharded inputs are fine; to get the params' own shardings, jit
  it with ``out_shardings``.

  Args:
    compressed: the output of :func:`compress`, or that tree restored from disk.

  Returns:
    The params' tree (or, for a tree restored without a target, its nested-dict form) with
    every pruned leaf dense again: jax arrays equal to ``apply_masks(params, masks)``.

  Raises:
    ValueError: a malformed node, or a restored tree's description traced under jit.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> w = jnp.array([[1., -0.], [3., 4.], [-5., 6.], [7., 8.]])     # (in=4, out=2)
    >>> masks = {"w": jnp.array([[True, True], [False, True], [True, False], [False, False]])}
    >>> small = jp.compress({"w": w}, masks)
    >>> small["w"]
    Compressed('n_of_m', shape=(4, 2), dtype=float32, n=2, m=4, axis=0)
    >>> jax.jit(jp.decompress)(small)["w"]
    Array([[ 1., -0.],
           [ 0.,  4.],
           [-5.,  0.],
           [ 0.,  0.]], dtype=float32)
  """
  def leaf(kp, x):
    if isinstance(x, Compressed):
      return _decompress_node(x)
    if _is_dict_node(x):
      return _decompress_node(_from_dict(_tree.path_str(kp), x))
    if hasattr(x, "shape") and not _tree.is_traced(x):
      return jnp.asarray(x)
    return x
  return jax.tree_util.tree_map_with_path(leaf, compressed, is_leaf=_is_node)


# ----------------------------------------------------------------------------- sizes

def nbytes(tree) -> int:
  """Bytes of all arrays in a tree (compressed or not).

  Examples:
    >>> import numpy as np
    >>> from jaxprune.compress import nbytes
    >>> nbytes({"a": np.zeros(3, np.float32), "b": np.zeros(2, np.uint8)})
    14
  """
  return int(sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def size_summary(compressed) -> list[dict[str, Any]]:
  """One row per leaf: ``path``, ``format``, ``shape``, ``dtype``, ``kept``, ``dense_bytes``
  (the leaf stored whole) and ``stored_bytes`` (what the compressed tree holds for it).

  ``kept`` is None for leaves that pass through (``format`` ``"dense"``).

  Examples:
    >>> import numpy as np, jaxprune as jp
    >>> from jaxprune.compress import size_summary
    >>> mask = np.random.default_rng(0).random((8, 8)) < 0.4     # 27 kept: 108 + 8 + 36 bytes
    >>> row, = size_summary(jp.compress({"w": np.ones((8, 8), np.float32)}, {"w": mask}))
    >>> row["format"], row["kept"], row["dense_bytes"], row["stored_bytes"]
    ('bitmask', 27, 256, 152)
  """
  rows = []
  flat = jax.tree_util.tree_flatten_with_path(compressed, is_leaf=_is_node)[0]
  for kp, x in flat:
    path = _tree.path_str(kp)
    node = x if isinstance(x, Compressed) else _from_dict(path, x) if _is_dict_node(x) else None
    if node is None:
      if not hasattr(x, "dtype"):
        continue
      n = int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize
      rows.append({"path": path, "format": "dense", "shape": tuple(np.shape(x)),
                   "dtype": jnp.dtype(x.dtype).name, "kept": None, "dense_bytes": n,
                   "stored_bytes": n})
      continue
    kept = 0 if node.kind == "zeros" else int(np.prod(np.shape(node.arrays["values"])))
    rows.append({"path": path, "format": node.kind, "shape": node.shape,
                 "dtype": node.dtype.name, "kept": kept,
                 "dense_bytes": node.size * node.dtype.itemsize, "stored_bytes": node.nbytes})
  return rows
