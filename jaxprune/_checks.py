"""Run-time checks of traced values (private).

A traced value (a sparsity under ``jax.jit``, a schedule's output, an ``inject_hyperparams``
hyperparameter) cannot be checked when the program is traced. :func:`check` checks it when the
program runs: a ``lax.cond`` on the condition, whose true branch calls a ``jax.pure_callback``
that raises ``ValueError``. A program whose values are fine never calls back to the host: the
cost is one scalar compare, a ``cond`` and a select.

**Why ``pure_callback`` and not ``jax.debug.callback``.** A debug callback is an effect, and a
jitted function holding one anywhere (even in a branch that never runs) never gets JAX's C++
dispatch fast path: every call of the user's step is then flattened and dispatched in Python
(a plain adam step on a 148-leaf tree: 38.7 ms alone, 45.2 ms with one never-called debug
callback). A pure callback is effect-free; the int32 0 it returns is folded into the checked
value (:func:`depend_on`), so XLA keeps it exactly where the value is used. This is how
Equinox's ``error_if`` raises too.

**The error type.** The failure surfaces from the compiled call with the ``ValueError``'s
message in it. Its type is ``jax.errors.JaxRuntimeError`` on JAX's Python dispatch path (the
first call of a jitted function) and ``ValueError`` once the C++ fast path serves it (any later
call): jax-ml/jax#34083, fixed upstream by jax-ml/jax#39898. :data:`RUNTIME_ERRORS` holds both.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# What a failed run-time check raises from a compiled call (see the module docstring).
RUNTIME_ERRORS = (jax.errors.JaxRuntimeError, ValueError)


def _raise_if_bad(message: Callable[..., str], bad, *values) -> None:
  # Under vmap, lax.cond becomes a select that runs both branches: re-check here.
  bad = np.asarray(bad)
  if bad.any():
    index = np.unravel_index(int(np.argmax(bad)), bad.shape) if bad.ndim else ()
    raise ValueError(message(*(np.asarray(v)[index] if np.ndim(v) else np.asarray(v)
                               for v in values)))


def host_check(raise_if_bad: Callable[..., None], failed: jax.Array, *args) -> jax.Array:
  """``raise_if_bad(*args)`` on the host when the program runs, only if ``failed`` (a bool
  scalar) is true; returns an int32 0 computed after it, for :func:`depend_on`.

  ``raise_if_bad`` receives NumPy arrays (with leading batch axes under ``vmap``, where it is
  called at every step: a batched ``cond`` runs both branches) and raises, or returns.
  """
  args = lax.stop_gradient(args)   # a check has no derivative; the checked value keeps its own
  ndims = [np.ndim(a) for a in args]

  def on_host(*host_args):
    raise_if_bad(*host_args)
    batch = np.broadcast_shapes(*(np.shape(a)[:np.ndim(a) - n] for a, n in zip(host_args, ndims)))
    return np.zeros(batch, np.int32)

  call = lambda: jax.pure_callback(on_host, jax.ShapeDtypeStruct((), jnp.int32), *args,
                                   vmap_method="broadcast_all")
  return lax.cond(failed, call, lambda: jnp.zeros((), jnp.int32))


def depend_on(value: jax.Array, zero: jax.Array) -> jax.Array:
  """``value``, made to depend on ``zero`` (an int32 0 from :func:`host_check`) so that XLA
  keeps the check wherever ``value`` is used, bit for bit (NaN, or +1, if ``zero`` were not 0:
  it always is)."""
  value = jnp.asarray(value)
  if jnp.issubdtype(value.dtype, jnp.floating):
    return jnp.where(zero == 0, value, jnp.asarray(jnp.nan, value.dtype))
  return value + zero.astype(value.dtype)


def check(bad: jax.Array, message: Callable[..., str], value: jax.Array,
          *more: jax.Array) -> jax.Array:
  """Raises ``ValueError(message(value, *more))`` when the program runs, if ``bad`` (a bool
  scalar) is true (at once, if nothing is traced); returns ``value``, made to depend on the
  check: use it in place of ``value``, or the check may be dropped with it.

  ``message`` receives the values as NumPy scalars (the first bad entry's, when ``bad`` and the
  values are batched).
  """
  values = (value, *more)
  if not any(isinstance(x, jax.core.Tracer) for x in (bad, *values)):
    _raise_if_bad(message, bad, *values)    # concrete: raise now
    return value
  bad = jnp.asarray(bad)
  zero = host_check(functools.partial(_raise_if_bad, message), jnp.any(bad), bad, *values)
  return depend_on(value, zero)


def is_fraction(value: jax.Array) -> jax.Array:
  """``0 <= value <= 1`` (false for NaN)."""
  return (value >= 0) & (value <= 1)


def check_fractions(values: list[jax.Array], paths: list[str],
                    what: str = "sparsity") -> list[jax.Array]:
  """Checks at run time that every traced ``values[i]`` (of leaf ``paths[i]``) is in [0, 1]:
  one check for all of them, naming the first bad one. Returns the values, made to depend on
  the check (see :func:`check`)."""
  if not values:
    return []
  stacked = jnp.stack([jnp.asarray(v, jnp.float32) for v in values])
  bad = ~is_fraction(stacked)
  first = jnp.argmax(bad)

  def message(index, value):
    return (f"{what} {float(value)} for leaf '{paths[int(index)]}' is outside [0, 1] "
            "(a traced value, checked when the program runs).")

  zero = host_check(functools.partial(_raise_if_bad, message), jnp.any(bad), jnp.any(bad),
                    first, stacked[first])
  return [depend_on(v, zero) for v in values]
