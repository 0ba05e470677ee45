"""Order keys: floats as unsigned integers whose order is the float order (see README.md).

Every compare the engine makes is a compare of these integer keys, never of floats: XLA:CPU
flushes subnormal operands of float compares (and of ``float32 -> float64`` converts) to zero,
so a float compare would tie ``1e-40`` with ``0``. The keys are built from the bits alone.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_BITS = {jnp.dtype(jnp.bfloat16): 16, jnp.dtype(jnp.float16): 16, jnp.dtype(jnp.float32): 32,
         jnp.dtype(jnp.float64): 64}
_UINT = {16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}


def key_bits(dtype) -> int:
  """The width of the order keys of ``dtype``: 16 for bfloat16/float16, 64 for float64, else 32
  (other float types, e.g. float8, are compared as float32)."""
  return _BITS.get(jnp.dtype(dtype), 32)


def compare_dtype(arrays: Sequence[jax.Array]) -> tuple[jnp.dtype, int]:
  """The float type scores are compared in (one that holds every leaf's values exactly), and
  the width of its order keys: the leaves' dtype when they share one of bfloat16, float16,
  float32 or float64; float64 when some leaf is float64; else float32."""
  dtypes = {jnp.dtype(a.dtype) for a in arrays}
  if len(dtypes) == 1 and next(iter(dtypes)) in _BITS:
    ftype = next(iter(dtypes))
  elif jnp.dtype(jnp.float64) in dtypes:
    ftype = jnp.dtype(jnp.float64)
  else:
    ftype = jnp.dtype(jnp.float32)
  return ftype, key_bits(ftype)


def _f32_to_f64(x: jax.Array) -> jax.Array:
  """float32 -> float64, exact for subnormals too (XLA:CPU's convert flushes them to 0)."""
  b = lax.bitcast_convert_type(x, jnp.uint32)
  subnormal = (b & np.uint32(0x7F800000)) == 0
  mant = (b & np.uint32(0x007FFFFF)).astype(jnp.float64)       # exact: below 2**23
  sign = jnp.where(b >= np.uint32(0x80000000), -1.0, 1.0)
  # mant * 2**-149, as two normal float64 factors: exact.
  tiny = sign * mant * np.float64(2.0**-100) * np.float64(2.0**-49)
  return jnp.where(subnormal, tiny, x.astype(jnp.float64))


def exact_cast(a: jax.Array, ftype) -> jax.Array:
  """``a`` in the compare type ``ftype`` (see :func:`compare_dtype`), value for value."""
  ftype = jnp.dtype(ftype)
  if a.dtype == ftype:
    return a
  if ftype == jnp.float64:
    a = a if a.dtype == jnp.float32 else a.astype(jnp.float32)
    return _f32_to_f64(a)
  return a.astype(ftype)   # narrower floats -> float32: exact on every backend


_INT = {16: jnp.int16, 32: jnp.int32, 64: jnp.int64}


def key_constants(ftype, bits: int):
  """``(unsigned dtype, signed dtype, sign bit, bits of +inf)`` for keys of width ``bits``."""
  udt, idt = _UINT[bits], _INT[bits]
  top = np.array(1 << (bits - 1), udt)
  inf_bits = np.array(np.array(np.inf, ftype).view(idt), idt)
  return udt, idt, top, inf_bits


def signed_keys(a: jax.Array, ftype, bits: int) -> jax.Array:
  """The order keys of ``a`` (already of the compare type ``ftype``) as signed integers: the
  float's sign-magnitude bits in two's complement, so ``-0.0`` and ``+0.0`` are both 0 and
  every other float (subnormals included) has its own key, in float order; NaN (any sign or
  payload) is the minimum integer, below every number. Integer ops only (an ``and``, a
  negation and two selects), so they fuse into whatever consumes them, and signed compares are
  native on every backend."""
  _, idt, _, inf_bits = key_constants(ftype, bits)
  s = lax.bitcast_convert_type(a, idt)
  mag = s & np.array(np.iinfo(idt).max, idt)
  key = jnp.where(s < 0, -mag, mag)
  return jnp.where(mag > inf_bits, np.array(np.iinfo(idt).min, idt), key)


def as_signed(key: jax.Array, bits: int) -> jax.Array:
  """An unsigned order key (the radix select's) in the signed key space of :func:`signed_keys`
  (flipping the sign bit maps one order onto the other)."""
  udt, idt = _UINT[bits], _INT[bits]
  return lax.bitcast_convert_type(key ^ np.array(1 << (bits - 1), udt), idt)


def to_keys(scores: jax.Array) -> jax.Array:
  """Order-preserving map from floats to unsigned ints: NaN -> 0 (lowest), -0.0 == +0.0."""
  ftype, bits = compare_dtype([scores])
  key = signed_keys(exact_cast(scores, ftype), ftype, bits)
  return lax.bitcast_convert_type(key, _UINT[bits]) ^ np.array(1 << (bits - 1), _UINT[bits])


def below_and_at(thresh: jax.Array, ftype, bits: int
                 ) -> tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array]]:
  """Predicates on scores of type ``ftype``: key below the threshold key ``thresh``, and at it."""
  t = as_signed(thresh, bits)
  below_of = lambda a: signed_keys(a, ftype, bits) < t
  at_of = lambda a: signed_keys(a, ftype, bits) == t
  return below_of, at_of
