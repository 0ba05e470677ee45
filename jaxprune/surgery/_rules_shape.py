"""Surgery rules for layout and indexing: broadcasts, reshapes, transposes, slices, concatenation,
padding, dynamic slices and gathers. See ``_rules.py`` for what a rule must do.

An axis that is cut into parts (``slice``, ``split``, ``concatenate``) becomes a "concat" class
of its parts, and an axis that a ``reshape`` splits or merges a "product" class, so that e.g. a
GRU's gate slices or attention's ``heads * head_dim`` keep the right channels together.
"""
from __future__ import annotations

import numpy as np
from jax import lax

from jaxprune.surgery._interp import Val, register


@register(lax.broadcast_in_dim_p)
def _broadcast_in_dim(w, eqn, xs, *, shape, broadcast_dimensions, **_):
  x = xs[0]
  dims: list = [None] * len(shape)
  z = [x.allzero] * len(shape)
  for i, d in enumerate(broadcast_dimensions):
    if x.shape[i] == shape[d]:
      dims[d], z[d] = x.dims[i], x.z[i]
  dims = [w.cl.new(n) if c is None else c for c, n in zip(dims, shape, strict=False)]
  return [Val(tuple(dims), tuple(shape), tuple(z), x.allzero)]


@register(lax.reshape_p)
def _reshape(w, eqn, xs, *, new_sizes, dimensions=None, **_):
  x = xs[0]
  new_sizes = tuple(int(s) for s in new_sizes)
  if dimensions is not None:
    return w.opaque(eqn, xs)
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
        return w.opaque(eqn, xs)
    zin = all(x.z[i] for i in ia)
    if len(ia) == 1 and len(ob) == 1:
      dims[ob[0]] = x.dims[ia[0]]
    elif len(ia) == 1:  # split one axis into several
      parts = [w.cl.new(new_sizes[j]) for j in ob]
      w.cl.union(x.dims[ia[0]], w.cl.structured("product", parts))
      for j, p in zip(ob, parts, strict=False):
        dims[j] = p
    elif len(ob) == 1:  # merge several axes into one
      dims[ob[0]] = w.cl.structured("product", [x.dims[i] for i in ia])
    else:
      for i in ia:
        w.refuse(x.dims[i], f"is reshaped across ({x.shape} -> {new_sizes})")
      for j in ob:
        dims[j] = w.cl.new(new_sizes[j])
        w.refuse(dims[j], f"is reshaped across ({x.shape} -> {new_sizes})")
    for j in ob:
      z[j] = zin
  if a != len(old) or b != len(new):
    return w.opaque(eqn, xs)
  dims = [w.cl.new(n) if c is None else c for c, n in zip(dims, new_sizes, strict=False)]
  return [Val(tuple(dims), new_sizes, tuple(z), x.allzero)]


@register(lax.transpose_p)
def _transpose(w, eqn, xs, *, permutation, **_):
  x = xs[0]
  return [Val(tuple(x.dims[p] for p in permutation), tuple(x.shape[p] for p in permutation),
              tuple(x.z[p] for p in permutation), x.allzero)]


@register(lax.squeeze_p)
def _squeeze(w, eqn, xs, *, dimensions, **_):
  x = xs[0]
  drop = {d % len(x.shape) for d in dimensions}
  keep = [d for d in range(len(x.shape)) if d not in drop]
  return [Val(tuple(x.dims[d] for d in keep), tuple(x.shape[d] for d in keep),
              tuple(x.z[d] for d in keep), x.allzero)]


@register(lax.rev_p)
def _rev(w, eqn, xs, *, dimensions, **_):
  x = xs[0]
  for d in dimensions:
    w.refuse(x.dims[d], "is reversed by `rev`")
  return [x._replace(leaf=None)]


def _part(w, x, d, start, stop) -> int:
  segs = w.cl.segments(x.dims[d], [start, stop])
  if segs is None:
    w.refuse(x.dims[d], "is sliced inside a reshaped axis")
    return w.cl.new(stop - start)
  return w.cl.structured("concat", [p for s, e, p in segs if start <= s and e <= stop])


@register(lax.slice_p)
def _slice(w, eqn, xs, *, start_indices, limit_indices, strides=None, **_):
  x = xs[0]
  dims = []
  for d, n in enumerate(x.shape):
    s, e = int(start_indices[d]), int(limit_indices[d])
    st = 1 if strides is None else int(strides[d])
    if s == 0 and e == n and st == 1:
      dims.append(x.dims[d])
    elif st != 1:
      dims.append(w.cl.new(len(range(s, e, st))))
      w.refuse(x.dims[d], "is sliced with a stride")
      w.refuse(dims[-1], "is sliced with a stride")
    else:
      dims.append(_part(w, x, d, s, e))
  shape = tuple(getattr(eqn.outvars[0].aval, "shape", ()))
  return [Val(tuple(dims), shape, x.z, x.allzero)]


