"""A forward interpreter over jaxprs, generic in what a value is.

Both the surgery analysis (values are axis classes: abstract) and calibration (values are arrays,
or arrays tagged with the parameter leaf they are a view of: concrete) walk a traced function
equation by equation. This module is the walk; an analysis brings its own value type ``V`` and
its own rules.

The interface:

* ``Rule = Callable[[Interpreter, JaxprEqn, list[V]], Sequence[V]]``: given the interpreter
  (which carries the analysis' state), the equation and one value per ``eqn.invars``, a rule
  returns one value per ``eqn.outvars`` (also for single-result primitives: a list of one).
  Read the primitive's parameters from ``eqn.params``.
* ``Interpreter(rules, default=...)``: ``rules`` maps primitive OBJECTS to rules, the way JAX
  registers its own (``rules[lax.dot_general_p] = fn``); ``default`` is the rule of every
  primitive not in ``rules`` (default: :func:`bind_rule`, i.e. evaluate it).
* Subclasses override :meth:`Interpreter.literal` (a ``Literal`` operand's value, e.g. ``2.0``
  in ``mul x 2.0``) and :meth:`Interpreter.const` (an array a ``ClosedJaxpr`` closes over, or
  a ``jax.ShapeDtypeStruct`` for a constvar of an open sub-jaxpr, which has no value); both
  return the value itself by default, which is what a concrete evaluation wants.
* :meth:`Interpreter.run_closed` runs a ``ClosedJaxpr`` on argument values (one per invar);
  :meth:`Interpreter.run` an open ``Jaxpr`` on const and argument values;
  :meth:`Interpreter.run_sub` a sub-jaxpr of an equation (open or closed; rules use it).
* Call-like primitives (``jit``/pjit, ``closed_call``, ``call``, ``custom_jvp_call``,
  ``custom_vjp_call``, ``remat``/``checkpoint``) are stepped into: their body is run by the same
  interpreter, so rules see the equations inside (``jax.nn.relu`` is a ``custom_jvp_call``
  around a ``jit``; ``jax.nn.gelu`` can be a ``jit``). The custom-derivative rules are
  ignored; only the primal body runs. A rule registered for a call-like primitive overrides
  this.
* Loops and branches (``scan``, ``while``, ``cond``) are NOT handled generically: what they
  mean depends on the value type. Register rules for them. A concrete evaluation can use
  :func:`unroll_scan`, :func:`unroll_while` and :func:`select_branch`, which run the body once
  per iteration (or the branch taken) through the interpreter, so the rules see every step;
  an abstract analysis runs the bodies with :meth:`Interpreter.run_sub` on abstract values to
  a fixed point of its own. Without such rules, the default rule sees them as one equation
  (:func:`bind_rule` evaluates the whole loop at once, without the rules seeing inside).

Examples:
  A concrete evaluation that records the operand shapes of every ``dot_general``:

  >>> import jax, jax.numpy as jnp
  >>> from jax import lax
  >>> from jaxprune import _jaxpr
  >>> seen = []
  >>> def dot(interp, eqn, vals):
  ...   seen.append(tuple(v.shape for v in vals))
  ...   return _jaxpr.bind_rule(interp, eqn, vals)
  >>> interp = _jaxpr.Interpreter({lax.dot_general_p: dot})
  >>> fn = lambda w, x: jax.nn.relu(x @ w).sum()
  >>> closed = jax.make_jaxpr(fn)(jnp.ones((3, 2)), jnp.ones((4, 3)))
  >>> interp.run_closed(closed, [jnp.ones((3, 2)), jnp.ones((4, 3))])
  [Array(24., dtype=float32)]
  >>> seen
  [((4, 3), (3, 2))]
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import jax
from jax.extend import core as jcore
from jax.extend.core import primitives as prims

V = TypeVar("V")
Rule = Callable[["Interpreter", jcore.JaxprEqn, list], Sequence[Any]]

__all__ = ["Interpreter", "Rule", "CALL_PRIMITIVES", "call_jaxpr", "bind", "bind_rule",
           "scan_operands", "unroll_scan", "unroll_while", "select_branch"]

# call-like primitive -> the parameter holding the jaxpr it calls
CALL_PRIMITIVES: dict[jcore.Primitive, str] = {
    prims.jit_p: "jaxpr",
    prims.closed_call_p: "call_jaxpr",
    prims.call_p: "call_jaxpr",
    prims.remat_p: "jaxpr",
    prims.custom_jvp_call_p: "call_jaxpr",
    prims.custom_vjp_call_p: "call_jaxpr",
}


def call_jaxpr(eqn: jcore.JaxprEqn) -> jcore.Jaxpr | jcore.ClosedJaxpr | None:
  """The jaxpr a call-like equation runs, or None (not call-like, or no jaxpr parameter)."""
  key = CALL_PRIMITIVES.get(eqn.primitive)
  sub = eqn.params.get(key) if key is not None else None
  return sub if isinstance(sub, (jcore.Jaxpr, jcore.ClosedJaxpr)) else None


class Interpreter(Generic[V]):
  """Runs jaxprs equation by equation on values of type ``V``, dispatching to rules.

  Args:
    rules: ``{primitive: rule}``; see the module docstring for a rule's signature.
    default: the rule for primitives not in ``rules`` (default: :func:`bind_rule`).

  Subclass to add state (the rules receive the interpreter) and to override :meth:`literal`,
  :meth:`const` or :meth:`eqn` (e.g. to observe every equation before its rule runs).
  """

  def __init__(self, rules: Mapping[jcore.Primitive, Rule] | None = None,
               default: Rule | None = None):
    self.rules: Mapping[jcore.Primitive, Rule] = {} if rules is None else rules
    self.default: Rule = bind_rule if default is None else default

  def literal(self, value: Any) -> V:
    """The value of a ``Literal`` operand (a scalar constant written into an equation)."""
    return value

  def const(self, value: Any) -> V:
    """The value of a constant a ``ClosedJaxpr`` closes over.

    For a constvar of an OPEN sub-jaxpr (rare: JAX passes constants of call bodies as
    arguments) there is no value, and ``value`` is a ``jax.ShapeDtypeStruct``.
    """
    return value

  def read(self, env: dict, var) -> V:
    if isinstance(var, jcore.Literal):
      return self.literal(var.val)
    return env[var]

  def run(self, jaxpr: jcore.Jaxpr, consts: Sequence[V], args: Sequence[V]) -> list[V]:
    """Runs an open jaxpr on values for its constvars and its invars; returns its outputs."""
    env: dict = {}
    for v, c in zip(jaxpr.constvars, consts, strict=False):
      env[v] = c
    for v, x in zip(jaxpr.invars, args, strict=False):
      env[v] = x
    for eqn in jaxpr.eqns:
      outs = self.eqn(eqn, [self.read(env, v) for v in eqn.invars])
      for v, o in zip(eqn.outvars, outs, strict=False):
        if not isinstance(v, jcore.DropVar):
          env[v] = o
    return [self.read(env, v) for v in jaxpr.outvars]

  def run_closed(self, closed: jcore.ClosedJaxpr, args: Sequence[V]) -> list[V]:
    """Runs a ``ClosedJaxpr`` (e.g. from ``jax.make_jaxpr(fn)(*example)``) on ``args``."""
    return self.run(closed.jaxpr, [self.const(c) for c in closed.consts], args)

  def run_sub(self, sub: jcore.Jaxpr | jcore.ClosedJaxpr, args: Sequence[V]) -> list[V]:
    """Runs a sub-jaxpr found in an equation's params (closed or open) on ``args``."""
    if isinstance(sub, jcore.ClosedJaxpr):
      return self.run_closed(sub, args)
    return self.run(sub, [self.const(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype))
                          for v in sub.constvars], args)

  def eqn(self, eqn: jcore.JaxprEqn, vals: list[V]) -> Sequence[V]:
    """One equation: its registered rule, else the call's body for call-like primitives,
    else the default rule."""
    rule = self.rules.get(eqn.primitive)
    if rule is not None:
      return rule(self, eqn, vals)
    sub = call_jaxpr(eqn)
    if sub is not None:
      return self.run_sub(sub, vals)
    return self.default(self, eqn, vals)


