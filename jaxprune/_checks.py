"""Run-time checks of traced values (private).

A traced value (a sparsity under ``jax.jit``, a schedule's output, an ``inject_hyperparams``
hyperparameter) cannot be checked when the program is traced. :func:`check` checks it when the
program runs: a ``lax.cond`` on the condition, whose true branch calls ``jax.debug.callback``
with a function that raises ``ValueError``. The error surfaces as a ``jax.errors.JaxRuntimeError``
whose message holds the ``ValueError``'s, when the result is computed. A program whose values
are fine never calls back to the host: the cost is one scalar compare and a ``cond``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _raise_if_bad(message: Callable[..., str], bad, *values) -> None:
  # Under vmap, lax.cond becomes a select that runs both branches: re-check here.
  bad = np.asarray(bad)
  if bad.any():
    index = np.unravel_index(int(np.argmax(bad)), bad.shape) if bad.ndim else ()
    raise ValueError(message(*(np.asarray(v)[index] if np.ndim(v) else np.asarray(v)
                               for v in values)))


def check(bad: jax.Array, message: Callable[..., str], *values: jax.Array) -> None:
  """Raises ``ValueError(message(*values))`` when the program runs, if ``bad`` is true (at
  once, if nothing is traced).

  ``message`` receives the values as NumPy scalars (the first bad entry's, when ``bad`` and the
  values are batched).
  """
  if not any(isinstance(x, jax.core.Tracer) for x in (bad, *values)):
    _raise_if_bad(message, bad, *values)    # concrete: raise now
    return
  bad = jnp.asarray(bad)
  callback = functools.partial(_raise_if_bad, message)
  lax.cond(jnp.any(bad), lambda: jax.debug.callback(callback, bad, *values), lambda: None)


def is_fraction(value: jax.Array) -> jax.Array:
  """``0 <= value <= 1`` (false for NaN)."""
  return (value >= 0) & (value <= 1)


def check_fractions(values: list[jax.Array], paths: list[str], what: str = "sparsity") -> None:
  """Checks at run time that every traced ``values[i]`` (of leaf ``paths[i]``) is in [0, 1]:
  one check for all of them, naming the first bad one."""
  if not values:
    return
  stacked = jnp.stack([jnp.asarray(v, jnp.float32) for v in values])
  bad = ~is_fraction(stacked)
  first = jnp.argmax(bad)

  def message(index, value):
    return (f"{what} {float(value)} for leaf '{paths[int(index)]}' is outside [0, 1] "
            "(a traced value, checked when the program runs).")

  check(jnp.any(bad), message, first, stacked[first])
