"""Layer 7 — surgery: turn a structured mask into a physically smaller model.

The couplings between parameter axes are read from the model's own computation: the function
``fn(params, *inputs)`` is traced to a jaxpr (``jax.make_jaxpr``) and every axis of every value
is followed through its equations. Axes that must keep the same channels are merged (union-find):
a Dense kernel's output units with its bias and with the next kernel's input rows (a contraction
in ``dot_general``), a Conv's output channels with BatchNorm's scale/bias/mean/var (elementwise
ops and ``broadcast_in_dim``) and with the next Conv's input channels (``conv_general_dilated``),
both sides of a residual ``add``, a GRU's hidden units across the gate slices of its kernels
(``split``/``slice``/``concatenate`` make an axis a sequence of parts) and its recurrent kernel
(``scan`` carries), and attention heads across the q/k/v/out projections (batch dimensions of
``dot_general``; a ``reshape`` that splits ``heads*head_dim`` makes the axis a product of parts).
Each resulting atom is a :class:`ChannelGroup`: a set of ``(param path, axis)`` members whose
channels are removed together.

The contract. ``masks`` (a mask tree like ``params``, see :func:`jaxprune.apply_masks`) removes
channel ``j`` of a group when every member leaf chosen by ``where`` (the leaves masks apply to;
default: floating leaves with ``ndim >= 2``, i.e. kernels) has all of its entries at ``j``
masked. Members not chosen by ``where`` (biases, BatchNorm statistics) follow the group. Then
``fn(shrink(fn, params, masks, x), x) == fn(apply_masks(params, masks), x)`` for every ``x``.
This holds because a group is only called prunable when tracing proves that, in the masked model,
each removed channel contributes exactly zero: every place that sums over the channel
(a contraction, ``reduce_sum``, ``cumsum``) multiplies it by a masked weight or by a value that
masking made exactly zero (tracked through the ops that keep zeros: ``mul``, ``relu``, ``tanh``,
``x - mean`` with both masked, ...). E.g. Dense→ReLU→Dense with only kernels masked: the hidden
unit still carries ``relu(b_j)``, but the next kernel's row ``j`` is masked, so it adds nothing.
A GRU unit whose kernel columns and recurrent rows are masked still updates its own state, but
nothing reads it. A head whose q/k/v kernels are masked attends uniformly to zero values.

Refused (reported with a reason, never guessed): groups that reach ``fn``'s inputs or outputs
(input features, logits), that touch an array ``fn`` closes over instead of taking in
``params``, that are reduced with ``max``/``argmax``/``sort`` or summed without a masked factor
(LayerNorm over hidden channels), reshaped across (``(6, 4) -> (4, 6)``), gathered, padded,
reversed or sliced with a stride along, or that pass through a primitive this module does not
know. Finally every prunable group is *probed*: ``fn`` is traced again with the group one channel
smaller; if that fails, or the program differs in a constant (``1/sqrt(head_dim)``, a mean's
``1/n``), the group is refused too: ``fn`` depends on the axis' size, not only on its values.
``shrink`` also checks the equality above on the example inputs (``verify=True``).

Dropout and other randomness must be off (``fn`` deterministic); Conv with
``feature_group_count > 1`` is supported only where ``fn`` derives the group count from shapes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jaxprune import _tree
from jaxprune import masks as masks_lib

__all__ = ["ChannelGroup", "Member", "channel_groups", "group_scores", "group_masks", "shrink",
           "module_fn", "shrink_module"]

_INPUT = "is an axis of an input of fn (input features never change)"
_OUTPUT = "is an axis of fn's output (outputs never change)"
_SINGLE = "has a single channel"
_UNMASKED = "none of its leaves is chosen by `where`, so no mask can remove its channels"
_WINDOW = "is an axis that `conv_general_dilated` slides its window along"
_FIXED_REASONS = (_INPUT, _OUTPUT, _SINGLE, _UNMASKED, _WINDOW)
# axes that are positions (space, time), not channels: never shrunk, whatever the masks say
_POSITION_PREFIXES = ("is pooled over by", "is scanned over by")


def _is_fixed(reasons) -> bool:
  return bool(reasons) and (_INPUT in reasons or _OUTPUT in reasons or all(
      w in _FIXED_REASONS or w.startswith(_POSITION_PREFIXES) for w in reasons))


# ----------------------------------------------------------------------------- public types

@dataclasses.dataclass(frozen=True, eq=False)
class Member:
  """One parameter axis (or a part of it) inside a :class:`ChannelGroup`.

  Attributes:
    path: the leaf's path, e.g. ``"layers/0/kernel"``.
    axis: the leaf's axis.
    index: int array of the axis' length: the group channel at each position, ``-1`` where the
      position belongs to another group (e.g. one gate's slice of a GRU kernel).
    masked: whether ``where`` chose this leaf, i.e. whether masks remove its entries.
  """
  path: str
  axis: int
  index: np.ndarray
  masked: bool

  def __str__(self):
    return f"{self.path} axis {self.axis}{_describe_index(self.index)}"


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelGroup:
  """Parameter axes whose channels must be removed together, as tracing found them.

  Attributes:
    name: ``"path:axis"`` of its most telling member (a kernel's output axis if it has one).
    size: the number of channels.
    members: the :class:`Member` axes, in the params' flatten order.
    prunable: whether :func:`shrink` may remove its channels.
    reasons: why it is not prunable (empty when it is).
    fixed: not prunable by design (an input/output axis, a spatial or time axis, one channel,
      no masked leaf) rather than refused by tracing; :func:`shrink` keeps such a group whatever
      the masks say, while masks that remove channels of a refused group are an error.
  """
  name: str
  size: int
  members: tuple[Member, ...]
  prunable: bool
  reasons: tuple[str, ...] = ()
  fixed: bool = False

  def __str__(self):
    head = f"{self.name} ({self.size} channels, " + (
        "prunable)" if self.prunable else "not prunable: " + "; ".join(self.reasons) + ")")
    return "\n  ".join([head] + [("* " if m.masked else "  ") + str(m) for m in self.members])


def _describe_index(index: np.ndarray) -> str:
  n = len(index)
  pos = np.nonzero(index >= 0)[0]
  if len(pos) == n and np.array_equal(index, np.arange(n)):
    return ""
  if (len(pos) and np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos)))
      and np.array_equal(index[pos], np.arange(len(pos)))):
    return f" [{pos[0]}:{pos[-1] + 1}]"
  shown = ", ".join(str(int(c)) if c >= 0 else "-" for c in index[:8])
  return f" channel per position [{shown}{', ...' if n > 8 else ''}]"


# ----------------------------------------------------------------------------- axis classes

class _Classes:
  """Union-find over axis classes. A class is an atom (one group of channels) or, at its root, a
  ``("concat", parts)`` (the axis is the parts one after another) or ``("product", parts)`` (the
  axis is the parts' row-major product, as a ``reshape`` merges them)."""

  def __init__(self):
    self.parent: list[int] = []
    self.size: list[int] = []
    self.struct: list[tuple | None] = []
    self.marks: list[tuple[int, str]] = []

  def new(self, n: int) -> int:
    self.parent.append(len(self.parent))
    self.size.append(int(n))
    self.struct.append(None)
    return len(self.parent) - 1

  def find(self, c: int) -> int:
    root = c
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[c] != root:
      self.parent[c], c = root, self.parent[c]
    return root

  def n(self, c: int) -> int:
    return self.size[self.find(c)]

  def mark(self, c: int, reason: str) -> None:
    self.marks.append((c, reason))

  def structured(self, kind: str, parts) -> int:
    """A class made of ``parts`` (size-1 factors and empty parts dropped)."""
    skip = 1 if kind == "product" else 0
    parts = [p for p in parts if self.n(p) != skip]
    if len(parts) == 1:
      return parts[0]
    sizes = [self.n(p) for p in parts]
    c = self.new(math.prod(sizes) if kind == "product" else sum(sizes))
    if parts:
      self.struct[c] = (kind, tuple(parts))
    return c

  def _bounds(self, c: int, off: int = 0) -> set[int]:
    c = self.find(c)
    st = self.struct[c]
    out: set[int] = set()
    if st is None or st[0] != "concat":
      return out
    for p in st[1]:
      out |= self._bounds(p, off)
      off += self.n(p)
      out.add(off)
    return out

  def union(self, a: int, b: int) -> int:
    a, b = self.find(a), self.find(b)
    if a == b:
      return a
    if self.size[a] != self.size[b]:  # never happens for well-typed jaxprs; refuse, don't crash
      self.mark(a, "is matched with an axis of another size")
      self.mark(b, "is matched with an axis of another size")
      return a
    sa, sb = self.struct[a], self.struct[b]
    self.parent[b] = a
    if sa is None:
      self.struct[a] = sb
    elif sb is None:
      pass
    elif sa[0] == sb[0] == "product" and [self.n(p) for p in sa[1]] == [self.n(p) for p in sb[1]]:
      for x, y in zip(sa[1], sb[1], strict=False):
        self.union(x, y)
    elif sa[0] == sb[0] == "concat":
      cuts = self._bounds(a) | self._bounds(b)
      xa = self._cut_parts(sa[1], cuts)
      xb = self._cut_parts(sb[1], cuts)
      if xa is None or xb is None or [s[:2] for s in xa] != [s[:2] for s in xb]:
        self.mark(a, "is split into parts in two incompatible ways")
      else:
        for (_, _, x), (_, _, y) in zip(xa, xb, strict=False):
          self.union(x, y)
    else:
      self.mark(a, "is split into parts (concatenate/slice) in one place and reshaped in another")
    return self.find(a)

  def _cut_parts(self, parts, cuts):
    out, off = [], 0
    for p in parts:
      m = self.n(p)
      sub = self.segments(p, [x - off for x in cuts])
      if sub is None:
        return None
      out += [(s + off, e + off, k) for s, e, k in sub]
      off += m
    return out

  def segments(self, c: int, cuts) -> list[tuple[int, int, int]] | None:
    """Partitions class ``c`` at positions ``cuts`` (an atom becomes a concat of new atoms).

    Returns ``[(start, stop, part)]`` covering the axis, or None when a cut falls inside a
    reshaped (product) part.
    """
    c = self.find(c)
    n = self.size[c]
    inner = sorted({int(x) for x in cuts if 0 < x < n})
    if not inner:
      return [(0, n, c)]
    st = self.struct[c]
    if st is None:
      bounds = [0, *inner, n]
      parts = tuple(self.new(e - s) for s, e in zip(bounds, bounds[1:], strict=False))
      self.struct[c] = ("concat", parts)
      return [(s, e, p) for s, e, p in zip(bounds, bounds[1:], parts, strict=False)]
    if st[0] == "product":
      return None
    return self._cut_parts(st[1], inner)

  def expand(self, c: int) -> list[tuple[int, np.ndarray]]:
    """The atoms of class ``c``: ``[(atom, index)]``, index = the atom's channel per position."""
    c = self.find(c)
    n = self.size[c]
    st = self.struct[c]
    if st is None:
      return [(c, np.arange(n))]
    out = []
    if st[0] == "concat":
      off = 0
      for p in st[1]:
        m = self.n(p)
        for a, idx in self.expand(p):
          full = np.full(n, -1)
          full[off:off + m] = idx
          out.append((a, full))
        off += m
    else:
      sizes = [self.n(p) for p in st[1]]
      for i, p in enumerate(st[1]):
        shape = [1] * len(sizes)
        shape[i] = sizes[i]
        for a, idx in self.expand(p):
          out.append((a, np.broadcast_to(idx.reshape(shape), sizes).reshape(-1)))
    return out


# ----------------------------------------------------------------------------- jaxpr walk

class _Val(NamedTuple):
  dims: tuple          # one class per axis
  shape: tuple
  z: tuple             # per axis: exactly zero, in the masked model, at the axis' pruned channels
  allzero: bool        # the whole value is exactly zero
  leaf: int | None = None   # index of the params leaf this value is
  value: Any = None         # a scalar literal's value


_ANY = any
_ALL = all


def _first(zs):
  return zs[0]


def _none(zs):
  del zs
  return False


# elementwise primitives and how "zero at pruned channels" passes through them
_ZERO_KEEPING_UNARY = {
    "neg", "abs", "sign", "floor", "ceil", "round", "sin", "tan", "tanh", "asin", "atan", "sinh",
    "asinh", "atanh", "sqrt", "cbrt", "expm1", "log1p", "erf", "erf_inv", "real", "imag", "conj",
    "convert_element_type", "reduce_precision", "copy", "copy_p", "stop_gradient", "square",
    "population_count", "sharding_constraint", "mesh_cast", "reshard", "pvary"}
_OTHER_UNARY = {"exp", "exp2", "log", "logistic", "cos", "acos", "acosh", "cosh", "rsqrt",
                "is_finite", "not", "lgamma", "digamma", "erfc", "clz", "bessel_i0e",
                "bessel_i1e"}
_BINARY_RULES = {
    "mul": _ANY, "and": _ANY,
    "add": _ALL, "sub": _ALL, "max": _ALL, "min": _ALL, "add_any": _ALL, "or": _ALL, "xor": _ALL,
    "div": _first, "rem": _first, "shift_left": _first, "shift_right_arithmetic": _first,
    "shift_right_logical": _first,
    "pow": _none, "atan2": _none, "nextafter": _none, "eq": _none, "ne": _none, "lt": _none,
    "le": _none, "gt": _none, "ge": _none, "igamma": _none, "igammac": _none,
    "random_gamma_grad": _none, "polygamma": _none, "zeta": _none}
_CALLS = {"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
          "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"}
_SOURCES = {"iota", "random_bits", "random_seed", "random_wrap", "random_unwrap",
            "random_fold_in", "random_split", "threefry2x32", "rng_bit_generator", "rng_uniform"}
_PASS_THROUGH = {"optimization_barrier", "device_put"}


class _Walker:
  """Follows every axis of every value through a jaxpr, building axis classes in ``cl``."""

  def __init__(self, cl: _Classes):
    self.cl = cl
    self.first_use: dict[int, int] = {}

  # -- values
  def fresh(self, shape, z: bool = False, allzero: bool = False, **kw) -> _Val:
    shape = tuple(int(s) for s in shape)
    return _Val(tuple(self.cl.new(n) for n in shape), shape, (z,) * len(shape), allzero, **kw)

  def const(self, value) -> _Val:
    try:
      arr = np.asarray(value)
      az = bool(arr.size) and bool(np.all(arr == 0))
    except Exception:  # key arrays and other opaque dtypes
      az = False
    val = self.fresh(np.shape(value), z=az, allzero=az)
    for c in val.dims:
      if self.cl.n(c) > 1:
        self.cl.mark(c, "touches an array that fn closes over instead of taking it in params "
                     "(shrink cannot resize it)")
    return val

  def read(self, env, v) -> _Val:
    if isinstance(v, jcore.Literal):
      try:
        arr = np.asarray(v.val)
        az = bool(np.all(arr == 0))
      except Exception:
        arr, az = None, False
      value = arr.item() if arr is not None and arr.ndim == 0 else None
      return self.fresh(np.shape(v.val), z=az, allzero=az, value=value)
    return env[v]

  def from_aval(self, var) -> _Val:
    return self.fresh(getattr(var.aval, "shape", ()))

  # -- jaxprs
  def run(self, jaxpr, consts, ins) -> list[_Val]:
    env = {}
    for v, c in zip(jaxpr.constvars, consts, strict=False):
      env[v] = c
    for v, x in zip(jaxpr.invars, ins, strict=False):
      env[v] = x
    for eqn in jaxpr.eqns:
      xs = [self.read(env, v) for v in eqn.invars]
      outs = self.eqn(eqn, xs)
      for v, o in zip(eqn.outvars, outs, strict=False):
        if not isinstance(v, jcore.DropVar):
          env[v] = o
    return [self.read(env, v) for v in jaxpr.outvars]

  def run_sub(self, sub, ins) -> list[_Val]:
    if isinstance(sub, jcore.ClosedJaxpr):
      return self.run(sub.jaxpr, [self.const(c) for c in sub.consts], ins)
    return self.run(sub, [self.const(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype))
                          for v in sub.constvars], ins)

  # -- equations
  def eqn(self, eqn, xs) -> list[_Val]:
    name = eqn.primitive.name
    if name in _CALLS:
      sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      if isinstance(sub, (jcore.Jaxpr, jcore.ClosedJaxpr)):
        return self.run_sub(sub, xs)
      return self.opaque(eqn, xs)
    if name == "scan":
      return self.scan(eqn, xs)
    if name == "while":
      return self.while_loop(eqn, xs)
    if name == "cond":
      return self.cond(eqn, xs)
    for x in xs:
      if x.leaf is not None:
        self.first_use.setdefault(x.leaf, len(self.first_use))
    if name in _ZERO_KEEPING_UNARY:
      return self.elementwise(eqn, xs, _first)
    if name in _OTHER_UNARY:
      return self.elementwise(eqn, xs, _none)
    if name in _BINARY_RULES:
      return self.elementwise(eqn, xs, _BINARY_RULES[name])
    if name == "integer_pow":
      return self.elementwise(eqn, xs, _first if eqn.params["y"] > 0 else _none)
    if name == "select_n":
      return self.elementwise(eqn, xs, lambda zs: all(zs[1:]))
    if name == "clamp":
      lo, hi = xs[0].value, xs[2].value
      ok = lo is not None and hi is not None and lo <= 0 <= hi
      return self.elementwise(eqn, xs, lambda zs: ok and zs[1])
    if name in _SOURCES:
      return [self.from_aval(v) for v in eqn.outvars]
    if name in _PASS_THROUGH:
      return list(xs[:len(eqn.outvars)])
    handler = getattr(self, "p_" + name, None)
    if handler is not None:
      return handler(eqn, xs, **eqn.params)
    return self.opaque(eqn, xs)

  def opaque(self, eqn, xs) -> list[_Val]:
    why = (f"passes through `{eqn.primitive.name}`, which surgery does not understand, so it "
           "cannot prove removing channels safe")
    outs = [self.from_aval(v) for v in eqn.outvars]
    for val in list(xs) + outs:
      for c in val.dims:
        self.cl.mark(c, why)
    return outs

  def refuse(self, c, why: str) -> None:
    if self.cl.n(c) > 1:
      self.cl.mark(c, why)

  def elementwise(self, eqn, xs, rule) -> list[_Val]:
    shape = tuple(getattr(eqn.outvars[0].aval, "shape", ()))
    nd = len(shape)
    arrays = [x for x in xs if x.shape]
    if any(len(x.shape) != nd for x in arrays):
      return self.opaque(eqn, xs)
    dims, z = [], []
    for d in range(nd):
      c = None
      for x in arrays:
        if x.shape[d] == shape[d]:
          c = x.dims[d] if c is None else self.cl.union(c, x.dims[d])
      dims.append(self.cl.new(shape[d]) if c is None else c)
      z.append(bool(rule([x.z[d] if x.shape and x.shape[d] == shape[d] else x.allzero
                          for x in xs])))
    out = _Val(tuple(dims), shape, tuple(z), bool(rule([x.allzero for x in xs])))
    return [out] * len(eqn.outvars)

  # structural primitives
  def p_broadcast_in_dim(self, eqn, xs, *, shape, broadcast_dimensions, **_):
    x = xs[0]
    dims: list = [None] * len(shape)
    z = [x.allzero] * len(shape)
    for i, d in enumerate(broadcast_dimensions):
      if x.shape[i] == shape[d]:
        dims[d], z[d] = x.dims[i], x.z[i]
    dims = [self.cl.new(n) if c is None else c for c, n in zip(dims, shape, strict=False)]
    return [_Val(tuple(dims), tuple(shape), tuple(z), x.allzero)]

  def p_reshape(self, eqn, xs, *, new_sizes, dimensions=None, **_):
    x = xs[0]
    new_sizes = tuple(int(s) for s in new_sizes)
    if dimensions is not None:
      return self.opaque(eqn, xs)
    old = [i for i, s in enumerate(x.shape) if s != 1]
    new = [j for j, s in enumerate(new_sizes) if s != 1]
    dims = [None] * len(new_sizes)
    z = [x.allzero] * len(new_sizes)
    a = b = 0
    while a < len(old) and b < len(new):
      ia, ob = [old[a]], [new[b]]
      pa, pb = x.shape[old[a]], new_sizes[new[b]]
      a, b = a + 1, b + 1
      while pa != pb:
        if pa < pb and a < len(old):
          ia.append(old[a])
          pa *= x.shape[old[a]]
          a += 1
        elif pb < pa and b < len(new):
          ob.append(new[b])
          pb *= new_sizes[new[b]]
          b += 1
        else:
          return self.opaque(eqn, xs)
      zin = all(x.z[i] for i in ia)
      if len(ia) == 1 and len(ob) == 1:
        dims[ob[0]] = x.dims[ia[0]]
      elif len(ia) == 1:  # split one axis into several
        parts = [self.cl.new(new_sizes[j]) for j in ob]
        self.cl.union(x.dims[ia[0]], self.cl.structured("product", parts))
        for j, p in zip(ob, parts, strict=False):
          dims[j] = p
      elif len(ob) == 1:  # merge several axes into one
        dims[ob[0]] = self.cl.structured("product", [x.dims[i] for i in ia])
      else:
        for i in ia:
          self.refuse(x.dims[i], f"is reshaped across ({x.shape} -> {new_sizes})")
        for j in ob:
          dims[j] = self.cl.new(new_sizes[j])
          self.refuse(dims[j], f"is reshaped across ({x.shape} -> {new_sizes})")
      for j in ob:
        z[j] = zin
    if a != len(old) or b != len(new):
      return self.opaque(eqn, xs)
    dims = [self.cl.new(n) if c is None else c for c, n in zip(dims, new_sizes, strict=False)]
    return [_Val(tuple(dims), new_sizes, tuple(z), x.allzero)]

  def p_transpose(self, eqn, xs, *, permutation, **_):
    x = xs[0]
    return [_Val(tuple(x.dims[p] for p in permutation), tuple(x.shape[p] for p in permutation),
                 tuple(x.z[p] for p in permutation), x.allzero)]

  def p_squeeze(self, eqn, xs, *, dimensions, **_):
    x = xs[0]
    drop = {d % len(x.shape) for d in dimensions}
    keep = [d for d in range(len(x.shape)) if d not in drop]
    return [_Val(tuple(x.dims[d] for d in keep), tuple(x.shape[d] for d in keep),
                 tuple(x.z[d] for d in keep), x.allzero)]

  def p_expand_dims(self, eqn, xs, *, dimensions, **_):
    x = xs[0]
    shape = tuple(getattr(eqn.outvars[0].aval, "shape", ()))
    new = {d % len(shape) for d in dimensions}
    it = iter(range(len(x.shape)))
    dims, z = [], []
    for d in range(len(shape)):
      if d in new:
        dims.append(self.cl.new(1))
        z.append(x.allzero)
      else:
        i = next(it)
        dims.append(x.dims[i])
        z.append(x.z[i])
    return [_Val(tuple(dims), shape, tuple(z), x.allzero)]

  def p_rev(self, eqn, xs, *, dimensions, **_):
    x = xs[0]
    for d in dimensions:
      self.refuse(x.dims[d], "is reversed by `rev`")
    return [x._replace(leaf=None)]

  def _reduce(self, eqn, xs, axes, summed: bool, keep_zero: bool):
    x = xs[0]
    name = eqn.primitive.name
    axes = {int(a) % max(len(x.shape), 1) for a in axes}
    for a in axes:
      if summed:
        if not x.z[a]:
          self.refuse(x.dims[a], f"is summed over by `{name}` while its pruned channels are not "
                      "exactly zero in the masked model (e.g. a mean or LayerNorm over channels)")
      else:
        self.refuse(x.dims[a], f"is reduced over by `{name}`, whose result changes when "
                    "channels are removed")
    keep = [d for d in range(len(x.shape)) if d not in axes]
    shape = tuple(getattr(eqn.outvars[0].aval, "shape", ()))
    return [_Val(tuple(x.dims[d] for d in keep), shape,
                 tuple(keep_zero and x.z[d] for d in keep), keep_zero and x.allzero)]

  def p_reduce_sum(self, eqn, xs, *, axes, **_):
    return self._reduce(eqn, xs, axes, True, True)

  def p_reduce_max(self, eqn, xs, *, axes, **_):
    return self._reduce(eqn, xs, axes, False, True)

  p_reduce_min = p_reduce_prod = p_reduce_max

  def p_reduce_and(self, eqn, xs, *, axes, **_):
    return self._reduce(eqn, xs, axes, False, False)

  p_reduce_or = p_reduce_xor = p_argmax = p_argmin = p_reduce_and

  def _cumulative(self, eqn, xs, axis, summed: bool):
    x = xs[0]
    axis = int(axis) % len(x.shape)
    if summed and x.z[axis]:
      pass
    else:
      self.refuse(x.dims[axis], f"is accumulated along by `{eqn.primitive.name}`")
    return [x._replace(leaf=None, z=tuple(summed and zz for zz in x.z))]

  def p_cumsum(self, eqn, xs, *, axis, **_):
    return self._cumulative(eqn, xs, axis, True)

  def p_cumprod(self, eqn, xs, *, axis, **_):
    return self._cumulative(eqn, xs, axis, False)

  p_cummax = p_cummin = p_cumlogsumexp = p_cumprod

  def p_dot_general(self, eqn, xs, *, dimension_numbers, **_):
    lhs, rhs = xs[0], xs[1]
    (lc, rc), (lb, rb) = dimension_numbers
    for a, b in zip(lc, rc, strict=False):
      c = self.cl.union(lhs.dims[a], rhs.dims[b])
      if not (lhs.z[a] or rhs.z[b]):
        self.refuse(c, "is summed over by `dot_general` while neither operand is exactly zero "
                    "at its pruned channels in the masked model (no masked weight there)")
    dims, z = [], []
    for a, b in zip(lb, rb, strict=False):
      dims.append(self.cl.union(lhs.dims[a], rhs.dims[b]))
      z.append(lhs.z[a] or rhs.z[b])
    for a in range(len(lhs.shape)):
      if a not in lc and a not in lb:
        dims.append(lhs.dims[a])
        z.append(lhs.z[a] or rhs.allzero)
    for b in range(len(rhs.shape)):
      if b not in rc and b not in rb:
        dims.append(rhs.dims[b])
        z.append(rhs.z[b] or lhs.allzero)
    shape = tuple(getattr(eqn.outvars[0].aval, "shape", ()))
    return [_Val(tuple(dims), shape, tuple(z), lhs.allzero or rhs.allzero)]

  def p_conv_general_dilated(self, eqn, xs, *, dimension_numbers, feature_group_count,
                             batch_group_count, **_):
    lhs, rhs = xs[0], xs[1]
    if batch_group_count != 1 or dimension_numbers is None:
      return self.opaque(eqn, xs)
    ls, rs, os_ = dimension_numbers
    shape = tuple(eqn.outvars[0].aval.shape)
    groups = int(feature_group_count)
    window = _WINDOW
    for d in ls[2:]:
      self.refuse(lhs.dims[d], window)
    for d in rs[2:]:
      self.refuse(rhs.dims[d], window)
    lf, ri, ro = ls[1], rs[1], rs[0]
    if groups == 1:
      contracted = self.cl.union(lhs.dims[lf], rhs.dims[ri])
    else:
      g = self.cl.new(groups)
      contracted = rhs.dims[ri]
      self.cl.union(lhs.dims[lf], self.cl.structured("product", [g, contracted]))
      self.cl.union(rhs.dims[ro],
                    self.cl.structured("product", [g, self.cl.new(rhs.shape[ro] // groups)]))
    if not (lhs.z[lf] or rhs.z[ri]):
      self.refuse(contracted, "is summed over by `conv_general_dilated` while neither operand is "
                  "exactly zero at its pruned channels in the masked model")
    dims: list = [None] * len(shape)
    z = [lhs.allzero or rhs.allzero] * len(shape)
    dims[os_[0]] = lhs.dims[ls[0]]
    z[os_[0]] = lhs.z[ls[0]] or rhs.allzero
    dims[os_[1]] = rhs.dims[ro]
    depthwise = groups > 1 and rhs.shape[ro] == groups  # output channel c reads input c only
    z[os_[1]] = rhs.z[ro] or lhs.allzero or (depthwise and lhs.z[lf])
    for d in os_[2:]:
      dims[d] = self.cl.new(shape[d])
      self.refuse(dims[d], window)
    return [_Val(tuple(dims), shape, tuple(z), lhs.allzero or rhs.allzero)]

  def _part(self, x, d, start, stop) -> int:
    segs = self.cl.segments(x.dims[d], [start, stop])
    if segs is None:
      self.refuse(x.dims[d], "is sliced inside a reshaped axis")
      return self.cl.new(stop - start)
    return self.cl.structured("concat", [p for s, e, p in segs if start <= s and e <= stop])

  def p_slice(self, eqn, xs, *, start_indices, limit_indices, strides=None, **_):
    x = xs[0]
    dims = []
    for d, n in enumerate(x.shape):
      s, e = int(start_indices[d]), int(limit_indices[d])
      st = 1 if strides is None else int(strides[d])
      if s == 0 and e == n and st == 1:
        dims.append(x.dims[d])
      elif st != 1:
        dims.append(self.cl.new(len(range(s, e, st))))
        self.refuse(x.dims[d], "is sliced with a stride")
        self.refuse(dims[-1], "is sliced with a stride")
      else:
        dims.append(self._part(x, d, s, e))
    shape = tuple(getattr(eqn.outvars[0].aval, "shape", ()))
    return [_Val(tuple(dims), shape, x.z, x.allzero)]

  def p_split(self, eqn, xs, *, sizes, axis, **_):
    x = xs[0]
    axis = int(axis) % len(x.shape)
    bounds = np.cumsum([0, *[int(s) for s in sizes]])
    outs = []
    for s, e, v in zip(bounds, bounds[1:], eqn.outvars, strict=False):
      dims = list(x.dims)
      dims[axis] = self._part(x, axis, int(s), int(e))
      outs.append(_Val(tuple(dims), tuple(v.aval.shape), x.z, x.allzero))
    return outs

  def p_concatenate(self, eqn, xs, *, dimension, **_):
    d = int(dimension)
    shape = tuple(eqn.outvars[0].aval.shape)
    dims, z = [], []
    for e in range(len(shape)):
      if e == d:
        dims.append(self.cl.structured("concat", [x.dims[d] for x in xs]))
      else:
        c = xs[0].dims[e]
        for x in xs[1:]:
          c = self.cl.union(c, x.dims[e])
        dims.append(c)
      z.append(all(x.z[e] for x in xs))
    return [_Val(tuple(dims), shape, tuple(z), all(x.allzero for x in xs))]

  def p_pad(self, eqn, xs, *, padding_config, **_):
    x, pv = xs[0], xs[1]
    shape = tuple(eqn.outvars[0].aval.shape)
    dims = []
    for d, (lo, hi, interior) in enumerate(padding_config):
      if (int(lo), int(hi), int(interior)) == (0, 0, 0):
        dims.append(x.dims[d])
      else:
        dims.append(self.cl.new(shape[d]))
        self.refuse(x.dims[d], "is padded by `pad`")
        self.refuse(dims[-1], "is padded by `pad`")
    return [_Val(tuple(dims), shape, tuple(zz and pv.allzero for zz in x.z),
                 x.allzero and pv.allzero)]

  def p_dynamic_slice(self, eqn, xs, *, slice_sizes, **_):
    x = xs[0]
    dims = []
    for d, (n, s) in enumerate(zip(x.shape, slice_sizes, strict=False)):
      if int(s) == n:
        dims.append(x.dims[d])
      else:
        dims.append(self.cl.new(int(s)))
        self.refuse(x.dims[d], "is sliced by `dynamic_slice`")
        self.refuse(dims[-1], "is sliced by `dynamic_slice`")
    shape = tuple(eqn.outvars[0].aval.shape)
    return [_Val(tuple(dims), shape, x.z, x.allzero)]

  def p_dynamic_update_slice(self, eqn, xs, **_):
    x, u = xs[0], xs[1]
    for d, (n, m) in enumerate(zip(x.shape, u.shape, strict=False)):
      if n == m:
        self.cl.union(x.dims[d], u.dims[d])
      else:
        self.refuse(x.dims[d], "is written into by `dynamic_update_slice`")
        self.refuse(u.dims[d], "is written into by `dynamic_update_slice`")
    z = tuple(a and b for a, b in zip(x.z, u.z, strict=False))
    return [_Val(x.dims, x.shape, z, x.allzero and u.allzero)]

  def p_gather(self, eqn, xs, *, dimension_numbers, slice_sizes, **_):
    x, idx = xs[0], xs[1]
    dn = dimension_numbers
    if getattr(dn, "operand_batching_dims", ()) or getattr(dn, "start_indices_batching_dims", ()):
      return self.opaque(eqn, xs)
    shape = tuple(eqn.outvars[0].aval.shape)
    why = "is indexed by `gather` (a lookup or a permutation along it)"
    offset_src = [d for d in range(len(x.shape)) if d not in dn.collapsed_slice_dims]
    for d in range(len(x.shape)):
      indexed = d in dn.collapsed_slice_dims or d in dn.start_index_map
      if indexed or int(slice_sizes[d]) != x.shape[d]:
        self.refuse(x.dims[d], why)
    dims: list = [None] * len(shape)
    z = [x.allzero] * len(shape)
    for o, d in zip(dn.offset_dims, offset_src, strict=False):
      if d in dn.start_index_map or int(slice_sizes[d]) != x.shape[d]:
        dims[o] = self.cl.new(shape[o])
        self.refuse(dims[o], why)
      else:
        dims[o], z[o] = x.dims[d], x.z[d]
    batch_out = [o for o in range(len(shape)) if o not in dn.offset_dims]
    batch_in = list(range(len(idx.shape) - 1))
    for o, i in zip(batch_out, batch_in, strict=False):
      if idx.shape[i] == shape[o]:
        dims[o] = idx.dims[i]
    dims = [self.cl.new(n) if c is None else c for c, n in zip(dims, shape, strict=False)]
    return [_Val(tuple(dims), shape, tuple(z), x.allzero)]

  def _window(self, eqn, xs, window_dimensions, window_strides, padding, base_dilation,
              window_dilation, keep_zero):
    x = xs[0]
    shape = tuple(eqn.outvars[0].aval.shape)
    dims = []
    for d in range(len(x.shape)):
      ident = (int(window_dimensions[d]) == 1 and int(window_strides[d]) == 1
               and tuple(padding[d]) == (0, 0) and int(base_dilation[d]) == 1
               and int(window_dilation[d]) == 1)
      if ident:
        dims.append(x.dims[d])
      else:
        dims.append(self.cl.new(shape[d]))
        self.refuse(x.dims[d], f"is pooled over by `{eqn.primitive.name}`")
        self.refuse(dims[-1], f"is pooled over by `{eqn.primitive.name}`")
    return [_Val(tuple(dims), shape, tuple(keep_zero and zz for zz in x.z),
                 keep_zero and x.allzero)]

  def p_reduce_window_sum(self, eqn, xs, *, window_dimensions, window_strides, padding,
                          base_dilation, window_dilation, **_):
    return self._window(eqn, xs, window_dimensions, window_strides, padding, base_dilation,
                        window_dilation, True)

  p_reduce_window_max = p_reduce_window_min = p_reduce_window_sum

  def p_sort(self, eqn, xs, *, dimension, **_):
    d = int(dimension)
    for e in range(len(xs[0].shape)):
      c = xs[0].dims[e]
      for x in xs[1:]:
        c = self.cl.union(c, x.dims[e])
      if e == d:
        self.refuse(c, "is sorted along by `sort`")
    x = xs[0]
    return [_Val(x.dims, x.shape, (False,) * len(x.shape), False) for _ in eqn.outvars]

  def p_top_k(self, eqn, xs, *, axis=-1, **_):
    x = xs[0]
    axis = int(axis) % len(x.shape)
    self.refuse(x.dims[axis], "is reduced by `top_k`")
    shape = tuple(eqn.outvars[0].aval.shape)
    dims = list(x.dims)
    dims[axis] = self.cl.new(shape[axis])
    self.refuse(dims[axis], "is reduced by `top_k`")
    dims = tuple(dims)
    return [_Val(dims, shape, (False,) * len(shape), False) for _ in eqn.outvars]

  # control flow
  def _loop(self, body, consts, init, xs_inner, cond=None, cond_consts=()):
    """Runs a loop body to a fixed point of the carries' zero facts; unions carry axes."""
    z = [c.z for c in init]
    az = [c.allzero for c in init]
    while True:  # the facts only ever turn False, so this stops
      carry = [c._replace(z=zz, allzero=a, leaf=None)
               for c, zz, a in zip(init, z, az, strict=True)]
      outs = self.run_sub(body, [*consts, *carry, *xs_inner])
      new_z = [tuple(p and q for p, q in zip(zz, o.z, strict=True))
               for zz, o in zip(z, outs, strict=False)]
      new_az = [a and o.allzero for a, o in zip(az, outs, strict=False)]
      if new_z == z and new_az == az:
        break
      z, az = new_z, new_az
    if cond is not None:
      self.run_sub(cond, [*cond_consts, *carry])
    for c, o in zip(init, outs, strict=False):
      for a, b in zip(c.dims, o.dims, strict=False):
        self.cl.union(a, b)
    return carry, outs[len(init):]

  def scan(self, eqn, xs):
    p = eqn.params
    nc, ncar, length = p["num_consts"], p["num_carry"], int(p["length"])
    consts, init, seqs = xs[:nc], xs[nc:nc + ncar], xs[nc + ncar:]
    t = self.cl.new(length)
    self.refuse(t, "is scanned over by `scan` (its length is fixed)")
    inner = []
    for s in seqs:
      self.cl.union(t, s.dims[0])
      inner.append(_Val(s.dims[1:], s.shape[1:], s.z[1:], s.allzero))
    carry, ys = self._loop(p["jaxpr"], consts, init, inner)
    outs = [c._replace() for c in carry]
    for y in ys:
      outs.append(_Val((t, *y.dims), (length, *y.shape), (False, *y.z), y.allzero))
    return outs

  def while_loop(self, eqn, xs):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    carry, _ = self._loop(p["body_jaxpr"], xs[cn:cn + bn], xs[cn + bn:], [],
                          cond=p["cond_jaxpr"], cond_consts=xs[:cn])
    return carry

  def cond(self, eqn, xs):
    outs = None
    for branch in eqn.params["branches"]:
      res = self.run_sub(branch, xs[1:])
      if outs is None:
        outs = res
        continue
      merged = []
      for a, b in zip(outs, res, strict=False):
        dims = tuple(self.cl.union(p, q) for p, q in zip(a.dims, b.dims, strict=False))
        merged.append(_Val(dims, a.shape, tuple(p and q for p, q in zip(a.z, b.z, strict=False)),
                           a.allzero and b.allzero))
      outs = merged
    return [o._replace(leaf=None) for o in outs]


# ----------------------------------------------------------------------------- analysis

@dataclasses.dataclass
class _Analysis:
  paths: list[str]
  leaves: list
  treedef: Any
  groups: tuple[ChannelGroup, ...]


def _leaf_shape(x) -> tuple[int, ...]:
  return tuple(int(s) for s in np.shape(x))


def _same_program(a, b) -> str | None:
  """None if two traces of fn are the same program up to shapes, else what differs."""
  if isinstance(a, jcore.ClosedJaxpr):
    if len(a.consts) != len(b.consts):
      return "it closes over a different number of arrays"
    for x, y in zip(a.consts, b.consts, strict=False):
      if np.shape(x) != np.shape(y):
        return f"it closes over an array whose shape changes ({np.shape(x)} -> {np.shape(y)})"
      try:
        same = np.array_equal(np.asarray(x), np.asarray(y))
      except Exception:
        same = True
      if not same:
        return "it closes over an array whose values change"
    a, b = a.jaxpr, b.jaxpr
  if len(a.eqns) != len(b.eqns):
    return "fn traces to a different program (number of operations changes)"
  for ea, eb in zip(a.eqns, b.eqns, strict=False):
    name = ea.primitive.name
    if name != eb.primitive.name:
      return f"fn traces to a different program (`{name}` becomes `{eb.primitive.name}`)"
    for va, vb in zip(ea.invars, eb.invars, strict=False):
      la, lb = isinstance(va, jcore.Literal), isinstance(vb, jcore.Literal)
      if la != lb:
        return f"fn traces to a different program (an operand of `{name}` changes)"
      if la and not np.array_equal(np.asarray(va.val), np.asarray(vb.val)):
        return (f"fn computes the constant {np.asarray(va.val)} (used by `{name}`) from this "
                f"axis' size; it becomes {np.asarray(vb.val)} when the axis shrinks (e.g. a mean "
                "over channels or a 1/sqrt(head_dim) scale)")
    for k, pa in ea.params.items():
      pb = eb.params.get(k)
      subs_a = pa if isinstance(pa, (tuple, list)) else (pa,)
      subs_b = pb if isinstance(pb, (tuple, list)) else (pb,)
      for sa, sb in zip(subs_a, subs_b, strict=False):
        if isinstance(sa, (jcore.Jaxpr, jcore.ClosedJaxpr)):
          if not isinstance(sb, (jcore.Jaxpr, jcore.ClosedJaxpr)):
            return f"fn traces to a different program (inside `{name}`)"
          diff = _same_program(sa, sb)
          if diff:
            return diff
  return None


def _probe(fn, leaves, treedef, inputs, closed, leaf_axes, atoms) -> str | None:
  """Traces fn with the groups ``atoms`` one channel smaller and compares the programs."""
  small = []
  for li, x in enumerate(leaves):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      small.append(x)
      continue
    shape = list(_leaf_shape(x))
    for ax in range(len(shape)):
      keep = np.ones(shape[ax], bool)
      for atom, idx in leaf_axes[(li, ax)]:
        if atom in atoms:
          keep &= idx != 0
      shape[ax] = int(keep.sum())
    small.append(jax.ShapeDtypeStruct(tuple(shape), x.dtype))
  abstract_inputs = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype) if hasattr(x, "dtype") else x, inputs)
  try:
    other = jax.make_jaxpr(fn)(jax.tree.unflatten(treedef, small), *abstract_inputs)
  except Exception as e:  # noqa: BLE001 - any failure means the axis' size matters
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"fn fails when the group is one channel smaller ({type(e).__name__}: {msg[:200]})"
  return _same_program(closed, other)


def _analyze(fn: Callable, params, inputs, where) -> _Analysis:
  paths, leaves, treedef, chosen = _tree.selected(params, where, require_any=False)
  closed = jax.make_jaxpr(fn)(params, *inputs)
  jaxpr = closed.jaxpr
  if len(jaxpr.invars) != len(leaves) + len(jax.tree.leaves(inputs)):
    raise ValueError("surgery could not match fn's traced arguments to the params leaves.")
  cl = _Classes()
  walker = _Walker(cl)
  ins = []
  for i, v in enumerate(jaxpr.invars):
    shape = getattr(v.aval, "shape", ())
    if i < len(leaves):
      ins.append(walker.fresh(shape, z=chosen[i], leaf=i))
    else:
      val = walker.fresh(shape)
      for c in val.dims:
        cl.mark(c, _INPUT)
      ins.append(val)
  outs = walker.run(jaxpr, [walker.const(c) for c in closed.consts], ins)
  for o in outs:
    for c in o.dims:
      cl.mark(c, _OUTPUT)

  reasons: dict[int, list[str]] = defaultdict(list)
  for c, why in dict.fromkeys((cl.find(c), why) for c, why in cl.marks):
    for atom, _ in cl.expand(c):
      if why not in reasons[atom]:
        reasons[atom].append(why)
  members: dict[int, list] = defaultdict(list)
  leaf_axes: dict[tuple[int, int], list] = {}
  for li in range(len(leaves)):
    for ax, c in enumerate(ins[li].dims):
      leaf_axes[(li, ax)] = cl.expand(c)
      for atom, idx in leaf_axes[(li, ax)]:
        members[atom].append((li, ax, idx))

  order = []
  for atom, mem in members.items():
    def rank(m):
      li, ax, idx = m
      nd = len(ins[li].shape)
      return (0 if nd >= 2 and ax == nd - 1 else 1,
              walker.first_use.get(li, len(leaves) + li), li, ax, int(np.argmax(idx >= 0)))
    best = min(mem, key=rank)
    order.append((rank(best), atom, best))
  order.sort(key=lambda t: t[0])

  info = {}
  for _, atom, _ in order:
    why = list(reasons.get(atom, ()))
    mem = members[atom]
    if cl.n(atom) <= 1:
      why.append(_SINGLE)
    for li, _, _ in mem:
      if not _tree.is_float(leaves[li]):
        why.append(f"includes the non-float leaf '{paths[li]}'")
        break
    if not any(chosen[li] for li, _, _ in mem):
      why.append(_UNMASKED)
    info[atom] = why

  candidates = [atom for _, atom, _ in order if not info[atom]]
  if candidates:
    diff = _probe(fn, leaves, treedef, inputs, closed, leaf_axes, set(candidates))
    if diff is not None:
      for atom in candidates:
        one = _probe(fn, leaves, treedef, inputs, closed, leaf_axes, {atom})
        if one is not None:
          info[atom].append(one)

  groups, names = [], set()
  for _, atom, (li, ax, _) in order:
    name = f"{paths[li]}:{ax}"
    k = 2
    while name in names:
      name, k = f"{paths[li]}:{ax}#{k}", k + 1
    names.add(name)
    why = tuple(info[atom])
    mem = tuple(Member(paths[i], a, np.asarray(idx), bool(chosen[i]))
                for i, a, idx in sorted(members[atom], key=lambda m: (m[0], m[1])))
    groups.append(ChannelGroup(name, cl.n(atom), mem, not why, why, _is_fixed(why)))
  return _Analysis(paths, leaves, treedef, tuple(groups))


# ----------------------------------------------------------------------------- public API

def channel_groups(fn: Callable, params, *inputs, where: _tree.Where | None = None
                   ) -> tuple[ChannelGroup, ...]:
  """The groups of coupled parameter axes of ``fn``, found by tracing it.

  Args:
    fn: a pure function ``fn(params, *inputs)``; deterministic (no dropout). For a Flax NNX
      module use :func:`module_fn`.
    params: the parameter tree (arrays; only shapes and dtypes are read).
    *inputs: example inputs (arrays or ``jax.ShapeDtypeStruct``); their shapes fix the trace.
    where: ``(path, leaf) -> bool`` choosing the leaves masks will apply to (default: floating
      leaves with ``ndim >= 2``). Prunability is proven under the assumption that exactly these
      leaves are masked.

  Returns:
    A tuple of :class:`ChannelGroup`, one per group that has a parameter axis in it, ordered
    as ``fn`` first uses them; ``print`` one to see its members (masked ones starred).

  Raises:
    ValueError: if ``where`` chooses a non-float leaf (naming it).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune import surgery
    >>> params = {"w1": jnp.ones((3, 4)), "b1": jnp.zeros(4), "w2": jnp.ones((4, 2))}
    >>> fn = lambda p, x: jax.nn.relu(x @ p["w1"] + p["b1"][None]) @ p["w2"]
    >>> [(g.name, g.prunable) for g in surgery.channel_groups(fn, params, jnp.ones((5, 3)))]
    [('w1:1', True), ('w2:1', False), ('w1:0', False)]
    >>> print(surgery.channel_groups(fn, params, jnp.ones((5, 3)))[0])
    w1:1 (4 channels, prunable)
        b1 axis 0
      * w1 axis 1
      * w2 axis 0
  """
  return _analyze(fn, params, inputs, where).groups


def _member_table(groups, params):
  paths, leaves, _ = _tree.flatten(params)
  at = {p: i for i, p in enumerate(paths)}
  for g in groups:
    for m in g.members:
      if m.path not in at:
        raise ValueError(f"group '{g.name}' names the leaf '{m.path}', which params lacks; "
                         "pass the params the groups were traced with.")
      if len(m.index) != np.shape(leaves[at[m.path]])[m.axis]:
        raise ValueError(f"leaf '{m.path}' axis {m.axis} has length "
                         f"{np.shape(leaves[at[m.path]])[m.axis]}, but group '{g.name}' was "
                         f"traced with {len(m.index)}.")
  return paths, leaves, at


def _per_position(values: jax.Array, x, m: Member, size: int) -> jax.Array:
  """Sums ``values`` (shaped like leaf ``x``) over all axes but ``m.axis``, then into channels."""
  per_pos = jnp.sum(jnp.moveaxis(values, m.axis, 0).reshape(len(m.index), -1), axis=1)
  valid = np.nonzero(m.index >= 0)[0]
  return jnp.zeros(size, jnp.float32).at[m.index[valid]].add(per_pos[valid])


def group_scores(groups, params, scores=None) -> dict[str, jax.Array]:
  """One score per channel of every prunable group (larger = more important).

  Args:
    groups: from :func:`channel_groups`.
    params: the parameter tree the groups were traced with.
    scores: optional tree like ``params`` of per-weight scores (e.g.
      :func:`jaxprune.magnitude_scores`); a channel's score is then the sum of its masked members'
      scores. Default: the L2 norm of all masked members' weights at the channel.

  Returns:
    ``{group name: float32 array of shape (size,)}``. Jit-able (close over ``groups``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune import surgery
    >>> params = {"w1": jnp.array([[3., 0.], [4., 1.]]), "w2": jnp.ones((2, 1))}
    >>> fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
    >>> groups = surgery.channel_groups(fn, params, jnp.ones((1, 2)))
    >>> surgery.group_scores(groups, params)["w1:1"]
    Array([5.0990195, 1.4142135], dtype=float32)
  """
  paths, leaves, at = _member_table(groups, params)
  score_leaves = None
  if scores is not None:
    _tree.check_same_structure(params, scores, "params", "scores")
    score_leaves = jax.tree.leaves(scores)
  out = {}
  for g in groups:
    if not g.prunable:
      continue
    total = jnp.zeros(g.size, jnp.float32)
    for m in g.members:
      if not m.masked:
        continue
      x = leaves[at[m.path]]
      if score_leaves is None:
        v = jnp.square(jnp.asarray(x, jnp.float32))
      else:
        v = jnp.asarray(score_leaves[at[m.path]], jnp.float32)
        if v.shape != np.shape(x):
          raise ValueError(f"scores for '{m.path}' have shape {v.shape}; the leaf has shape "
                           f"{np.shape(x)}.")
      total = total + _per_position(v, x, m, g.size)
    out[g.name] = jnp.sqrt(total) if score_leaves is None else total
  return out


def group_masks(groups, params, sparsity, *, scores=None, scope: str = "layerwise"):
  """Masks that remove the lowest-scoring channels of every prunable group, in all its members.

  This is ``topk_mask(..., structure=channels())`` extended to coupled groups: each group is
  scored as a unit (:func:`group_scores`) and exactly ``round(s · size)`` of its channels are
  removed (``scope="global"``: ``round(s · N)`` over all groups' channels), ties broken by
  index, via :func:`jaxprune.topk_mask` on the per-group score vectors.

  Args:
    groups: from :func:`channel_groups`.
    params: the parameter tree the groups were traced with.
    sparsity: the fraction of channels to remove: a number, a dict ``{group-name regex: s}``
      (unmatched groups keep all channels), or a callable ``(group name, scores) -> s``.
    scores: optional per-weight scores, see :func:`group_scores`.
    scope: ``"layerwise"`` (per group) or ``"global"``.

  Returns:
    A mask tree like ``params``: a bool array on every leaf a prunable group masks, scalar
    ``True`` elsewhere. Pass it to :func:`shrink` or :func:`jaxprune.apply_masks`.

  Raises:
    ValueError: if no group is prunable, or for a bad sparsity (see :func:`jaxprune.topk_mask`).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune import surgery
    >>> params = {"w1": jnp.array([[3., 0.], [4., 1.]]), "w2": jnp.ones((2, 1))}
    >>> fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
    >>> groups = surgery.channel_groups(fn, params, jnp.ones((1, 2)))
    >>> masks = surgery.group_masks(groups, params, 0.5)
    >>> masks["w1"], masks["w2"]
    (Array([[ True, False],
           [ True, False]], dtype=bool), Array([[ True],
           [False]], dtype=bool))
  """
  paths, leaves, at = _member_table(groups, params)
  if not any(g.prunable for g in groups):
    raise ValueError("no channel group of fn is prunable; see channel_groups(...) for reasons.")
  # One jitted computation, cached per (groups, sparsity, scope): eager top-k over many small
  # vectors costs seconds in dispatch.
  spec = sparsity
  if isinstance(sparsity, dict):
    spec = ("dict", tuple(sparsity.items()))
  elif isinstance(sparsity, (jax.Array, np.ndarray)):
    spec = None
  try:
    hash((groups, spec, scope))
  except TypeError:
    return jax.jit(functools.partial(_group_masks, groups, sparsity, scope))(params, scores)
  groups = tuple(groups)
  return _group_masks_jit(params, scores, sparsity if spec is None else None, groups=groups,
                          spec=spec, scope=scope)


@functools.partial(jax.jit, static_argnames=("groups", "spec", "scope"))
def _group_masks_jit(params, scores, dynamic, *, groups, spec, scope):
  if spec is None:
    sparsity = dynamic
  elif isinstance(spec, tuple) and spec and spec[0] == "dict":
    sparsity = dict(spec[1])
  else:
    sparsity = spec
  return _group_masks(groups, sparsity, scope, params, scores)


def _group_masks(groups, sparsity, scope, params, scores):
  paths, leaves, at = _member_table(groups, params)
  s = group_scores(groups, params, scores)
  keep = masks_lib.topk_mask(s, sparsity, scope=scope, where=lambda p, x: True)
  out: list = [None] * len(leaves)
  for g in groups:
    if not g.prunable:
      continue
    k = keep[g.name]
    for m in g.members:
      if not m.masked:
        continue
      i = at[m.path]
      shape = np.shape(leaves[i])
      pos = jnp.where(jnp.asarray(m.index >= 0), k[np.maximum(m.index, 0)], True)
      pos = pos.reshape([-1 if a == m.axis else 1 for a in range(len(shape))])
      cur = jnp.ones(shape, bool) if out[i] is None else out[i]
      out[i] = cur & pos
  out = [jnp.ones((), bool) if m is None else m for m in out]
  return jax.tree.unflatten(jax.tree.structure(params), out)


def _tolerance(dtype) -> float:
  return 2e-2 if jnp.finfo(dtype).bits <= 16 else 1e-4


def _verify(fn, masked, small, inputs) -> None:
  ref = jax.jit(fn)(masked, *inputs)
  got = jax.jit(fn)(small, *inputs)
  if jax.tree.structure(ref) != jax.tree.structure(got):
    raise ValueError("the shrunk params give fn a different output structure.")
  ref_leaves = jax.tree_util.tree_flatten_with_path(ref)[0]
  for (kp, r), g in zip(ref_leaves, jax.tree.leaves(got), strict=True):
    r, g = np.asarray(r), np.asarray(g)
    if r.shape != g.shape:
      raise ValueError(f"the shrunk model's output '{_tree.path_str(kp)}' has shape {g.shape}, "
                       f"the masked model's {r.shape}.")
    if not jnp.issubdtype(r.dtype, jnp.inexact):
      same = np.array_equal(r, g)
      err = 0.0
    else:
      tol = _tolerance(r.dtype)
      r64, g64 = r.astype(np.float64), g.astype(np.float64)
      scale = max(1.0, float(np.max(np.abs(r64), initial=0.0)))
      err = float(np.max(np.abs(r64 - g64), initial=0.0))
      same = np.allclose(g64, r64, rtol=tol, atol=tol * scale, equal_nan=True)
    if not same:
      raise ValueError(
          f"the shrunk model differs from the masked model on the example inputs (output "
          f"'{_tree.path_str(kp)}', max abs diff {err:.3g}); fn likely depends on a pruned axis "
          "in a way tracing could not see. Please report this with the model.")


def _check_masks(params, masks) -> list:
  """The mask leaves, after checking they fit params (errors name the path)."""
  _tree.check_same_structure(params, masks, "params", "masks")
  paths, leaves, _ = _tree.flatten(params)
  mleaves = jax.tree.leaves(masks)
  for p, x, m in zip(paths, leaves, mleaves, strict=True):
    if getattr(m, "dtype", None) != jnp.bool_ and not isinstance(m, (bool, np.bool_)):
      raise ValueError(f"mask for '{p}' must be bool, got {getattr(m, 'dtype', type(m))}.")
    if np.shape(m) not in ((), np.shape(x)):
      raise ValueError(f"mask for '{p}' has shape {np.shape(m)}; the leaf has shape "
                       f"{np.shape(x)} (a mask is the leaf's shape, or a scalar).")
  return mleaves


def shrink(fn: Callable, params, masks, *inputs, where: _tree.Where | None = None,
           strict: bool = True, verify: bool = True):
  """Smaller params: removes every channel the masks remove from a whole group.

  ``fn(shrink(fn, params, masks, x), x)`` equals ``fn(apply_masks(params, masks), x)`` for
  every ``x`` (to float rounding): a group's channel ``j`` is removed when every member leaf
  chosen by ``where`` has all its entries at ``j`` masked; the removed slices of all members
  (masked or not: biases, BatchNorm statistics) are dropped; weights masked otherwise stay as
  zeros. Not jit-able (it changes shapes); runs on the host once.

  Args:
    fn: a pure, deterministic ``fn(params, *inputs)``.
    params: the parameter tree.
    masks: a mask tree like ``params`` (bool arrays or scalar ``True``), e.g. from
      :func:`group_masks`.
    *inputs: example inputs for tracing (and for the ``verify`` check).
    where: the leaves the masks apply to, as in :func:`channel_groups`.
    strict: raise when a mask removes a channel from only some masked members of a group, or
      from a group tracing refused. If False such channels are kept (their zeros stay).
    verify: check the equality above on ``inputs`` and raise if it fails.

  Returns:
    A tree like ``params`` with smaller arrays.

  Raises:
    ValueError: naming the group, for a partly removed channel or a refused group (with the
      reason), and naming the path, for masks whose tree or shapes do not match params.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune import surgery
    >>> params = {"w1": jnp.ones((3, 4)), "b1": jnp.zeros(4), "w2": jnp.ones((4, 2))}
    >>> fn = lambda p, x: jax.nn.relu(x @ p["w1"] + p["b1"][None]) @ p["w2"]
    >>> x = jnp.ones((5, 3))
    >>> masks = surgery.group_masks(surgery.channel_groups(fn, params, x), params, 0.5)
    >>> small = surgery.shrink(fn, params, masks, x)
    >>> {k: v.shape for k, v in small.items()}
    {'b1': (2,), 'w1': (3, 2), 'w2': (2, 2)}
  """
  mask_leaves = _check_masks(params, masks)
  res = _analyze(fn, params, inputs, where)
  leaves = res.leaves
  at = {p: i for i, p in enumerate(res.paths)}
  keep: dict[int, np.ndarray] = {}
  for gi, g in enumerate(res.groups):
    masked = [m for m in g.members if m.masked]
    if not masked:
      continue
    removed = []
    for m in masked:
      i = at[m.path]
      mk = np.broadcast_to(np.asarray(mask_leaves[i], bool), np.shape(leaves[i]))
      alive = np.moveaxis(mk, m.axis, 0).reshape(len(m.index), -1).any(axis=1)
      alive_ch = np.zeros(g.size, bool)
      valid = m.index >= 0
      np.logical_or.at(alive_ch, m.index[valid], alive[valid])
      removed.append(~alive_ch)
    removed = np.stack(removed)
    everywhere, somewhere = removed.all(axis=0), removed.any(axis=0)
    if not g.prunable:
      if strict and not g.fixed and everywhere.any():
        raise ValueError(f"the masks remove channels {np.nonzero(everywhere)[0][:8].tolist()} "
                         f"of group '{g.name}', which cannot be pruned: it "
                         f"{'; it '.join(g.reasons)}.")
      continue
    partial = somewhere & ~everywhere
    if strict and partial.any():
      j = int(np.nonzero(partial)[0][0])
      gone = [str(m) for m, r in zip(masked, removed, strict=False) if r[j]]
      kept = [str(m) for m, r in zip(masked, removed, strict=False) if not r[j]]
      raise ValueError(
          f"the masks prune group '{g.name}' only partly: channel {j} (and "
          f"{int(partial.sum()) - 1} more) is removed from {gone} but kept in {kept}. A channel "
          "must be removed from every masked member of its group; build masks with "
          "surgery.group_masks, or pass strict=False to keep such channels.")
    if everywhere.any():
      keep[gi] = ~everywhere

  by_axis: dict[tuple[int, int], list] = defaultdict(list)
  for gi, g in enumerate(res.groups):
    if gi in keep:
      for m in g.members:
        by_axis[(at[m.path], m.axis)].append((keep[gi], m.index))
  # what each leaf needs: masking (non-trivial mask) and/or gathers of the kept positions
  todo = {}
  for i, x in enumerate(leaves):
    takes = []
    for ax in range(np.ndim(x)):
      pos = np.ones(np.shape(x)[ax], bool)
      for k, idx in by_axis.get((i, ax), ()):
        valid = idx >= 0
        pos[valid] &= k[idx[valid]]
      if not pos.all():
        takes.append((ax, np.nonzero(pos)[0]))
    m = mask_leaves[i]
    trivial = np.shape(m) == () and bool(np.asarray(m))
    if takes or not trivial:
      todo[i] = (not trivial, takes)
  chosen = sorted(todo)

  def work(xs, ms):  # one compiled program for all leaves, not one per leaf and op
    masked, small = [], []
    for i, x, m in zip(chosen, xs, ms, strict=True):
      needs_mask, takes = todo[i]
      y = jnp.where(m, x, jnp.zeros((), x.dtype)) if needs_mask else x
      masked.append(y)
      for ax, kept in takes:
        y = jnp.take(y, kept, axis=ax)
      small.append(y)
    return masked, small

  masked_sel, small_sel = jax.jit(work)([jnp.asarray(leaves[i]) for i in chosen],
                                        [jnp.asarray(mask_leaves[i]) for i in chosen])
  masked_leaves, out = list(leaves), list(leaves)
  for i, y, z in zip(chosen, masked_sel, small_sel, strict=True):
    masked_leaves[i], out[i] = y, z
  masked_params = jax.tree.unflatten(res.treedef, masked_leaves)
  small = jax.tree.unflatten(res.treedef, out)
  if verify:
    _verify(fn, masked_params, small, inputs)
  return small


# ----------------------------------------------------------------------------- Flax NNX

def _value(v):
  return v.get_value() if hasattr(v, "get_value") else v


def _sync_module_attrs(model) -> None:
  """Updates the size attributes of known NNX layers from their (possibly shrunk) arrays."""
  from flax import nnx

  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.LinearGeneral):
      ks = np.shape(_value(m.kernel))
      nb, ni = len(m.batch_axis), len(m.in_features)
      m.in_features, m.out_features = tuple(ks[nb:nb + ni]), tuple(ks[nb + ni:])
    elif isinstance(m, nnx.Linear):
      m.in_features, m.out_features = np.shape(_value(m.kernel))
    elif isinstance(m, nnx.Conv):
      ks = np.shape(_value(m.kernel))
      m.in_features, m.out_features = ks[-2] * m.feature_group_count, ks[-1]
    elif isinstance(m, nnx.Embed):
      m.num_embeddings, m.features = np.shape(_value(m.embedding))
    elif isinstance(m, nnx.MultiHeadAttention):
      qin, heads, head_dim = np.shape(_value(m.query.kernel))
      m.in_features, m.num_heads, m.head_dim = qin, heads, head_dim
      m.qkv_features = heads * head_dim
      m.in_kv_features, m.num_kv_heads = np.shape(_value(m.key.kernel))[:2]
      m.out_features = np.shape(_value(m.out.kernel))[-1]
    elif isinstance(m, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)):
      for attr in ("scale", "bias", "mean"):
        v = getattr(m, attr, None)
        if isinstance(v, nnx.Variable):
          m.num_features = np.shape(_value(v))[-1]
          break
    elif hasattr(m, "hidden_features") and hasattr(m, "in_features"):
      rec = getattr(m, "dense_h", getattr(m, "hi", None))
      inp = getattr(m, "dense_i", getattr(m, "ii", None))
      if isinstance(rec, nnx.Linear) and isinstance(inp, nnx.Linear):
        m.hidden_features = np.shape(_value(rec.kernel))[0]
        m.in_features = np.shape(_value(inp.kernel))[0]


def module_fn(model):
  """A pure function of an NNX module's full state, for :func:`channel_groups` and friends.

  The function merges the module from its state and updates the size attributes of known
  layers (``Linear``, ``LinearGeneral``, ``Conv``, ``Embed``, norms, ``MultiHeadAttention``,
  GRU/LSTM/simple cells) from the arrays' shapes, so that it also runs on shrunk states.

  Args:
    model: a ``flax.nnx.Module`` (deterministic: dropout off, BatchNorm as you want it traced).

  Returns:
    ``(fn, state)`` with ``fn(state, *inputs) == model(*inputs)`` and ``state = nnx.state(model)``
    (params, batch statistics, RNG state: everything, so BatchNorm statistics shrink too).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune import surgery
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> fn, state = surgery.module_fn(model)
    >>> [g.name for g in surgery.channel_groups(fn, state, jnp.ones((1, 3))) if g.prunable]
    ['layers/0/kernel:1']
  """
  from flax import nnx

  graphdef, state = nnx.split(model)

  def fn(state, *inputs):
    m = nnx.merge(graphdef, state)
    _sync_module_attrs(m)
    return m(*inputs)

  return fn, state


def shrink_module(model, masks, *inputs, where: _tree.Where | None = None, strict: bool = True,
                  verify: bool = True):
  """A new NNX module of the same class holding the smaller arrays :func:`shrink` computes.

  Args:
    model: a ``flax.nnx.Module``; left unchanged.
    masks: a mask tree for ``nnx.state(model)`` (e.g. :func:`group_masks` on
      ``module_fn(model)[1]``) or for a part of it such as ``nnx.state(model, nnx.Param)``;
      leaves are matched by path, and leaves without a mask are kept (scalar ``True``).
    *inputs: example inputs for tracing and verification.
    where: the leaves the masks apply to (default: floating, ``ndim >= 2`` leaves that
      ``masks`` has).
    strict, verify: as in :func:`shrink`.

  Returns:
    A new module whose output equals the masked ``model``'s; size attributes of known layers
    (``Linear.out_features``, ``BatchNorm.num_features``, ``MultiHeadAttention.num_heads``, ...)
    describe the new shapes.

  Raises:
    ValueError: as :func:`shrink`, or naming a mask path the model does not have.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune import surgery
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> x = jnp.ones((1, 3))
    >>> fn, state = surgery.module_fn(model)
    >>> masks = surgery.group_masks(surgery.channel_groups(fn, state, x), state, 0.5)
    >>> small = surgery.shrink_module(model, masks, x)
    >>> small.layers[0].out_features, small.layers[2].kernel.shape
    (2, (2, 2))
  """
  from flax import nnx

  fn, state = module_fn(model)
  paths, leaves, treedef = _tree.flatten(state)
  mpaths, mleaves, _ = _tree.flatten(masks)
  given = dict(zip(mpaths, mleaves, strict=False))
  unknown = sorted(set(given) - set(paths))
  if unknown:
    raise ValueError(f"masks name leaves the model does not have: {unknown[:5]} (model paths: "
                     f"{paths[:8]}{', ...' if len(paths) > 8 else ''}).")
  full = jax.tree.unflatten(treedef, [given.get(p, True) for p in paths])
  if where is None:
    where = lambda p, x: p in given and _tree.default_where(p, x)
  small = shrink(fn, state, full, *inputs, where=where, strict=strict, verify=verify)
  new = nnx.merge(nnx.graphdef(model), small)
  _sync_module_attrs(new)
  return new
