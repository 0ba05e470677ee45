"""Seed sensitivity: how much accuracy, per-class accuracy and the masks vary across seeds.

The same recipe run with different seeds gives different accuracies and, often, very different
masks. :func:`seed_spread` summarises the accuracies; :func:`mask_overlap` and
:func:`pairwise_mask_overlap` measure how much the kept weights agree (Jaccard index of the
kept sets, per layer).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxprune import _tree
from jaxprune._typing import ArrayLike, Masks
from jaxprune.analysis import _format


def mask_overlap(masks_a: Masks, masks_b: Masks) -> dict[str, float]:
  """Per-layer Jaccard index of the kept sets of two mask trees.

  For a leaf with masks ``A`` and ``B`` (True = kept): ``|A ∧ B| / |A ∨ B|``; 1.0 when both
  prune everything. Only pruned leaves are reported, i.e. leaves whose mask is an array in at
  least one tree; a scalar ``True`` (an unpruned leaf) counts as all kept.

  Args:
    masks_a: a mask tree (bool leaves, as from :func:`jaxprune.topk_mask`).
    masks_b: a mask tree with the same structure and shapes.

  Returns:
    ``{path: jaccard}`` with Python floats, in tree order.

  Raises:
    ValueError: if the trees or a leaf's shapes differ (naming the path).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.analysis import mask_overlap
    >>> a = {"w": jnp.array([True, True, False, False]), "b": jnp.array(True)}
    >>> b = {"w": jnp.array([True, False, True, False]), "b": jnp.array(True)}
    >>> mask_overlap(a, b)
    {'w': 0.3333333333333333}
  """
  _tree.check_same_structure(masks_a, masks_b, "masks_a", "masks_b")
  paths, leaves_a, _ = _tree.flatten(masks_a)
  _, leaves_b, _ = _tree.flatten(masks_b)
  out = {}
  for path, a, b in zip(paths, leaves_a, leaves_b, strict=True):
    if np.ndim(a) == 0 and np.ndim(b) == 0:
      continue
    shape_a, shape_b = np.shape(a), np.shape(b)
    if np.ndim(a) and np.ndim(b) and shape_a != shape_b:
      raise ValueError(f"masks differ in shape at '{path}': {shape_a} vs {shape_b}.")
    shape = shape_a if np.ndim(a) else shape_b
    a = jnp.broadcast_to(jnp.asarray(a, bool), shape)
    b = jnp.broadcast_to(jnp.asarray(b, bool), shape)
    union = int(jnp.sum(a | b))
    out[path] = 1.0 if union == 0 else int(jnp.sum(a & b)) / union
  return out


class MaskOverlap(NamedTuple):
  """Pairwise Jaccard indices of several mask trees (e.g. one per seed).

  Attributes:
    matrix: ``{path: (num_trees, num_trees) float64 array}``, symmetric, ones on the diagonal.
    mean: ``{path: mean over the pairs i < j}``.
  """
  matrix: dict[str, np.ndarray]
  mean: dict[str, float]

  def to_markdown(self) -> str:
    """One row per layer: mean, min and max pairwise Jaccard."""
    rows = []
    for path, m in self.matrix.items():
      off = m[np.triu_indices(m.shape[0], k=1)]
      rows.append([path, _format.fmt(self.mean[path]), _format.fmt(off.min()),
                   _format.fmt(off.max())])
    return _format.markdown_table(["layer", "mean Jaccard", "min", "max"], rows)

  def __str__(self) -> str:
    return self.to_markdown()


def pairwise_mask_overlap(mask_trees: Sequence[Masks]) -> MaskOverlap:
  """Jaccard index of the kept sets for every pair of mask trees, per layer.

  Args:
    mask_trees: two or more mask trees with the same structure (e.g. the masks the same recipe
      found with different seeds).

  Returns:
    A :class:`MaskOverlap`; ``mean[path]`` is the mean over the ``n (n − 1) / 2`` pairs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.analysis import pairwise_mask_overlap
    >>> trees = [{"w": jnp.array([True, False])}, {"w": jnp.array([True, False])},
    ...          {"w": jnp.array([False, True])}]
    >>> r = pairwise_mask_overlap(trees)
    >>> r.matrix["w"].tolist(), r.mean["w"]
    ([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], 0.3333333333333333)
  """
  trees = list(mask_trees)
  if len(trees) < 2:
    raise ValueError(f"`mask_trees` needs at least two mask trees; got {len(trees)}.")
  n = len(trees)
  matrix: dict[str, np.ndarray] = {}
  for i in range(n):
    for j in range(i + 1, n):
      for path, value in mask_overlap(trees[i], trees[j]).items():
        m = matrix.setdefault(path, np.eye(n))
        m[i, j] = m[j, i] = value
  mean = {p: float(m[np.triu_indices(n, k=1)].mean()) for p, m in matrix.items()}
  return MaskOverlap(matrix=matrix, mean=mean)


class SeedSpread(NamedTuple):
  """Spread of a recipe's results over seeds.

  Attributes:
    num_seeds: number of runs.
    mean, std, min, max: of the overall accuracy (Python floats; ``std`` with ``ddof``).
    per_class_mean, per_class_std, per_class_min, per_class_max: ``(num_classes,)`` arrays of
      the per-class accuracy across seeds, or None.
  """
  num_seeds: int
  mean: float
  std: float
  min: float
  max: float
  per_class_mean: np.ndarray | None = None
  per_class_std: np.ndarray | None = None
  per_class_min: np.ndarray | None = None
  per_class_max: np.ndarray | None = None

  def to_markdown(self) -> str:
    """The overall row, then one row per class when given."""
    rows = [["all", _format.fmt(self.mean), _format.fmt(self.std), _format.fmt(self.min),
             _format.fmt(self.max)]]
    if self.per_class_mean is not None:
      rows += [[str(c), _format.fmt(self.per_class_mean[c]), _format.fmt(self.per_class_std[c]),
                _format.fmt(self.per_class_min[c]), _format.fmt(self.per_class_max[c])]
               for c in range(len(self.per_class_mean))]
    return (f"{self.num_seeds} seeds\n\n"
            + _format.markdown_table(["class", "mean acc", "std", "min", "max"], rows))

  def __str__(self) -> str:
    return self.to_markdown()


def seed_spread(accuracies: ArrayLike, per_class_accuracies: ArrayLike | None = None, *,
                ddof: int = 0) -> SeedSpread:
  """Mean, standard deviation, min and max of accuracies over seeds.

  Args:
    accuracies: overall accuracy of each run, shape ``(num_seeds,)``.
    per_class_accuracies: optional ``(num_seeds, num_classes)`` (e.g. the ``accuracy`` of
      :func:`per_group_metrics` for each seed).
    ddof: delta degrees of freedom of the standard deviation: 0 (default) divides by
      ``num_seeds``, 1 gives the sample standard deviation (needs two seeds or more).

  Returns:
    A :class:`SeedSpread`.

  Examples:
    >>> from jaxprune.analysis import seed_spread
    >>> s = seed_spread([0.5, 0.75, 1.0])
    >>> s.mean, s.min, s.max
    (0.75, 0.5, 1.0)
  """
  acc = np.asarray(accuracies, np.float64)
  if acc.ndim != 1 or acc.size == 0:
    raise ValueError(f"`accuracies` must be a non-empty 1-D array; got shape {acc.shape}.")
  if acc.size <= ddof:
    raise ValueError(f"`ddof`={ddof} needs more than {ddof} seeds; got {acc.size}.")
  out = dict(num_seeds=int(acc.size), mean=float(acc.mean()), std=float(acc.std(ddof=ddof)),
             min=float(acc.min()), max=float(acc.max()))
  if per_class_accuracies is not None:
    pc = np.asarray(per_class_accuracies, np.float64)
    if pc.ndim != 2 or pc.shape[0] != acc.size:
      raise ValueError(f"`per_class_accuracies` must have shape ({acc.size}, num_classes); "
                       f"got {pc.shape}.")
    out.update(per_class_mean=pc.mean(0), per_class_std=pc.std(0, ddof=ddof),
               per_class_min=pc.min(0), per_class_max=pc.max(0))
  return SeedSpread(**out)
