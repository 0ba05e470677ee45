"""Exact float arithmetic on the bits, for the unit scores of channels and blocks (private).

XLA:CPU flushes subnormal operands of float arithmetic and compares to zero, and squaring a
float32 below ~1e-19 underflows (above ~2e19 it overflows). So the norm of a channel of tiny
weights came out 0, and the largest channel could be pruned. :func:`unit_reduce` scales every
unit by a power of two picked from its own largest magnitude before it squares or sums, and
scales the result back, both exactly (:func:`ldexp`, on the bits, subnormals included). A power
of two commutes with rounding, so the result is the float the same reduction gives in a float
type with an unbounded exponent, rounded once to the score type: exactly the old value wherever
the old computation did not under- or overflow, and the correctly rounded one elsewhere (a norm
beyond the type's largest finite value is ``inf``, as IEEE rounding says).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune._select import keys as keys_lib


def _layout(dtype):
  """``(signed int type, bits, mantissa bits, exponent bias)`` of float32 or float64."""
  finfo = jnp.finfo(dtype)
  bits = finfo.bits
  return {32: jnp.int32, 64: jnp.int64}[bits], bits, finfo.nmant, finfo.maxexp - 1


def compute_dtype(dtype) -> jnp.dtype:
  """The type unit scores are computed in: float64 for float64 scores, else float32 (which
  holds bfloat16 and float16 values exactly)."""
  return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def ldexp(x: jax.Array, k: jax.Array) -> jax.Array:
  """``x · 2**k``, exact on the bits (subnormal inputs and outputs included; an output below the
  smallest subnormal is rounded half to even, one above the largest finite value is ``inf``).
  ``inf``, NaN and zeros pass unchanged. ``x`` is float32 or float64; ``k`` an integer array
  broadcastable to it."""
  idt, bits, nmant, bias = _layout(x.dtype)
  one = np.array(1, idt)
  fmask = np.array((1 << nmant) - 1, idt)
  emax = np.array(2 * bias + 1, idt)        # exponent field of inf / NaN
  b = lax.bitcast_convert_type(x, idt)
  sign = b & np.array(np.iinfo(idt).min, idt)
  mag = b & np.array(np.iinfo(idt).max, idt)
  field = mag >> nmant
  frac = mag & fmask
  sub = field == 0
  # Normalize: value = m · 2**(e - nmant), with m holding its leading 1 at bit nmant.
  shift = np.array(nmant, idt) - (np.array(bits - 1, idt) - lax.clz(jnp.maximum(frac, one)))
  m = jnp.where(sub, frac << shift, frac | (one << nmant))
  e = jnp.where(sub, np.array(1 - bias, idt) - shift, field - np.array(bias, idt))
  e = e + jnp.asarray(k).astype(idt)
  normal = (((e + np.array(bias, idt)) << nmant) | (m & fmask))
  inf_bits = emax << nmant
  # Below the normal range: the subnormal m >> (1 - bias - e), rounded half to even.
  sh = jnp.clip(np.array(1 - bias, idt) - e, one, np.array(nmant + 2, idt))
  q = m >> sh
  rem = m & ((one << sh) - one)
  half = one << (sh - one)
  q = q + ((rem > half) | ((rem == half) & ((q & one) == one))).astype(idt)
  out = jnp.where(e >= np.array(1 - bias, idt),
                  jnp.where(e + np.array(bias, idt) >= emax, inf_bits, normal), q)
  out = jnp.where((field == emax) | (mag == 0), mag, out)
  return lax.bitcast_convert_type(out | sign, x.dtype)


def _with_any(x: jax.Array, flag: jax.Array, axes: tuple[int, ...], op, init):
  """``(op-reduction of x, any(flag))`` over ``axes``, kept as size 1, in ONE two-output reduce.

  A single-output reduce is not fused with its producer on XLA:CPU (it writes the producer's
  output, a copy of the leaf, first: an integer one for the bits below, or one handed to its
  reduction library); a variadic reduce whose outputs are both used is fused, like the
  engine's counts (see ``jaxprune/_select/README.md``).
  """
  out, any_flag = lax.reduce((x, flag), (np.array(init, x.dtype), np.array(False)),
                             lambda u, v: (op(u[0], v[0]), u[1] | v[1]), axes)
  shape = tuple(1 if i in axes else n for i, n in enumerate(x.shape))
  return out.reshape(shape), any_flag.reshape(shape)


def scale_exponent(s: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Per unit (reducing ``axes``, kept as size 1): ``(e, has_nan)``, with ``e`` the exponent of
  the unit's largest ``|s|`` (``2**e <= max|s| < 2**(e+1)``; 0 for an all-zero unit, the top
  exponent for one holding inf) and whether the unit holds a NaN. The maximum is taken on the
  magnitude bits (integers, in one fused pass): a float max would not order subnormals."""
  idt, bits, nmant, bias = _layout(s.dtype)
  mag = lax.bitcast_convert_type(s, idt) & np.array(np.iinfo(idt).max, idt)
  inf_bits = np.array((2 * bias + 1) << nmant, idt)
  top, has_nan = _with_any(jnp.minimum(mag, inf_bits), mag > inf_bits, axes, jnp.maximum, 0)
  field = top >> nmant
  frac = top & np.array((1 << nmant) - 1, idt)
  # A subnormal maximum: its exponent is that of its leading mantissa bit.
  sub_e = (np.array(bits - 1, idt) - lax.clz(jnp.maximum(frac, np.array(1, idt)))
           - np.array(bias - 1 + nmant, idt))
  e = jnp.where(top == 0, np.array(0, idt),
                jnp.where(field == 0, sub_e, field - np.array(bias, idt)))
  return e, has_nan