@register(lax.split_p)
def _split(w, eqn, xs, *, sizes, axis, **_):
  x = xs[0]
  axis = int(axis) % len(x.shape)
  bounds = np.cumsum([0, *[int(s) for s in sizes]])
  outs = []
  for s, e, v in zip(bounds, bounds[1:], eqn.outvars, strict=False):
    dims = list(x.dims)
    dims[axis] = _part(w, x, axis, int(s), int(e))
    outs.append(Val(tuple(dims), tuple(v.aval.shape), x.z, x.allzero))
  return outs


@register(lax.concatenate_p)
def _concatenate(w, eqn, xs, *, dimension, **_):
  d = int(dimension)
  shape = tuple(eqn.outvars[0].aval.shape)
  dims, z = [], []
  for e in range(len(shape)):
    if e == d:
      dims.append(w.cl.structured("concat", [x.dims[d] for x in xs]))
    else:
      c = xs[0].dims[e]
      for x in xs[1:]:
        c = w.cl.union(c, x.dims[e])
      dims.append(c)
    z.append(all(x.z[e] for x in xs))
  return [Val(tuple(dims), shape, tuple(z), all(x.allzero for x in xs))]


@register(lax.pad_p)
def _pad(w, eqn, xs, *, padding_config, **_):
  x, pv = xs[0], xs[1]
  shape = tuple(eqn.outvars[0].aval.shape)
  dims = []
  for d, (lo, hi, interior) in enumerate(padding_config):
    if (int(lo), int(hi), int(interior)) == (0, 0, 0):
      dims.append(x.dims[d])
    else:
      dims.append(w.cl.new(shape[d]))
      w.refuse(x.dims[d], "is padded by `pad`")
      w.refuse(dims[-1], "is padded by `pad`")
  return [Val(tuple(dims), shape, tuple(zz and pv.allzero for zz in x.z),
              x.allzero and pv.allzero)]


@register(lax.dynamic_slice_p)
def _dynamic_slice(w, eqn, xs, *, slice_sizes, **_):
  x = xs[0]
  dims = []
  for d, (n, s) in enumerate(zip(x.shape, slice_sizes, strict=False)):
    if int(s) == n:
      dims.append(x.dims[d])
    else:
      dims.append(w.cl.new(int(s)))
      w.refuse(x.dims[d], "is sliced by `dynamic_slice`")
      w.refuse(dims[-1], "is sliced by `dynamic_slice`")
  shape = tuple(eqn.outvars[0].aval.shape)
  return [Val(tuple(dims), shape, x.z, x.allzero)]


@register(lax.dynamic_update_slice_p)
def _dynamic_update_slice(w, eqn, xs, **_):
  x, u = xs[0], xs[1]
  for d, (n, m) in enumerate(zip(x.shape, u.shape, strict=False)):
    if n == m:
      w.cl.union(x.dims[d], u.dims[d])
    else:
      w.refuse(x.dims[d], "is written into by `dynamic_update_slice`")
      w.refuse(u.dims[d], "is written into by `dynamic_update_slice`")
  z = tuple(a and b for a, b in zip(x.z, u.z, strict=False))
  return [Val(x.dims, x.shape, z, x.allzero and u.allzero)]


@register(lax.gather_p)
def _gather(w, eqn, xs, *, dimension_numbers, slice_sizes, **_):
  x, idx = xs[0], xs[1]
  dn = dimension_numbers
  if getattr(dn, "operand_batching_dims", ()) or getattr(dn, "start_indices_batching_dims", ()):
    return w.opaque(eqn, xs)
  shape = tuple(eqn.outvars[0].aval.shape)
  why = "is indexed by `gather` (a lookup or a permutation along it)"
  offset_src = [d for d in range(len(x.shape)) if d not in dn.collapsed_slice_dims]
  for d in range(len(x.shape)):
    indexed = d in dn.collapsed_slice_dims or d in dn.start_index_map
    if indexed or int(slice_sizes[d]) != x.shape[d]:
      w.refuse(x.dims[d], why)
  dims: list = [None] * len(shape)
  z = [x.allzero] * len(shape)
  for o, d in zip(dn.offset_dims, offset_src, strict=False):
    if d in dn.start_index_map or int(slice_sizes[d]) != x.shape[d]:
      dims[o] = w.cl.new(shape[o])
      w.refuse(dims[o], why)
    else:
      dims[o], z[o] = x.dims[d], x.z[d]
  batch_out = [o for o in range(len(shape)) if o not in dn.offset_dims]
  batch_in = list(range(len(idx.shape) - 1))
  for o, i in zip(batch_out, batch_in, strict=False):
    if idx.shape[i] == shape[o]:
      dims[o] = idx.dims[i]
  dims = [w.cl.new(n) if c is None else c for c, n in zip(dims, shape, strict=False)]
  return [Val(tuple(dims), shape, tuple(z), x.allzero)]
