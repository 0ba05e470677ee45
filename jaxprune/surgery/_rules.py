"""Surgery rules for arithmetic: elementwise ops, reductions, contractions, windows, sorting.

A rule is ``rule(w, eqn, xs, **eqn.params) -> [Val per outvar]`` (``w``: the
:class:`~jaxprune.surgery._interp.Walker`), registered for primitive objects with
:func:`~jaxprune.surgery._interp.register`. It must union the classes (``w.cl``) of axes that
must keep the same channels, refuse (``w.refuse``) axes whose channels cannot be removed safely,
and say per output axis whether it is exactly zero at the pruned channels (``Val.z``).
"""
from __future__ import annotations

import importlib

from jax import lax
from jax.extend.core import primitives as prims

from jaxprune.surgery._interp import Val, register
from jaxprune.surgery._types import WINDOW


def _private(module: str, name: str):
  """A primitive jax does not export (``None`` if this jax version lacks it)."""
  try:
    return getattr(importlib.import_module(module), name, None)
  except ImportError:
    return None


# ----------------------------------------------------------------------------- elementwise
# how "exactly zero at the pruned channels" passes through: per axis, from the operands' facts

def _any(zs):
  return any(zs)


def _all(zs):
  return all(zs)


def _first(zs):
  return zs[0]


def _none(zs):
  del zs
  return False


_ZERO_KEEPING_UNARY = (
    lax.neg_p, lax.abs_p, lax.sign_p, lax.floor_p, lax.ceil_p, lax.round_p, lax.sin_p, lax.tan_p,
    lax.tanh_p, lax.asin_p, lax.atan_p, lax.sinh_p, lax.asinh_p, lax.atanh_p, lax.sqrt_p,
    lax.cbrt_p, lax.expm1_p, lax.log1p_p, lax.erf_p, lax.erf_inv_p, lax.real_p, lax.imag_p,
    lax.conj_p, lax.convert_element_type_p, lax.reduce_precision_p, lax.copy_p,
    lax.stop_gradient_p, lax.square_p, lax.population_count_p, lax.sharding_constraint_p,
    _private("jax._src.pjit", "reshard_p"), _private("jax._src.core", "pvary_p"))
_OTHER_UNARY = (
    lax.exp_p, lax.exp2_p, lax.log_p, lax.logistic_p, lax.cos_p, lax.acos_p, lax.acosh_p,
    lax.cosh_p, lax.rsqrt_p, lax.is_finite_p, lax.not_p, lax.lgamma_p, lax.digamma_p, lax.erfc_p,
    lax.clz_p, lax.bessel_i0e_p, lax.bessel_i1e_p)
_BINARY = {
    _any: (lax.mul_p, lax.and_p),
    _all: (lax.add_p, lax.sub_p, lax.max_p, lax.min_p, prims.add_jaxvals_p, lax.or_p, lax.xor_p),
    _first: (lax.div_p, lax.rem_p, lax.shift_left_p, lax.shift_right_arithmetic_p,
             lax.shift_right_logical_p),
    _none: (lax.pow_p, lax.atan2_p, lax.nextafter_p, lax.eq_p, lax.ne_p, lax.lt_p, lax.le_p,
            lax.gt_p, lax.ge_p, lax.igamma_p, lax.igammac_p, lax.polygamma_p, lax.zeta_p),
}


def _zero_rule(combine):
  """The rule of an elementwise primitive whose operands' zero facts ``combine`` so."""
  def elementwise(w, eqn, xs, **_):
    return w.elementwise(eqn, xs, combine)
  return elementwise


register(*_ZERO_KEEPING_UNARY)(_zero_rule(_first))
register(*_OTHER_UNARY)(_zero_rule(_none))
for _combine, _primitives in _BINARY.items():
  register(*_primitives)(_zero_rule(_combine))


@register(lax.integer_pow_p)
def _integer_pow(w, eqn, xs, *, y, **_):
  return w.elementwise(eqn, xs, _first if y > 0 else _none)


@register(lax.select_n_p)
def _select_n(w, eqn, xs, **_):
  return w.elementwise(eqn, xs, lambda zs: all(zs[1:]))