def _max_exact(s: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """``max(s)`` over ``axes`` (NaN if the unit holds one), on the order keys: a float max would
  not order subnormals. One fused two-output reduce: the max key and whether a NaN is present."""
  bits = jnp.finfo(s.dtype).bits
  idt = {32: jnp.int32, 64: jnp.int64}[bits]
  key = keys_lib.signed_keys(s, s.dtype, bits)
  lowest = np.array(np.iinfo(idt).min, idt)
  top, any_nan = _with_any(key, jnp.isnan(s), axes, jnp.maximum, lowest)
  bits_out = jnp.where(top >= 0, top, (-top) | lowest)            # the key's float, back
  value = lax.bitcast_convert_type(bits_out, s.dtype)
  return jnp.where(any_nan, jnp.array(np.nan, s.dtype), value)


def _safe_range(reduce: str, n: int) -> tuple[int, int]:
  """Unit exponents (of the largest ``|s|``) for which the plain float32 reduction of ``n``
  terms neither overflows nor loses a bit to flushed subnormals (their sum is below half an
  ulp of the result)."""
  half_log = -(-max(n - 1, 0).bit_length() // 2)        # ceil(log2(n) / 2)
  full_log = max(n - 1, 0).bit_length()                 # ceil(log2(n))
  if reduce == "l2":
    return -51 + half_log, 62 - half_log
  return -102 + full_log, 126 - full_log


@functools.partial(jax.jit, static_argnums=(1, 2))
def unit_reduce(scores: jax.Array, axes: tuple[int, ...], reduce: str) -> jax.Array:
  """The ``reduce`` ("l2", "l1", "mean" or "max") of ``scores`` over ``axes`` (kept as size 1),
  with no intermediate under- or overflow: see the module docstring.

  Units whose largest magnitude lies well inside float32's range get the plain reduction
  (``sqrt(sum(square(s)))``, ``sum(abs(s))``, ``mean(s)``), bit for bit what it always gave;
  only the others (and all float64 scores) take the scaled path, inside a ``lax.cond`` that
  is skipped when no unit needs it. ``max`` is always taken on the order keys (exact, and
  equal to the float max wherever that one is). Jitted, so that eager calls reuse one
  compilation (its reductions are ``lax.reduce`` calls with fresh lambdas).
  """
  s = scores.astype(compute_dtype(scores.dtype))
  if reduce == "max":
    return _max_exact(s, axes)
  term = {"l2": jnp.square, "l1": jnp.abs, "mean": lambda x: x}.get(reduce)
  if term is None:
    raise ValueError(f"reduce must be 'l2', 'l1', 'mean' or 'max', got {reduce!r}.")
  n = math.prod(s.shape[i] for i in axes)
  e, has_nan = scale_exponent(s, axes)

  def finish(total):
    if reduce == "l2":
      return jnp.sqrt(total)
    return total / n if reduce == "mean" else total

  def scaled():
    x = ldexp(s, -e)
    total, nan_again = _with_any(term(x), jnp.isnan(x), axes, jnp.add, 0)
    total = jnp.where(has_nan | nan_again, jnp.array(np.nan, s.dtype), finish(total))
    return ldexp(total, e)

  if s.dtype == jnp.float64:
    return scaled()
  plain = finish(jnp.sum(term(s), axis=axes, keepdims=True))
  lo, hi = _safe_range(reduce, n)
  safe = (e >= lo) & (e <= hi)
  return lax.cond(jnp.all(safe), lambda: plain, lambda: jnp.where(safe, plain, scaled()))