# ----------------------------------------------------------------------------- concrete helpers

def bind(eqn: jcore.JaxprEqn, arrays: Sequence[Any]) -> list:
  """Evaluates one equation on arrays: ``eqn.primitive.bind(*arrays, **eqn.params)`` as a list."""
  out = eqn.primitive.bind(*arrays, **eqn.params)
  return list(out) if eqn.primitive.multiple_results else [out]


def bind_rule(interp: Interpreter, eqn: jcore.JaxprEqn, vals: list) -> list:
  """The rule that evaluates a primitive on its (array) values: :func:`bind`."""
  del interp
  return bind(eqn, vals)


def scan_operands(eqn: jcore.JaxprEqn, vals: Sequence[V]) -> tuple[list[V], list[V], list[V]]:
  """Splits a ``scan`` equation's operands into ``(consts, init carry, scanned xs)``."""
  nc, ncar = eqn.params["num_consts"], eqn.params["num_carry"]
  return list(vals[:nc]), list(vals[nc:nc + ncar]), list(vals[nc + ncar:])


def unroll_scan(interp: Interpreter, eqn: jcore.JaxprEqn, vals: Sequence[V], *,
                index: Callable[[V, int], V], stack: Callable[[list[V], Any], V]) -> list[V]:
  """Runs a ``scan`` one iteration at a time through ``interp`` (rules see every step).

  Args:
    interp: the interpreter.
    eqn: the ``scan`` equation.
    vals: its operand values.
    index: ``(x, i) -> x[i]`` for a scanned operand.
    stack: ``(ys, aval) -> stacked`` for the per-step values of one output (``ys`` is empty
      for a length-0 scan; ``aval`` is the output's, with the leading length axis).

  Returns:
    The final carry, then the stacked outputs, as the ``scan`` primitive returns them.
  """
  consts, carry, xs = scan_operands(eqn, vals)
  length, reverse, body = int(eqn.params["length"]), eqn.params["reverse"], eqn.params["jaxpr"]
  steps = []
  for i in (reversed(range(length)) if reverse else range(length)):
    outs = interp.run_sub(body, [*consts, *carry, *[index(x, i) for x in xs]])
    carry, ys = outs[:len(carry)], outs[len(carry):]
    steps.append(ys)
  if reverse:
    steps.reverse()
  avals = [v.aval for v in eqn.outvars[len(carry):]]
  return [*carry, *[stack([s[k] for s in steps], a) for k, a in enumerate(avals)]]


def unroll_while(interp: Interpreter, eqn: jcore.JaxprEqn, vals: Sequence[V], *,
                 truth: Callable[[V], bool]) -> list[V]:
  """Runs a ``while`` loop through ``interp``; ``truth`` turns the condition's value into a bool."""
  cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
  cconsts, bconsts, carry = list(vals[:cn]), list(vals[cn:cn + bn]), list(vals[cn + bn:])
  while truth(interp.run_sub(eqn.params["cond_jaxpr"], [*cconsts, *carry])[0]):
    carry = interp.run_sub(eqn.params["body_jaxpr"], [*bconsts, *carry])
  return carry


def select_branch(interp: Interpreter, eqn: jcore.JaxprEqn, vals: Sequence[V], *,
                  index: Callable[[V], int]) -> list[V]:
  """Runs the branch of a ``cond`` that its index operand picks (``index`` reads it as an int)."""
  branches = eqn.params["branches"]
  i = min(max(int(index(vals[0])), 0), len(branches) - 1)  # lax.switch clamps the same way
  return interp.run_sub(branches[i], list(vals[1:]))
