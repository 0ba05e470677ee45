"""Layer 5 — schedules: ``step -> sparsity`` callables for pruning during training.

Every schedule is an ``optax.Schedule``: it takes a step (a Python int or an int array, traced
under ``jax.jit`` too) and returns the fraction of prunable weights to remove at that step as a
``float32`` scalar. Pass one to :func:`jaxprune.magnitude_pruning` (or any pruning transform), or
inject it with ``optax.inject_hyperparams``. Arguments are checked when the schedule is built, so
bad values fail before tracing.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["constant_schedule", "one_shot_schedule", "polynomial_schedule", "iterative_schedule"]


def _fraction(value, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ValueError(f"{name} must be a number in [0, 1], got {type(value).__name__}.")
  v = float(value)
  if math.isnan(v) or not 0.0 <= v <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {v}.")
  return v


def _step(value, name: str, minimum: int = 0) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {type(value).__name__}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  return int(value)


def constant_schedule(sparsity: float) -> optax.Schedule:
  """The same sparsity at every step.

  Args:
    sparsity: the fraction to remove, in [0, 1].

  Returns:
    A schedule ``step -> float32 scalar``.

  Examples:
    >>> import jaxprune as jp
    >>> float(jp.constant_schedule(0.8)(12345))
    0.800000011920929
  """
  value = _fraction(sparsity, "sparsity")

  def schedule(step):
    del step
    return jnp.full((), value, jnp.float32)

  return schedule


def one_shot_schedule(sparsity: float, at_step: int) -> optax.Schedule:
  """Dense until ``at_step``, then ``sparsity`` from ``at_step`` on.

  Args:
    sparsity: the fraction to remove from ``at_step`` on, in [0, 1].
    at_step: the first step at which the sparsity applies.

  Returns:
    A schedule ``step -> float32 scalar``.

  Examples:
    >>> import jaxprune as jp
    >>> s = jp.one_shot_schedule(0.9, at_step=100)
    >>> float(s(99)), round(float(s(100)), 4)
    (0.0, 0.9)
  """
  value = _fraction(sparsity, "sparsity")
  at = _step(at_step, "at_step")
  return lambda step: jnp.where(jnp.asarray(step) >= at, jnp.float32(value), jnp.float32(0.0))


def polynomial_schedule(final: float, *, begin_step: int, end_step: int, initial: float = 0.0,
                        power: float = 3) -> optax.Schedule:
  """Gradual pruning: ``s_t = s_f + (s_i − s_f)(1 − (t − t_0)/(t_1 − t_0))^power``.

  ``initial`` until ``begin_step``, then a polynomial ramp that is steep at first (while the
  network has many redundant weights) and flat near ``end_step`` (cubic by default), then
  ``final``. This is ``optax.polynomial_schedule`` with the pruning argument names.

  Args:
    final: the sparsity reached at ``end_step`` and kept after it, in [0, 1].
    begin_step: the step at which the ramp starts.
    end_step: the step at which ``final`` is reached (``> begin_step``).
    initial: the sparsity before ``begin_step``, in [0, 1] (default 0).
    power: the exponent of the ramp (3 in the paper).

  Returns:
    A schedule ``step -> float32 scalar``.

  Examples:
    >>> import jaxprune as jp
    >>> s = jp.polynomial_schedule(0.9, begin_step=0, end_step=100)
    >>> [round(float(s(t)), 4) for t in (0, 50, 100, 1000)]
    [0.0, 0.7875, 0.9, 0.9]

  References:
    Zhu and Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model
    compression", ICLR Workshop 2018 (arXiv:1710.01878, 2017).
  """
  f = _fraction(final, "final")
  i = _fraction(initial, "initial")
  begin = _step(begin_step, "begin_step")
  end = _step(end_step, "end_step")
  if end <= begin:
    raise ValueError(f"end_step ({end}) must be greater than begin_step ({begin}).")
  if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
    raise ValueError(f"power must be a positive number, got {power!r}.")
  sched = optax.polynomial_schedule(init_value=i, end_value=f, power=power,
                                    transition_steps=end - begin, transition_begin=begin)
  return lambda step: jnp.asarray(sched(step), jnp.float32)


def iterative_schedule(fraction: float, *, rounds: int, every: int,
                       begin_step: int = 0) -> optax.Schedule:
  """Iterative pruning: ``rounds`` rounds, each removing ``fraction`` of the weights that remain.

  Round ``r`` (``r = 1 … rounds``) starts at step ``begin_step + (r − 1) · every`` and sets the
  sparsity to ``1 − (1 − fraction)^r``; after the last round it stays there. With
  ``fraction=0.2`` this is the 20%-per-round schedule of iterative magnitude pruning.

  Args:
    fraction: the fraction of the remaining weights removed in each round, in [0, 1].
    rounds: the number of rounds (``>= 1``).
    every: steps between rounds (``>= 1``).
    begin_step: the step of the first round.

  Returns:
    A schedule ``step -> float32 scalar``.

  Examples:
    >>> import jaxprune as jp
    >>> s = jp.iterative_schedule(0.5, rounds=3, every=10)
    >>> [float(s(t)) for t in (0, 9, 10, 20, 99)]
    [0.5, 0.5, 0.75, 0.875, 0.875]

  References:
    Han et al., "Learning both Weights and Connections for Efficient Neural Networks", NeurIPS
    2015; Frankle and Carbin, "The Lottery Ticket Hypothesis", ICLR 2019.
  """
  p = _fraction(fraction, "fraction")
  k = _step(rounds, "rounds", minimum=1)
  dt = _step(every, "every", minimum=1)
  begin = _step(begin_step, "begin_step")
  # Sparsity after r rounds, r = 0..k, computed in float64 and looked up by round.
  table = jnp.asarray([1.0 - (1.0 - p) ** r for r in range(k + 1)], jnp.float32)

  def schedule(step):
    step = jnp.asarray(step, jnp.int32)
    r = jnp.where(step >= begin, (step - begin) // dt + 1, 0)
    return table[jnp.clip(r, 0, k)]

  return schedule