@register(lax.clamp_p)
def _clamp(w, eqn, xs, **_):
  lo, hi = xs[0].value, xs[2].value
  ok = lo is not None and hi is not None and lo <= 0 <= hi
  return w.elementwise(eqn, xs, lambda zs: ok and zs[1])


# values that come from nowhere in params: fresh classes
@register(lax.iota_p, prims.random_bits_p, prims.random_seed_p, prims.random_fold_in_p,
          prims.random_split_p, prims.threefry2x32_p, lax.rng_bit_generator_p, lax.rng_uniform_p,
          _private("jax._src.random.prng", "random_wrap_p"),
          _private("jax._src.random.prng", "random_unwrap_p"))
def _source(w, eqn, xs, **_):
  return [w.from_aval(v) for v in eqn.outvars]


@register(lax.optimization_barrier_p, prims.device_put_p)
def _pass_through(w, eqn, xs, **_):
  return list(xs[:len(eqn.outvars)])


# ----------------------------------------------------------------------------- reductions

def _reduce(w, eqn, xs, axes, summed: bool, keep_zero: bool):
  x = xs[0]
  name = eqn.primitive.name
  axes = {int(a) % max(len(x.shape), 1) for a in axes}
  for a in axes:
    if summed:
      if not x.z[a]:
        w.refuse(x.dims[a], f"is summed over by `{name}` while its pruned channels are not "
                 "exactly zero in the masked model (e.g. a mean or LayerNorm over channels)")
    else:
      w.refuse(x.dims[a], f"is reduced over by `{name}`, whose result changes when "
               "channels are removed")
  keep = [d for d in range(len(x.shape)) if d not in axes]
  shape = tuple(getattr(eqn.outvars[0].aval, "shape", ()))
  return [Val(tuple(x.dims[d] for d in keep), shape,
              tuple(keep_zero and x.z[d] for d in keep), keep_zero and x.allzero)]


@register(lax.reduce_sum_p)
def _reduce_sum(w, eqn, xs, *, axes, **_):
  return _reduce(w, eqn, xs, axes, True, True)


@register(lax.reduce_max_p, lax.reduce_min_p, lax.reduce_prod_p)
def _reduce_extreme(w, eqn, xs, *, axes, **_):
  return _reduce(w, eqn, xs, axes, False, True)


@register(lax.reduce_and_p, lax.reduce_or_p, lax.reduce_xor_p, lax.argmax_p, lax.argmin_p)
def _reduce_other(w, eqn, xs, *, axes, **_):
  return _reduce(w, eqn, xs, axes, False, False)


def _cumulative(w, eqn, xs, axis, summed: bool):
  x = xs[0]
  axis = int(axis) % len(x.shape)
  if not (summed and x.z[axis]):
    w.refuse(x.dims[axis], f"is accumulated along by `{eqn.primitive.name}`")
  return [x._replace(leaf=None, z=tuple(summed and zz for zz in x.z))]


@register(lax.cumsum_p)
def _cumsum(w, eqn, xs, *, axis, **_):
  return _cumulative(w, eqn, xs, axis, True)


@register(lax.cumprod_p, lax.cummax_p, lax.cummin_p, lax.cumlogsumexp_p)
def _cumulative_other(w, eqn, xs, *, axis, **_):
  return _cumulative(w, eqn, xs, axis, False)


# ----------------------------------------------------------------------------- contractions

@register(lax.dot_general_p)
def _dot_general(w, eqn, xs, *, dimension_numbers, **_):
  lhs, rhs = xs[0], xs[1]
  (lc, rc), (lb, rb) = dimension_numbers
  for a, b in zip(lc, rc, strict=False):
    c = w.cl.union(lhs.dims[a], rhs.dims[b])
    if not (lhs.z[a] or rhs.z[b]):
      w.refuse(c, "is summed over by `dot_general` while neither operand is exactly zero "
               "at its pruned channels in the masked model (no masked weight there)")
  dims, z = [], []
  for a, b in zip(lb, rb, strict=False):
    dims.append(w.cl.union(lhs.dims[a], rhs.dims[b]))
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
  return [Val(tuple(dims), shape, tuple(z), lhs.allzero or rhs.allzero)]


