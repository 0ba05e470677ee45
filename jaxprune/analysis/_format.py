"""Markdown tables, input checks and a pyplot-free figure factory shared by the analysis modules."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from jaxprune import _tree


def fmt(x, digits: int = 4) -> str:
  """Formats a table cell: ``-`` for None, ints as ints, floats with ``digits`` decimals."""
  if x is None:
    return "-"
  if isinstance(x, str):
    return x
  arr = np.asarray(x)
  if arr.dtype.kind in "biu":
    return str(int(arr))
  value = float(arr)
  return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def signed(x, digits: int = 4) -> str:
  """Formats a change with an explicit sign (``+0.0100``)."""
  if x is None:
    return "-"
  x = float(np.asarray(x))
  return "nan" if math.isnan(x) else f"{x:+.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A GitHub-markdown table from a header and rows of already formatted cells."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def as_int_vector(x, name: str) -> np.ndarray | None:
  """Checks that a concrete ``x`` is a 1-D integer array; returns it as numpy (None if traced)."""
  if _tree.is_traced(x):
    return None
  arr = np.asarray(x)
  if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"`{name}` must be a 1-D integer array; got shape {arr.shape}, "
                     f"dtype {arr.dtype}.")
  return arr


def check_range(arr: np.ndarray | None, upper: int, name: str) -> None:
  """Raises ``ValueError`` if a concrete integer array has values outside ``[0, upper)``."""
  if arr is None or arr.size == 0:
    return
  lo, hi = int(arr.min()), int(arr.max())
  if lo < 0 or hi >= upper:
    raise ValueError(f"`{name}` must hold ids in [0, {upper}); got values in [{lo}, {hi}].")


def new_figure(**kwargs):
  """A ``matplotlib.figure.Figure`` (no pyplot, so no global state and no GUI backend).

  matplotlib is an optional dependency of jaxprune: it is imported here, on first use.
  """
  try:
    from matplotlib.figure import Figure
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("jaxprune's plots need matplotlib: pip install matplotlib") from e
  return Figure(**kwargs)


def save_figure(fig, path) -> str:
  """Saves ``fig`` to ``path`` (format from the suffix, PNG by default) and returns the path."""
  fig.savefig(str(path), dpi=100, bbox_inches="tight")
  return str(path)
