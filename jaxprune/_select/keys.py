"""Order keys: floats as unsigned integers whose order is the float order (see README.md)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def key_bits(dtype) -> int:
  """The width of the order keys of ``dtype``: 16 for bfloat16/float16, else 32."""
  return 16 if jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else 32


def compare_dtype(arrays: Sequence[jax.Array]) -> tuple[jnp.dtype, int]:
  """The float type scores are compared in, and the width of its order keys."""
  dtypes = {jnp.dtype(a.dtype) for a in arrays}
  if len(dtypes) == 1 and key_bits(next(iter(dtypes))) == 16:
    return next(iter(dtypes)), 16
  return jnp.dtype(jnp.float32), 32


def key_constants(ftype, bits: int):
  """``(unsigned dtype, sign bit, key of -inf, key of +inf)`` for keys of width ``bits``."""
  udt = jnp.uint16 if bits == 16 else jnp.uint32
  top = np.array(1 << (bits - 1), udt)
  to_bits = lambda f: int(np.array(f, ftype).view(udt))
  neg_inf = (~np.array(to_bits(-np.inf), udt)).astype(udt)   # key of -inf
  pos_inf = np.array(to_bits(np.inf), udt) | top             # key of +inf
  return udt, top, neg_inf, pos_inf


def to_keys(scores: jax.Array) -> jax.Array:
  """Order-preserving map from floats to unsigned ints: NaN -> 0 (lowest), -0.0 == +0.0."""
  ftype, bits = compare_dtype([scores])
  udt, top, _, _ = key_constants(ftype, bits)
  x = scores.astype(ftype)
  x = jnp.where(x == 0, jnp.zeros((), ftype), x)
  b = lax.bitcast_convert_type(x, udt)
  key = jnp.where(b >= top, ~b, b | top)
  return jnp.where(jnp.isnan(x), jnp.zeros((), udt), key)


def decode(key: jax.Array, ftype, bits: int) -> jax.Array:
  """The float whose order key is ``key`` (inverse of the float -> key map)."""
  udt, top, _, _ = key_constants(ftype, bits)
  raw = jnp.where(key >= top, key ^ top, ~key)
  return lax.bitcast_convert_type(raw.astype(udt), ftype)


def below_and_at(thresh: jax.Array, ftype, bits: int
                 ) -> tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array]]:
  """Predicates: score below the threshold key ``thresh`` (NaN is lowest), and at it."""
  t = decode(thresh, ftype, bits)
  nan_thresh = thresh == 0
  below_of = lambda a: (jnp.isnan(a) & ~nan_thresh) | (a < t)
  at_of = lambda a: jnp.where(nan_thresh, jnp.isnan(a), a == t)
  return below_of, at_of