@register(lax.conv_general_dilated_p)
def _conv_general_dilated(w, eqn, xs, *, dimension_numbers, feature_group_count,
                          batch_group_count, **_):
  lhs, rhs = xs[0], xs[1]
  if batch_group_count != 1 or dimension_numbers is None:
    return w.opaque(eqn, xs)
  ls, rs, os_ = dimension_numbers
  shape = tuple(eqn.outvars[0].aval.shape)
  groups = int(feature_group_count)
  window = WINDOW
  for d in ls[2:]:
    w.refuse(lhs.dims[d], window)
  for d in rs[2:]:
    w.refuse(rhs.dims[d], window)
  lf, ri, ro = ls[1], rs[1], rs[0]
  if groups == 1:
    contracted = w.cl.union(lhs.dims[lf], rhs.dims[ri])
  else:
    g = w.cl.new(groups)
    contracted = rhs.dims[ri]
    w.cl.union(lhs.dims[lf], w.cl.structured("product", [g, contracted]))
    w.cl.union(rhs.dims[ro],
               w.cl.structured("product", [g, w.cl.new(rhs.shape[ro] // groups)]))
  if not (lhs.z[lf] or rhs.z[ri]):
    w.refuse(contracted, "is summed over by `conv_general_dilated` while neither operand is "
             "exactly zero at its pruned channels in the masked model")
  dims: list = [None] * len(shape)
  z = [lhs.allzero or rhs.allzero] * len(shape)
  dims[os_[0]] = lhs.dims[ls[0]]
  z[os_[0]] = lhs.z[ls[0]] or rhs.allzero
  dims[os_[1]] = rhs.dims[ro]
  depthwise = groups > 1 and rhs.shape[ro] == groups  # output channel c reads input c only
  z[os_[1]] = rhs.z[ro] or lhs.allzero or (depthwise and lhs.z[lf])
  for d in os_[2:]:
    dims[d] = w.cl.new(shape[d])
    w.refuse(dims[d], window)
  return [Val(tuple(dims), shape, tuple(z), lhs.allzero or rhs.allzero)]


# ----------------------------------------------------------------------------- windows, sorting

def _window(w, eqn, xs, window_dimensions, window_strides, padding, base_dilation,
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
      dims.append(w.cl.new(shape[d]))
      w.refuse(x.dims[d], f"is pooled over by `{eqn.primitive.name}`")
      w.refuse(dims[-1], f"is pooled over by `{eqn.primitive.name}`")
  return [Val(tuple(dims), shape, tuple(keep_zero and zz for zz in x.z),
              keep_zero and x.allzero)]


@register(lax.reduce_window_sum_p, lax.reduce_window_max_p, lax.reduce_window_min_p)
def _reduce_window(w, eqn, xs, *, window_dimensions, window_strides, padding,
                   base_dilation, window_dilation, **_):
  return _window(w, eqn, xs, window_dimensions, window_strides, padding, base_dilation,
                 window_dilation, True)


@register(lax.sort_p)
def _sort(w, eqn, xs, *, dimension, **_):
  d = int(dimension)
  for e in range(len(xs[0].shape)):
    c = xs[0].dims[e]
    for x in xs[1:]:
      c = w.cl.union(c, x.dims[e])
    if e == d:
      w.refuse(c, "is sorted along by `sort`")
  x = xs[0]
  return [Val(x.dims, x.shape, (False,) * len(x.shape), False) for _ in eqn.outvars]


@register(lax.top_k_p)
def _top_k(w, eqn, xs, *, axis=-1, **_):
  x = xs[0]
  axis = int(axis) % len(x.shape)
  w.refuse(x.dims[axis], "is reduced by `top_k`")
  shape = tuple(eqn.outvars[0].aval.shape)
  dims = list(x.dims)
  dims[axis] = w.cl.new(shape[axis])
  w.refuse(dims[axis], "is reduced by `top_k`")
  dims = tuple(dims)
  return [Val(dims, shape, (False,) * len(shape), False) for _ in eqn.outvars]
