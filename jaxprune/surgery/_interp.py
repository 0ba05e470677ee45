"""The surgery interpreter: the abstract value (:class:`Val`), the walker and its rule registry.

:class:`Walker` is a :class:`jaxprune._jaxpr.Interpreter` whose values are :class:`Val`: per
axis, its class in the coupling graph (:class:`~jaxprune.surgery._classes.Classes`) and whether
it is exactly zero at its pruned channels in the masked model. Rules, one small function per
primitive, live in ``_rules*.py`` and are registered here with :func:`register`; a primitive
without a rule is :meth:`Walker.opaque`: every axis it touches is refused.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from jax import lax
from jax.extend import core as jcore

from jaxprune import _jaxpr
from jaxprune.surgery._classes import Classes


class Val(NamedTuple):
  dims: tuple          # one class per axis
  shape: tuple
  z: tuple             # per axis: exactly zero, in the masked model, at the axis' pruned channels
  allzero: bool        # the whole value is exactly zero
  leaf: int | None = None   # index of the params leaf this value is
  value: Any = None         # a scalar literal's value


# primitive -> rule(walker, eqn, vals) -> outputs; filled by the _rules*.py modules
RULES: dict[jcore.Primitive, _jaxpr.Rule] = {}
# primitives whose operands are not "used" by themselves (their bodies' equations are)
_CONTROL = (lax.scan_p, lax.while_p, lax.cond_p)


def register(*primitives: jcore.Primitive | None) -> Callable:
  """Decorator: registers ``rule(walker, eqn, vals, **eqn.params)`` for ``primitives``.

  ``None`` entries (a primitive this jax version does not have) are skipped.
  """
  def deco(fn):
    def rule(walker, eqn, vals):
      return fn(walker, eqn, vals, **eqn.params)
    rule.__name__ = rule.__qualname__ = fn.__name__
    rule.__doc__ = fn.__doc__
    for p in primitives:
      if p is not None:
        RULES[p] = rule
    return fn
  return deco


class Walker(_jaxpr.Interpreter[Val]):
  """Follows every axis of every value through a jaxpr, building axis classes in ``cl``."""

  def __init__(self, cl: Classes):
    super().__init__(RULES, default=Walker.opaque)
    self.cl = cl
    self.first_use: dict[int, int] = {}  # params leaf -> rank of the first equation reading it

  # -- values
  def fresh(self, shape, z: bool = False, allzero: bool = False, **kw) -> Val:
    shape = tuple(int(s) for s in shape)
    return Val(tuple(self.cl.new(n) for n in shape), shape, (z,) * len(shape), allzero, **kw)

  def const(self, value) -> Val:
    try:
      arr = np.asarray(value)
      az = bool(arr.size) and bool(np.all(arr == 0))
    except Exception:  # key arrays and other opaque dtypes
      az = False
    val = self.fresh(np.shape(value), z=az, allzero=az)
    for c in val.dims:
      if self.cl.n(c) > 1:
        self.cl.mark(c, "touches an array that fn closes over instead of taking it in params "
                     "(shrink cannot resize it)")
    return val

  def literal(self, value) -> Val:
    try:
      arr = np.asarray(value)
      az = bool(np.all(arr == 0))
    except Exception:
      arr, az = None, False
    scalar = arr.item() if arr is not None and arr.ndim == 0 else None
    return self.fresh(np.shape(value), z=az, allzero=az, value=scalar)

  def from_aval(self, var) -> Val:
    return self.fresh(getattr(var.aval, "shape", ()))

  # -- equations
  def eqn(self, eqn, vals) -> Sequence[Val]:
    if _jaxpr.call_jaxpr(eqn) is None and eqn.primitive not in _CONTROL:
      for x in vals:
        if x.leaf is not None:
          self.first_use.setdefault(x.leaf, len(self.first_use))
    return super().eqn(eqn, vals)

  def opaque(self, eqn, xs) -> list[Val]:
    why = (f"passes through `{eqn.primitive.name}`, which surgery does not understand, so it "
           "cannot prove removing channels safe")
    outs = [self.from_aval(v) for v in eqn.outvars]
    for val in list(xs) + outs:
      for c in val.dims:
        self.cl.mark(c, why)
    return outs

  def refuse(self, c, why: str) -> None:
    if self.cl.n(c) > 1:
      self.cl.mark(c, why)

  def elementwise(self, eqn, xs, rule) -> list[Val]:
    """Unions equal-sized axes of all operands; ``rule(zs)`` says if the output stays zero."""
    shape = tuple(getattr(eqn.outvars[0].aval, "shape", ()))
    nd = len(shape)
    arrays = [x for x in xs if x.shape]
    if any(len(x.shape) != nd for x in arrays):
      return self.opaque(eqn, xs)
    dims, z = [], []
    for d in range(nd):
      c = None
      for x in arrays:
        if x.shape[d] == shape[d]:
          c = x.dims[d] if c is None else self.cl.union(c, x.dims[d])
      dims.append(self.cl.new(shape[d]) if c is None else c)
      z.append(bool(rule([x.z[d] if x.shape and x.shape[d] == shape[d] else x.allzero
                          for x in xs])))
    out = Val(tuple(dims), shape, tuple(z), bool(rule([x.allzero for x in xs])))
    return [out] * len(eqn.outvars)
