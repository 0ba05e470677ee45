"""Accuracy vs sparsity: one curve per method, mean ± std over seeds."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np

from jaxprune._typing import PathLike
from jaxprune.analysis import _format


class Curve(NamedTuple):
  """One method's curve; arrays of shape ``(num_sparsities,)`` sorted by sparsity.

  Attributes:
    sparsity: float64, the sparsities measured.
    mean: float64, mean of the metric over seeds.
    std: float64, standard deviation over seeds (with the ``ddof`` asked for).
    num_seeds: int64, the number of runs at each sparsity.
  """
  sparsity: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  num_seeds: np.ndarray


class SparsityCurves(NamedTuple):
  """Curves of every method. ``curves`` maps a method name to its :class:`Curve`."""
  curves: dict[str, Curve]
  metric: str = "accuracy"

  def to_markdown(self) -> str:
    """One row per (method, sparsity): seeds, mean and std."""
    rows = [[method, _format.fmt(float(s)), _format.fmt(int(n)), _format.fmt(float(m)),
             _format.fmt(float(sd))]
            for method, c in self.curves.items()
            for s, m, sd, n in zip(c.sparsity, c.mean, c.std, c.num_seeds, strict=True)]
    return _format.markdown_table(
        ["method", "sparsity", "seeds", f"mean {self.metric}", "std"], rows)

  def __str__(self) -> str:
    return self.to_markdown()


def accuracy_vs_sparsity(records: Iterable[Mapping], *, metric: str = "accuracy",
                         ddof: int = 0) -> SparsityCurves:
  """Aggregates runs into mean ± std curves, per method and sparsity.

  Args:
    records: one mapping per run with keys ``method`` (any hashable, used as a name),
      ``sparsity``, ``seed`` and ``metric``; other keys are ignored.
    metric: the key to aggregate (default ``"accuracy"``; e.g. ``"loss"``).
    ddof: delta degrees of freedom of the standard deviation (0 divides by the number of
      seeds; 1 gives the sample standard deviation, and a point with one seed gets NaN).

  Returns:
    A :class:`SparsityCurves`; methods in order of first appearance, sparsities sorted.

  Raises:
    ValueError: if a record lacks a key, or the same (method, sparsity, seed) appears twice.

  Examples:
    >>> from jaxprune.analysis import accuracy_vs_sparsity
    >>> runs = [dict(method="gmp", sparsity=0.9, seed=s, accuracy=a)
    ...         for s, a in enumerate([0.5, 0.75, 1.0])]
    >>> c = accuracy_vs_sparsity(runs).curves["gmp"]
    >>> c.mean.tolist(), c.num_seeds.tolist()
    ([0.75], [3])
  """
  groups: dict[object, dict[float, dict[object, float]]] = {}
  for i, rec in enumerate(records):
    for key in ("method", "sparsity", "seed", metric):
      if key not in rec:
        raise ValueError(f"records[{i}] has no key '{key}' (keys: {sorted(map(str, rec))}).")
    by_seed = groups.setdefault(rec["method"], {}).setdefault(float(rec["sparsity"]), {})
    if rec["seed"] in by_seed:
      raise ValueError(f"records[{i}] repeats method={rec['method']!r}, "
                       f"sparsity={rec['sparsity']}, seed={rec['seed']!r}.")
    by_seed[rec["seed"]] = float(rec[metric])
  curves = {}
  for method, points in groups.items():
    sparsities = sorted(points)
    values = [np.asarray(list(points[s].values()), np.float64) for s in sparsities]
    std = [v.std(ddof=ddof) if v.size > ddof else np.nan for v in values]
    curves[str(method)] = Curve(
        sparsity=np.asarray(sparsities, np.float64),
        mean=np.asarray([v.mean() for v in values], np.float64),
        std=np.asarray(std, np.float64),
        num_seeds=np.asarray([v.size for v in values], np.int64))
  return SparsityCurves(curves=curves, metric=metric)


def plot_accuracy_vs_sparsity(curves: SparsityCurves, path: PathLike, *, dense: float | None = None,
                              title: str | None = None) -> str:
  """Plots every method's mean with a ±std band against sparsity and saves it.

  Args:
    curves: the output of :func:`accuracy_vs_sparsity`.
    path: where to write the image (format from the suffix, e.g. ``.png``).
    dense: optional metric of the dense model, drawn as a dashed horizontal line.
    title: optional figure title.

  Returns:
    ``path`` as a string.

  Examples:
    >>> import os, tempfile
    >>> from jaxprune.analysis import accuracy_vs_sparsity, plot_accuracy_vs_sparsity
    >>> runs = [dict(method="gmp", sparsity=s, seed=0, accuracy=1 - s) for s in (0.5, 0.9)]
    >>> out = plot_accuracy_vs_sparsity(accuracy_vs_sparsity(runs),
    ...                                 os.path.join(tempfile.mkdtemp(), "curve.png"))
    >>> os.path.getsize(out) > 0
    True
  """
  fig = _format.new_figure(figsize=(5.5, 3.8))
  ax = fig.add_subplot(1, 1, 1)
  for method, c in curves.curves.items():
    (line,) = ax.plot(c.sparsity, c.mean, marker="o", ms=3, label=method)
    std = np.nan_to_num(c.std)
    ax.fill_between(c.sparsity, c.mean - std, c.mean + std, color=line.get_color(), alpha=0.2)
  if dense is not None:
    ax.axhline(dense, color="k", ls="--", lw=1, label="dense")
  ax.set_xlabel("sparsity (fraction removed)")
  ax.set_ylabel(curves.metric)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title)
  return _format.save_figure(fig, path)
