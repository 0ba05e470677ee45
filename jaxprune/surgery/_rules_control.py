"""Surgery rules for loops and branches: ``scan``, ``while``, ``cond``.

Their bodies are run by the walker on abstract values (:meth:`Walker.run_sub`), once per
branch and, for loops, until the carries' zero facts stop changing. A loop's carry axes are
the same channels in every iteration (unioned with the body's outputs); a scan's time axis is a
position, never a channel. See ``_rules.py`` for what a rule must do.
"""
from __future__ import annotations

from jax import lax

from jaxprune import _jaxpr
from jaxprune.surgery._interp import Val, register


def _loop(w, body, consts, init, xs_inner, cond=None, cond_consts=()):
  """Runs a loop body to a fixed point of the carries' zero facts; unions carry axes."""
  z = [c.z for c in init]
  az = [c.allzero for c in init]
  while True:  # the facts only ever turn False, so this stops
    carry = [c._replace(z=zz, allzero=a, leaf=None)
             for c, zz, a in zip(init, z, az, strict=True)]
    outs = w.run_sub(body, [*consts, *carry, *xs_inner])
    new_z = [tuple(p and q for p, q in zip(zz, o.z, strict=True))
             for zz, o in zip(z, outs, strict=False)]
    new_az = [a and o.allzero for a, o in zip(az, outs, strict=False)]
    if new_z == z and new_az == az:
      break
    z, az = new_z, new_az
  if cond is not None:
    w.run_sub(cond, [*cond_consts, *carry])
  for c, o in zip(init, outs, strict=False):
    for a, b in zip(c.dims, o.dims, strict=False):
      w.cl.union(a, b)
  return carry, outs[len(init):]


@register(lax.scan_p)
def _scan(w, eqn, xs, *, length, jaxpr, **_):
  consts, init, seqs = _jaxpr.scan_operands(eqn, xs)
  length = int(length)
  t = w.cl.new(length)
  w.refuse(t, "is scanned over by `scan` (its length is fixed)")
  inner = []
  for s in seqs:
    w.cl.union(t, s.dims[0])
    inner.append(Val(s.dims[1:], s.shape[1:], s.z[1:], s.allzero))
  carry, ys = _loop(w, jaxpr, consts, init, inner)
  outs = list(carry)
  for y in ys:
    outs.append(Val((t, *y.dims), (length, *y.shape), (False, *y.z), y.allzero))
  return outs


@register(lax.while_p)
def _while(w, eqn, xs, *, cond_nconsts, body_nconsts, cond_jaxpr, body_jaxpr, **_):
  cn, bn = cond_nconsts, body_nconsts
  carry, _ = _loop(w, body_jaxpr, xs[cn:cn + bn], xs[cn + bn:], [], cond=cond_jaxpr,
                   cond_consts=xs[:cn])
  return carry


@register(lax.cond_p)
def _cond(w, eqn, xs, *, branches, **_):
  outs = None
  for branch in branches:
    res = w.run_sub(branch, xs[1:])
    if outs is None:
      outs = res
      continue
    merged = []
    for a, b in zip(outs, res, strict=False):
      dims = tuple(w.cl.union(p, q) for p, q in zip(a.dims, b.dims, strict=False))
      merged.append(Val(dims, a.shape, tuple(p and q for p, q in zip(a.z, b.z, strict=False)),
                        a.allzero and b.allzero))
    outs = merged
  return [o._replace(leaf=None) for o in outs]
