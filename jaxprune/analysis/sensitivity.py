"""Layer sensitivity: prune one layer at a time and measure what it costs.

The table this produces (rows = prunable leaves, columns = sparsities, cells = change of loss or
accuracy) is the usual guide for choosing per-layer sparsities: layers whose accuracy barely
moves at 90% can be pruned hard, sensitive ones (often the first and last) lightly.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _tree
from jaxprune import masks as masks_lib
from jaxprune import scores as scores_lib
from jaxprune._typing import Params, PathLike, Scores, Where
from jaxprune.analysis import _format
from jaxprune.structure import Structure


class LayerSensitivity(NamedTuple):
  """Metrics with one layer pruned at a time.

  Attributes:
    layers: paths of the prunable leaves, in tree order (the rows).
    sparsities: the sparsities tried (the columns).
    baseline: ``{metric: value}`` of the unpruned params.
    values: ``{metric: (len(layers), len(sparsities)) float64 array}``, the metric with only
      that layer pruned to that sparsity.
  """
  layers: tuple[str, ...]
  sparsities: tuple[float, ...]
  baseline: dict[str, float]
  values: dict[str, np.ndarray]

  def change(self, metric: str) -> np.ndarray:
    """``values[metric] − baseline[metric]``, shape ``(len(layers), len(sparsities))``."""
    return self.values[metric] - self.baseline[metric]

  def to_markdown(self, metric: str | None = None) -> str:
    """One table per metric (or only ``metric``): cells are ``value (change)``."""
    names = list(self.values) if metric is None else [metric]
    tables = []
    for name in names:
      change = self.change(name)
      header = ["layer"] + [f"s={s:g}" for s in self.sparsities]
      rows = [[layer] + [f"{_format.fmt(v)} ({_format.signed(d)})"
                         for v, d in zip(self.values[name][i], change[i], strict=True)]
              for i, layer in enumerate(self.layers)]
      tables.append(f"{name} (unpruned: {_format.fmt(self.baseline[name])})\n\n"
                    + _format.markdown_table(header, rows))
    return "\n\n".join(tables)

  def __str__(self) -> str:
    return self.to_markdown()


def _as_metrics(out, what: str) -> dict[str, float]:
  if not isinstance(out, Mapping) or not out:
    raise ValueError(f"`evaluate_fn` must return a non-empty mapping {{metric: scalar}}; "
                     f"got {type(out).__name__} for {what}.")
  return {str(k): float(np.asarray(v)) for k, v in out.items()}


def layer_sensitivity(params: Params, evaluate_fn: Callable[[Params], Mapping[str, Any]],
                      sparsities: Sequence[float], *,
                      scores: Scores | Callable[..., Scores] | None = None,
                      structure: Structure | None = None,
                      where: Where | None = None) -> LayerSensitivity:
  """Prunes each prunable leaf alone at each sparsity and evaluates the model.

  For every leaf ``path`` that ``where`` selects and every ``s`` in ``sparsities``, the masks
  are ``jp.topk_mask(scores, {path: s, every other leaf: 0})`` — exactly ``round(s · n)`` units
  of that leaf removed and nothing else — and ``evaluate_fn(jp.apply_masks(params, masks))``
  is recorded. ``len(layers) · len(sparsities) + 1`` evaluations in all. The masks come from
  one jitted ``topk_mask`` whose per-leaf sparsities are traced (one compilation in all).

  Args:
    params: the trained (dense) parameter tree.
    evaluate_fn: ``params -> {metric: scalar}``, e.g. ``{"loss": ..., "accuracy": ...}`` on a
      held-out set. Jit it yourself; it is called with params of the same shapes every time.
    sparsities: the fractions to try, each in [0, 1].
    scores: a score tree like ``params``, or a callable ``(params, *, where) -> scores``;
      default :func:`jaxprune.magnitude_scores`.
    structure: a structure for :func:`jaxprune.topk_mask` (default unstructured).
    where: ``(path, leaf) -> bool`` choosing prunable leaves (default: floating, ``ndim >= 2``).

  Returns:
    A :class:`LayerSensitivity`; ``str()`` prints a table per metric.

  Raises:
    ValueError: for an empty ``sparsities``, a sparsity outside [0, 1], a ``where`` that selects
      nothing, or an ``evaluate_fn`` that does not return a mapping.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.analysis import layer_sensitivity
    >>> params = {"a": jnp.ones((2, 2)), "b": 2 * jnp.ones((2, 2))}
    >>> evaluate = lambda p: {"total": p["a"].sum() + p["b"].sum()}
    >>> t = layer_sensitivity(params, evaluate, [0.5, 1.0])
    >>> t.layers, t.baseline, t.change("total").tolist()
    (('a', 'b'), {'total': 12.0}, [[-2.0, -4.0], [-4.0, -8.0]])
  """
  sparsities = tuple(float(s) for s in sparsities)
  if not sparsities:
    raise ValueError("`sparsities` is empty.")
  for s in sparsities:
    if not 0.0 <= s <= 1.0:
      raise ValueError(f"`sparsities` holds {s}, outside [0, 1].")
  paths, _, _, chosen = _tree.selected(params, where)
  layers = tuple(p for p, c in zip(paths, chosen, strict=True) if c)
  if scores is None:
    scores = scores_lib.magnitude_scores
  if callable(scores):
    scores = scores(params, where=where)
  row = {layer: i for i, layer in enumerate(layers)}

  @jax.jit
  def masks_for(scores, per_layer):
    # One compilation for every (layer, sparsity): the sparsities are a traced vector that is
    # zero everywhere except at the layer being pruned.
    return masks_lib.topk_mask(scores, lambda path, leaf: per_layer[row[path]],
                               structure=structure, where=where)

  baseline = _as_metrics(evaluate_fn(params), "the unpruned params")
  values = {k: np.zeros((len(layers), len(sparsities))) for k in baseline}
  for i, layer in enumerate(layers):
    for j, s in enumerate(sparsities):
      masks = masks_for(scores, jnp.zeros(len(layers), jnp.float32).at[i].set(s))
      out = _as_metrics(evaluate_fn(masks_lib.apply_masks(params, masks)),
                        f"'{layer}' at sparsity {s}")
      if set(out) != set(baseline):
        raise ValueError(f"`evaluate_fn` returned metrics {sorted(out)} for '{layer}' at "
                         f"sparsity {s} but {sorted(baseline)} for the unpruned params.")
      for k, v in out.items():
        values[k][i, j] = v
  return LayerSensitivity(layers=layers, sparsities=sparsities, baseline=baseline,
                          values=values)


def plot_layer_sensitivity(table: LayerSensitivity, path: PathLike, *,
                           metric: str | None = None) -> str:
  """Saves a heatmap of the change of ``metric`` (rows = layers, columns = sparsities).

  Red marks harm: a drop for accuracy-like metrics, a rise for metrics named ``*loss*``.

  Args:
    table: the output of :func:`layer_sensitivity`.
    path: where to write the image (format from the suffix, e.g. ``.png``).
    metric: which metric; default ``"accuracy"`` if present, else the first one.

  Returns:
    ``path`` as a string.

  Examples:
    >>> import os, tempfile, jax.numpy as jnp
    >>> from jaxprune.analysis import layer_sensitivity, plot_layer_sensitivity
    >>> t = layer_sensitivity({"w": jnp.ones((2, 2))}, lambda p: {"sum": p["w"].sum()}, [0.5])
    >>> out = plot_layer_sensitivity(t, os.path.join(tempfile.mkdtemp(), "sens.png"))
    >>> os.path.getsize(out) > 0
    True
  """
  if metric is None:
    metric = "accuracy" if "accuracy" in table.values else next(iter(table.values))
  if metric not in table.values:
    raise ValueError(f"metric {metric!r} not in the table (has {sorted(table.values)}).")
  change = table.change(metric)
  lim = float(np.nanmax(np.abs(change))) if change.size else 0.0
  lim = lim if lim > 0 else 1.0
  fig = _format.new_figure(figsize=(1.2 + 0.9 * len(table.sparsities),
                                    1.0 + 0.45 * len(table.layers)))
  ax = fig.add_subplot(1, 1, 1)
  cmap = "RdBu_r" if "loss" in metric else "RdBu"   # red = worse: loss up, accuracy down
  im = ax.imshow(change, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
  ax.set_xticks(range(len(table.sparsities)), [f"{s:g}" for s in table.sparsities])
  ax.set_yticks(range(len(table.layers)), table.layers, fontsize=7)
  ax.set_xlabel("sparsity of the one pruned layer")
  for i in range(change.shape[0]):
    for j in range(change.shape[1]):
      ax.text(j, i, f"{change[i, j]:+.3f}", ha="center", va="center", fontsize=6)
  fig.colorbar(im, ax=ax, label=f"change of {metric}")
  ax.set_title(f"{metric} change, one layer pruned at a time", fontsize=9)
  return _format.save_figure(fig, path)
