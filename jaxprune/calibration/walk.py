"""The jaxpr walk behind :func:`jaxprune.calibrate`: evaluate ``fn(params, batch)`` equation by
equation and, at every kernel contraction, add ``xᵀx`` of the input to that kernel's statistics.

The walk runs the :mod:`jaxprune._jaxpr` interpreter on traced values inside ``jax.jit``, so one
compiled program computes all Gram matrices of a batch. A value is either an array or a
:class:`View`: an array that is a view of a prunable parameter leaf. Views survive the
operations that only relabel a leaf (``transpose``, dtype conversion, copies, sharding
constraints, call boundaries such as ``jit``, ``custom_jvp``/``custom_vjp`` and ``remat``) and
the ones that take one layer of a stacked leaf (an integer index: ``slice`` or ``dynamic_slice``
of size 1 followed by ``squeeze``, and each iteration of a ``scan`` over the leaf, which the walk
unrolls). Any other operation turns a view into a plain array. At a ``dot_general`` or
``conv_general_dilated`` with a view as one operand, the other operand's contraction axes are
the kernel's input features: its rows are flattened to ``(rows, n_in)`` (for a convolution, the
patches of each output position) and ``xᵀx`` is added, to the slice of the layer index for a
stacked leaf. Kernels read only inside ``while`` loops or ``cond`` branches are not calibrated.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import primitives as prims

from jaxprune import _jaxpr
from jaxprune.calibration.stats import LeafLayout

_HI = lax.Precision.HIGHEST


class View(NamedTuple):
  """An array that is a view of prunable leaf ``leaf``.

  ``axes[k]`` is ``(leaf_axis, index)`` for axis ``k`` of ``value``: the whole leaf axis
  (``index`` None) or a single index of it (a size-1 slice). ``fixed`` holds the leaf axes
  already indexed away, as ``(leaf_axis, index)`` pairs (index a Python int or a traced int).
  """
  value: jax.Array
  leaf: int
  axes: tuple
  fixed: tuple = ()


def _arr(v):
  return v.value if isinstance(v, View) else v


class Walker(_jaxpr.Interpreter):
  """Collects ``{leaf index: [gram, count, layout]}`` while evaluating."""

  def __init__(self, paths, shapes):
    super().__init__(_RULES, default=_plain)
    self.paths, self.shapes = paths, shapes
    self.stats: dict[int, list] = {}

  def record(self, view: View, x: jax.Array, x_in: tuple[int, ...], w_in: tuple[int, ...]):
    """Adds ``xᵀx`` of ``x`` (input features on its axes ``x_in``, matching the view's axes
    ``w_in``) to the statistics of ``view.leaf``."""
    path, shape = self.paths[view.leaf], self.shapes[view.leaf]
    fixed = list(view.fixed) + [(a, i) for a, i in view.axes if i is not None]
    if len(fixed) > 1:
      return  # more than one axis indexed away: not a layer of a stacked leaf; not handled
    leaf_axes = [view.axes[k][0] for k in w_in]
    order = np.argsort(leaf_axes)
    in_axes = tuple(int(leaf_axes[j]) for j in order)
    x_in = tuple(x_in[j] for j in order)
    free = tuple(k for k in range(x.ndim) if k not in x_in)
    n_in = math.prod(x.shape[k] for k in x_in)
    x = x.astype(jnp.float32)
    # Contract the rows of x with themselves (no reshape of possibly sharded row axes); the
    # result is replicated: one reduction over the batch shards.
    gram = lax.dot_general(x, x, ((free, free), ((), ())), precision=_HI,
                           out_sharding=_replicated(x))
    gram = jnp.transpose(gram, np.argsort(np.argsort(x_in)).tolist()
                         + (len(x_in) + np.argsort(np.argsort(x_in))).tolist())
    gram = gram.reshape(n_in, n_in)
    count = jnp.asarray(math.prod(x.shape[k] for k in free), jnp.int32)
    stack_axis, index = fixed[0] if fixed else (None, None)
    layout = LeafLayout(tuple(shape), in_axes, stack_axis)
    entry = self.stats.get(view.leaf)
    if entry is not None and entry[2] != layout:
      raise ValueError(f"calibrate: leaf '{path}' is contracted in two different ways "
                       f"({entry[2]} and {layout}); exclude it with `where`.")
    if entry is None:
      lead = () if stack_axis is None else (shape[stack_axis],)
      entry = [jnp.zeros(lead + (n_in, n_in), jnp.float32), jnp.zeros(lead, jnp.int32), layout]
      self.stats[view.leaf] = entry
    if stack_axis is None:
      entry[0], entry[1] = entry[0] + gram, entry[1] + count
    else:
      entry[0] = entry[0].at[index].add(gram)
      entry[1] = entry[1].at[index].add(count)


def _replicated(x):
  """A replicated sharding on ``x``'s mesh when jit sees its sharding (Explicit axes), else None
  (XLA chooses)."""
  sharding = jax.typeof(x).sharding
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or not any(getattr(sharding, "spec", ()) or ()):
    return None
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _plain(interp, eqn, vals):
  return _jaxpr.bind(eqn, [_arr(v) for v in vals])


def _same_axes(interp, eqn, vals):
  out = _plain(interp, eqn, vals)
  v = vals[0]
  if isinstance(v, View) and len(out) == 1 and out[0].shape == v.value.shape:
    return [v._replace(value=out[0])]
  return out


def _transpose(interp, eqn, vals):
  out = _plain(interp, eqn, vals)
  v = vals[0]
  if isinstance(v, View):
    return [v._replace(value=out[0], axes=tuple(v.axes[p] for p in eqn.params["permutation"]))]
  return out


def _squeeze(interp, eqn, vals):
  out = _plain(interp, eqn, vals)
  v = vals[0]
  if not isinstance(v, View):
    return out
  dims = set(eqn.params["dimensions"])
  fixed = list(v.fixed)
  for k in sorted(dims):
    a, i = v.axes[k]
    fixed.append((a, 0 if i is None else i))
  axes = tuple(ax for k, ax in enumerate(v.axes) if k not in dims)
  return [View(out[0], v.leaf, axes, tuple(fixed))]


def _sliced_axes(v: View, starts, sizes):
  """The view's axes after taking ``sizes`` from ``starts``: None unless every axis is kept
  whole or cut to one index of an axis that is still whole."""
  axes = []
  for k, ((a, i), start, size) in enumerate(zip(v.axes, starts, sizes)):
    full = v.value.shape[k]
    if size == full:
      axes.append((a, i))
    elif size == 1 and i is None:
      axes.append((a, start))
    else:
      return None
  return tuple(axes)


def _slice(interp, eqn, vals):
  out = _plain(interp, eqn, vals)
  v = vals[0]
  if not isinstance(v, View) or eqn.params.get("strides") not in (None, (1,) * v.value.ndim):
    return out
  starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
  axes = _sliced_axes(v, starts, [b - a for a, b in zip(starts, limits)])
  return out if axes is None else [View(out[0], v.leaf, axes, v.fixed)]


def _dynamic_slice(interp, eqn, vals):
  out = _plain(interp, eqn, vals)
  v = vals[0]
  if not isinstance(v, View):
    return out
  sizes = eqn.params["slice_sizes"]
  # dynamic_slice clamps starts so the slice fits; an index of a size-1 slice is in range.
  starts = [jnp.clip(_arr(s), 0, n - z) for s, n, z in zip(vals[1:], v.value.shape, sizes)]
  axes = _sliced_axes(v, starts, sizes)
  return out if axes is None else [View(out[0], v.leaf, axes, v.fixed)]


def _scan_index(x, i):
  if isinstance(x, View):
    (a, j), rest = x.axes[0], x.axes[1:]
    return View(x.value[i], x.leaf, rest, x.fixed + ((a, i if j is None else j),))
  return x[i]


def _scan_stack(ys, aval):
  if not ys:
    return jnp.zeros(aval.shape, aval.dtype)
  return jnp.stack([_arr(y) for y in ys])


def _scan(interp, eqn, vals):
  if not any(isinstance(v, View) for v in vals):
    return _plain(interp, eqn, vals)
  return _jaxpr.unroll_scan(interp, eqn, vals, index=_scan_index, stack=_scan_stack)


def _dot_general(interp, eqn, vals):
  out = _plain(interp, eqn, vals)
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs = vals
  if isinstance(rhs, View) and not isinstance(lhs, View) and not rb:
    interp.record(rhs, lhs, tuple(lc), tuple(rc))
  elif isinstance(lhs, View) and not isinstance(rhs, View) and not lb:
    interp.record(lhs, rhs, tuple(rc), tuple(lc))
  return out


def _conv(interp, eqn, vals):
  out = _plain(interp, eqn, vals)
  lhs, rhs = vals
  p = eqn.params
  if (not isinstance(rhs, View) or isinstance(lhs, View) or p["feature_group_count"] != 1
      or p["batch_group_count"] != 1):
    return out
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  window = tuple(rhs.value.shape[d] for d in rhs_spec[2:])
  patches = lax.conv_general_dilated_patches(
      lhs, window, p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"],
      dn, precision=_HI, preferred_element_type=jnp.float32)
  # patches: the output's layout, its feature axis ordered (in channel, *window).
  c_in = lhs.shape[lhs_spec[1]]
  feat = out_spec[1]
  moved = jnp.moveaxis(patches, feat, -1)
  moved = moved.reshape(moved.shape[:-1] + (c_in,) + window)
  base = moved.ndim - 1 - len(window)
  x_in = tuple(range(base, moved.ndim))          # (in channel, *window) axes of `moved`
  w_in = (rhs_spec[1],) + tuple(rhs_spec[2:])    # the matching axes of the kernel view
  interp.record(rhs, moved, x_in, w_in)
  return out


_RULES = {
    lax.dot_general_p: _dot_general,
    lax.conv_general_dilated_p: _conv,
    lax.transpose_p: _transpose,
    lax.convert_element_type_p: _same_axes,
    lax.reduce_precision_p: _same_axes,
    lax.squeeze_p: _squeeze,
    lax.slice_p: _slice,
    lax.dynamic_slice_p: _dynamic_slice,
    lax.scan_p: _scan,
}
for _prim in (prims.copy_p, prims.sharding_constraint_p):
  _RULES[_prim] = _same_axes
