"""The coupling graph: a union-find over axis classes (which axes must keep the same channels).

Every axis of every value the walk sees gets a class (an int). Two axes that must keep the same
channels (a contraction, an elementwise op, a residual add) are merged with :meth:`Classes.union`.
A class may also be *structured* at its root: a ``("concat", parts)`` (the axis is the parts one
after another: ``concatenate``, ``split``, ``slice``) or a ``("product", parts)`` (the row-major
product of the parts: a ``reshape`` that merges or splits axes). Merging two structured classes
merges their parts. The atoms that remain (:meth:`Classes.expand`) are the channel groups.
Reasons not to prune a class are collected with :meth:`Classes.mark`.
"""
from __future__ import annotations

import math

import numpy as np


class Classes:
  """Union-find over axis classes. A class is an atom (one group of channels) or, at its root, a
  ``("concat", parts)`` (the axis is the parts one after another) or ``("product", parts)`` (the
  axis is the parts' row-major product, as a ``reshape`` merges them)."""

  def __init__(self):
    self.parent: list[int] = []
    self.size: list[int] = []
    self.struct: list[tuple | None] = []
    self.marks: list[tuple[int, str]] = []

  def new(self, n: int) -> int:
    self.parent.append(len(self.parent))
    self.size.append(int(n))
    self.struct.append(None)
    return len(self.parent) - 1

  def find(self, c: int) -> int:
    root = c
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[c] != root:
      self.parent[c], c = root, self.parent[c]
    return root

  def n(self, c: int) -> int:
    return self.size[self.find(c)]

  def mark(self, c: int, reason: str) -> None:
    self.marks.append((c, reason))

  def structured(self, kind: str, parts) -> int:
    """A class made of ``parts`` (size-1 factors and empty parts dropped)."""
    skip = 1 if kind == "product" else 0
    parts = [p for p in parts if self.n(p) != skip]
    if len(parts) == 1:
      return parts[0]
    sizes = [self.n(p) for p in parts]
    c = self.new(math.prod(sizes) if kind == "product" else sum(sizes))
    if parts:
      self.struct[c] = (kind, tuple(parts))
    return c

  def _bounds(self, c: int, off: int = 0) -> set[int]:
    c = self.find(c)
    st = self.struct[c]
    out: set[int] = set()
    if st is None or st[0] != "concat":
      return out
    for p in st[1]:
      out |= self._bounds(p, off)
      off += self.n(p)
      out.add(off)
    return out

  def union(self, a: int, b: int) -> int:
    a, b = self.find(a), self.find(b)
    if a == b:
      return a
    if self.size[a] != self.size[b]:  # never happens for well-typed jaxprs; refuse, don't crash
      self.mark(a, "is matched with an axis of another size")
      self.mark(b, "is matched with an axis of another size")
      return a
    sa, sb = self.struct[a], self.struct[b]
    self.parent[b] = a
    if sa is None:
      self.struct[a] = sb
    elif sb is None:
      pass
    elif sa[0] == sb[0] == "product" and [self.n(p) for p in sa[1]] == [self.n(p) for p in sb[1]]:
      for x, y in zip(sa[1], sb[1], strict=False):
        self.union(x, y)
    elif sa[0] == sb[0] == "concat":
      cuts = self._bounds(a) | self._bounds(b)
      xa = self._cut_parts(sa[1], cuts)
      xb = self._cut_parts(sb[1], cuts)
      if xa is None or xb is None or [s[:2] for s in xa] != [s[:2] for s in xb]:
        self.mark(a, "is split into parts in two incompatible ways")
      else:
        for (_, _, x), (_, _, y) in zip(xa, xb, strict=False):
          self.union(x, y)
    else:
      self.mark(a, "is split into parts (concatenate/slice) in one place and reshaped in another")
    return self.find(a)

  def _cut_parts(self, parts, cuts):
    out, off = [], 0
    for p in parts:
      m = self.n(p)
      sub = self.segments(p, [x - off for x in cuts])
      if sub is None:
        return None
      out += [(s + off, e + off, k) for s, e, k in sub]
      off += m
    return out

  def segments(self, c: int, cuts) -> list[tuple[int, int, int]] | None:
    """Partitions class ``c`` at positions ``cuts`` (an atom becomes a concat of new atoms).

    Returns ``[(start, stop, part)]`` covering the axis, or None when a cut falls inside a
    reshaped (product) part.
    """
    c = self.find(c)
    n = self.size[c]
    inner = sorted({int(x) for x in cuts if 0 < x < n})
    if not inner:
      return [(0, n, c)]
    st = self.struct[c]
    if st is None:
      bounds = [0, *inner, n]
      parts = tuple(self.new(e - s) for s, e in zip(bounds, bounds[1:], strict=False))
      self.struct[c] = ("concat", parts)
      return [(s, e, p) for s, e, p in zip(bounds, bounds[1:], parts, strict=False)]
    if st[0] == "product":
      return None
    return self._cut_parts(st[1], inner)

  def expand(self, c: int) -> list[tuple[int, np.ndarray]]:
    """The atoms of class ``c``: ``[(atom, index)]``, index = the atom's channel per position."""
    c = self.find(c)
    n = self.size[c]
    st = self.struct[c]
    if st is None:
      return [(c, np.arange(n))]
    out = []
    if st[0] == "concat":
      off = 0
      for p in st[1]:
        m = self.n(p)
        for a, idx in self.expand(p):
          full = np.full(n, -1)
          full[off:off + m] = idx
          out.append((a, full))
        off += m
    else:
      sizes = [self.n(p) for p in st[1]]
      for i, p in enumerate(st[1]):
        shape = [1] * len(sizes)
        shape[i] = sizes[i]
        for a, idx in self.expand(p):
          out.append((a, np.broadcast_to(idx.reshape(shape), sizes).reshape(-1)))
    return out

