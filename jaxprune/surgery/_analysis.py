"""Group analysis: trace ``fn``, walk its jaxpr, turn the coupling graph into channel groups,
and probe each candidate group (trace again one channel smaller)."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from jaxprune import _tree
from jaxprune.surgery import _rules, _rules_control, _rules_shape  # noqa: F401 (registers rules)
from jaxprune.surgery._classes import Classes
from jaxprune.surgery._interp import Walker
from jaxprune.surgery._types import INPUT, OUTPUT, SINGLE, UNMASKED, ChannelGroup, Member, is_fixed


@dataclasses.dataclass
class Analysis:
  paths: list[str]
  leaves: list
  treedef: Any
  groups: tuple[ChannelGroup, ...]


def _leaf_shape(x) -> tuple[int, ...]:
  return tuple(int(s) for s in np.shape(x))


def _same_program(a, b) -> str | None:
  """None if two traces of fn are the same program up to shapes, else what differs."""
  if isinstance(a, jcore.ClosedJaxpr):
    if len(a.consts) != len(b.consts):
      return "it closes over a different number of arrays"
    for x, y in zip(a.consts, b.consts, strict=False):
      if np.shape(x) != np.shape(y):
        return f"it closes over an array whose shape changes ({np.shape(x)} -> {np.shape(y)})"
      try:
        same = np.array_equal(np.asarray(x), np.asarray(y))
      except Exception:
        same = True
      if not same:
        return "it closes over an array whose values change"
    a, b = a.jaxpr, b.jaxpr
  if len(a.eqns) != len(b.eqns):
    return "fn traces to a different program (number of operations changes)"
  for ea, eb in zip(a.eqns, b.eqns, strict=False):
    name = ea.primitive.name
    if name != eb.primitive.name:
      return f"fn traces to a different program (`{name}` becomes `{eb.primitive.name}`)"
    for va, vb in zip(ea.invars, eb.invars, strict=False):
      la, lb = isinstance(va, jcore.Literal), isinstance(vb, jcore.Literal)
      if la != lb:
        return f"fn traces to a different program (an operand of `{name}` changes)"
      if la and not np.array_equal(np.asarray(va.val), np.asarray(vb.val)):
        return (f"fn computes the constant {np.asarray(va.val)} (used by `{name}`) from this "
                f"axis' size; it becomes {np.asarray(vb.val)} when the axis shrinks (e.g. a mean "
                "over channels or a 1/sqrt(head_dim) scale)")
    for k, pa in ea.params.items():
      pb = eb.params.get(k)
      subs_a = pa if isinstance(pa, (tuple, list)) else (pa,)
      subs_b = pb if isinstance(pb, (tuple, list)) else (pb,)
      for sa, sb in zip(subs_a, subs_b, strict=False):
        if isinstance(sa, (jcore.Jaxpr, jcore.ClosedJaxpr)):
          if not isinstance(sb, (jcore.Jaxpr, jcore.ClosedJaxpr)):
            return f"fn traces to a different program (inside `{name}`)"
          diff = _same_program(sa, sb)
          if diff:
            return diff
  return None


def _probe(fn, leaves, treedef, inputs, closed, leaf_axes, atoms) -> str | None:
  """Traces fn with the groups ``atoms`` one channel smaller and compares the programs."""
  small = []
  for li, x in enumerate(leaves):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      small.append(x)
      continue
    shape = list(_leaf_shape(x))
    for ax in range(len(shape)):
      keep = np.ones(shape[ax], bool)
      for atom, idx in leaf_axes[(li, ax)]:
        if atom in atoms:
          keep &= idx != 0
      shape[ax] = int(keep.sum())
    small.append(jax.ShapeDtypeStruct(tuple(shape), x.dtype))
  abstract_inputs = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype) if hasattr(x, "dtype") else x, inputs)
  try:
    other = jax.make_jaxpr(fn)(jax.tree.unflatten(treedef, small), *abstract_inputs)
  except Exception as e:  # noqa: BLE001 - any failure means the axis' size matters
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"fn fails when the group is one channel smaller ({type(e).__name__}: {msg[:200]})"
  return _same_program(closed, other)


def analyze(fn: Callable[..., Any], params: Any, inputs: tuple, where: _tree.Where | None
            ) -> Analysis:
  paths, leaves, treedef, chosen = _tree.selected(params, where, require_any=False)
  closed = jax.make_jaxpr(fn)(params, *inputs)
  jaxpr = closed.jaxpr
  if len(jaxpr.invars) != len(leaves) + len(jax.tree.leaves(inputs)):
    raise ValueError("surgery could not match fn's traced arguments to the params leaves.")
  cl = Classes()
  walker = Walker(cl)
  ins = []
  for i, v in enumerate(jaxpr.invars):
    shape = getattr(v.aval, "shape", ())
    if i < len(leaves):
      ins.append(walker.fresh(shape, z=chosen[i], leaf=i))
    else:
      val = walker.fresh(shape)
      for c in val.dims:
        cl.mark(c, INPUT)
      ins.append(val)
  outs = walker.run_closed(closed, ins)
  for o in outs:
    for c in o.dims:
      cl.mark(c, OUTPUT)

  reasons: dict[int, list[str]] = defaultdict(list)
  for c, why in dict.fromkeys((cl.find(c), why) for c, why in cl.marks):
    for atom, _ in cl.expand(c):
      if why not in reasons[atom]:
        reasons[atom].append(why)
  members: dict[int, list] = defaultdict(list)
  leaf_axes: dict[tuple[int, int], list] = {}
  for li in range(len(leaves)):
    for ax, c in enumerate(ins[li].dims):
      leaf_axes[(li, ax)] = cl.expand(c)
      for atom, idx in leaf_axes[(li, ax)]:
        members[atom].append((li, ax, idx))

  order = []
  for atom, mem in members.items():
    def rank(m):
      li, ax, idx = m
      nd = len(ins[li].shape)
      return (0 if nd >= 2 and ax == nd - 1 else 1,
              walker.first_use.get(li, len(leaves) + li), li, ax, int(np.argmax(idx >= 0)))
    best = min(mem, key=rank)
    order.append((rank(best), atom, best))
  order.sort(key=lambda t: t[0])

  info = {}
  for _, atom, _ in order:
    why = list(reasons.get(atom, ()))
    mem = members[atom]
    if cl.n(atom) <= 1:
      why.append(SINGLE)
    for li, _, _ in mem:
      if not _tree.is_float(leaves[li]):
        why.append(f"includes the non-float leaf '{paths[li]}'")
        break
    if not any(chosen[li] for li, _, _ in mem):
      why.append(UNMASKED)
    info[atom] = why

  candidates = [atom for _, atom, _ in order if not info[atom]]
  if candidates:
    diff = _probe(fn, leaves, treedef, inputs, closed, leaf_axes, set(candidates))
    if diff is not None:
      for atom in candidates:
        one = _probe(fn, leaves, treedef, inputs, closed, leaf_axes, {atom})
        if one is not None:
          info[atom].append(one)

  groups, names = [], set()
  for _, atom, (li, ax, _) in order:
    name = f"{paths[li]}:{ax}"
    k = 2
    while name in names:
      name, k = f"{paths[li]}:{ax}#{k}", k + 1
    names.add(name)
    why = tuple(info[atom])
    mem = tuple(Member(paths[i], a, np.asarray(idx), bool(chosen[i]))
                for i, a, idx in sorted(members[atom], key=lambda m: (m[0], m[1])))
    groups.append(ChannelGroup(name, cl.n(atom), mem, not why, why, is_fixed(why)))
  return Analysis(paths, leaves, treedef, tuple(groups))


def channel_groups(fn: Callable[..., Any], params: Any, *inputs: Any,
                   where: _tree.Where | None = None) -> tuple[ChannelGroup, ...]:
  """The groups of coupled parameter axes of ``fn``, found by tracing it.

  Args:
    fn: a pure function ``fn(params, *inputs)``; deterministic (no dropout). For a Flax NNX
      module use :func:`module_fn`.
    params: the parameter tree (arrays; only shapes and dtypes are read).
    *inputs: example inputs (arrays or ``jax.ShapeDtypeStruct``); their shapes fix the trace.
    where: ``(path, leaf) -> bool`` choosing the leaves masks will apply to (default: floating
      leaves with ``ndim >= 2``). Prunability is proven under the assumption that exactly these
      leaves are masked.

  Returns:
    A tuple of :class:`ChannelGroup`, one per group that has a parameter axis in it, ordered
    as ``fn`` first uses them; ``print`` one to see its members (masked ones starred).

  Raises:
    ValueError: if ``where`` chooses a non-float leaf (naming it).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune import surgery
    >>> params = {"w1": jnp.ones((3, 4)), "b1": jnp.zeros(4), "w2": jnp.ones((4, 2))}
    >>> fn = lambda p, x: jax.nn.relu(x @ p["w1"] + p["b1"][None]) @ p["w2"]
    >>> [(g.name, g.prunable) for g in surgery.channel_groups(fn, params, jnp.ones((5, 3)))]
    [('w1:1', True), ('w2:1', False), ('w1:0', False)]
    >>> print(surgery.channel_groups(fn, params, jnp.ones((5, 3)))[0])
    w1:1 (4 channels, prunable)
        b1 axis 0
      * w1 axis 1
      * w2 axis 0
  """
  return analyze(fn, params, inputs, where).groups

