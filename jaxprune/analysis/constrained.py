"""Mitigating disparate impact: fine-tuning under per-group loss constraints, by dual ascent.

The pruned model is fine-tuned to solve

    minimise  L(θ)   subject to   L_g(θ) − L(θ) ≤ ε   for every group g,

where ``L`` is the mean loss over all examples and ``L_g`` the mean loss over group ``g``: no
group may be worse off than the population by more than ``ε``. With one multiplier
``λ_g ≥ 0`` per group, the Lagrangian is

    𝓛(θ, λ) = L(θ) + Σ_g λ_g (L_g(θ) − L(θ) − ε),

and training alternates a primal descent step on ``θ`` (any optax optimizer, on ``∇_θ 𝓛``) with
a projected dual ascent step ``λ_g ← max(0, λ_g + η (L_g − L − ε))``. A group that keeps
violating its constraint sees its multiplier, hence its weight in the loss, grow.

The training loop (mask kept by a pruning transform last in the chain, or by ``apply_masks``)::

    def lagrangian(params, lam, x, y, g):
      per_example = optax.softmax_cross_entropy_with_integer_labels(model(params, x), y)
      return constrained_loss(per_example, g, lam, num_groups=G, epsilon=0.02)

    @jax.jit
    def step(params, opt_state, lam, x, y, g):
      (value, violations), grads = jax.value_and_grad(lagrangian, has_aux=True)(
          params, lam, x, y, g)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)          # primal descent on θ
      lam = dual_ascent_update(lam, violations, step_size=0.1)  # dual ascent on λ
      return params, opt_state, lam

    lam = jnp.zeros(G)

References:
  Tran, Fioretto, Kim and Naidu, "Pruning has a disparate impact on model accuracy",
  NeurIPS 2022 (mitigation by constraining each group's loss during fine-tuning, solved with a
  Lagrangian dual method).
  Hashemizadeh, Ramirez, Sukumaran, Farnadi, Lacoste-Julien and Gallego-Posada, "Balancing Act:
  Constraining Disparate Impact in Sparse Models", ICLR 2024, arXiv:2310.20673 (per-group
  constraints on a pruned model, solved by gradient descent on the parameters and projected
  gradient ascent on the multipliers; their constraints bound accuracy gaps to the dense model).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprune._typing import ArrayLike


def constrained_loss(per_example_loss: jax.Array, groups: ArrayLike, multipliers: jax.Array, *,
                     num_groups: int,
                     epsilon: float) -> tuple[jax.Array, jax.Array]:
  """The Lagrangian of per-group loss constraints, and how much each constraint is violated.

  With ``L`` the mean of ``per_example_loss`` and ``L_g`` its mean over the examples of group
  ``g``: ``violations_g = L_g − L − ε`` and the Lagrangian is
  ``L + Σ_g λ_g · violations_g``. A group absent from the batch has violation 0 (its constraint
  is not measured on this batch, and its multiplier does not move).

  Use it as the loss of the primal step with ``jax.value_and_grad(..., has_aux=True)``; the
  violations come back without gradient, ready for :func:`dual_ascent_update`.

  Args:
    per_example_loss: float ``(batch,)``.
    groups: integer group id per example ``(batch,)``, in ``[0, num_groups)``.
    multipliers: float ``(num_groups,)``, the ``λ_g ≥ 0``.
    num_groups: number of groups (static).
    epsilon: allowed excess of a group's loss over the overall loss.

  Returns:
    ``(lagrangian, violations)``: a float32 scalar and float32 ``(num_groups,)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.analysis import constrained_loss
    >>> value, v = constrained_loss(jnp.array([1., 1., 4.]), jnp.array([0, 0, 1]),
    ...                             jnp.array([0., 1.]), num_groups=2, epsilon=0.5)
    >>> float(value), v.tolist()
    (3.5, [-1.5, 1.5])

  References:
    Tran et al., "Pruning has a disparate impact on model accuracy", NeurIPS 2022.
    Hashemizadeh et al., "Balancing Act: Constraining Disparate Impact in Sparse Models",
    ICLR 2024.
  """
  loss = jnp.asarray(per_example_loss)
  groups = jnp.asarray(groups)
  multipliers = jnp.asarray(multipliers)
  if loss.ndim != 1 or groups.shape != loss.shape:
    raise ValueError(f"`per_example_loss` and `groups` must both have shape (batch,); got "
                     f"{loss.shape} and {groups.shape}.")
  if multipliers.shape != (num_groups,):
    raise ValueError(f"`multipliers` must have shape ({num_groups},); got {multipliers.shape}.")
  loss = loss.astype(jnp.float32)
  mean = jnp.mean(loss)
  total = jax.ops.segment_sum(loss, groups, num_segments=num_groups)
  count = jax.ops.segment_sum(jnp.ones_like(loss), groups, num_segments=num_groups)
  group_mean = total / jnp.maximum(count, 1)
  violations = jnp.where(count > 0, group_mean - mean - epsilon, 0.0)
  lagrangian = mean + jnp.sum(multipliers.astype(jnp.float32) * violations)
  return lagrangian, jax.lax.stop_gradient(violations)


def dual_ascent_update(multipliers: jax.Array, violations: jax.Array,
                       step_size: float | jax.Array) -> jax.Array:
  """One projected gradient-ascent step on the multipliers: ``max(0, λ + η · violation)``.

  The gradient of the Lagrangian with respect to ``λ_g`` is the violation of constraint ``g``;
  the projection keeps every multiplier non-negative (inequality constraints).

  Args:
    multipliers: float ``(num_groups,)``.
    violations: float ``(num_groups,)``, from :func:`constrained_loss`.
    step_size: the dual learning rate ``η > 0`` (may be traced).

  Returns:
    The new multipliers, same shape and dtype as ``multipliers``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.analysis import dual_ascent_update
    >>> dual_ascent_update(jnp.array([0.5, 0.5]), jnp.array([2., -2.]), 0.25).tolist()
    [1.0, 0.0]

  References:
    Hashemizadeh et al., "Balancing Act: Constraining Disparate Impact in Sparse Models",
    ICLR 2024.
  """
  multipliers = jnp.asarray(multipliers)
  violations = jnp.asarray(violations)
  if violations.shape != multipliers.shape:
    raise ValueError(f"`violations` has shape {violations.shape}; `multipliers` has "
                     f"{multipliers.shape}.")
  new = multipliers + step_size * violations.astype(multipliers.dtype)
  return jnp.maximum(new, 0).astype(multipliers.dtype)
