"""Pruning-identified exemplars (PIEs): the examples a pruned population answers differently.

Hooker et al. (2019) train a population of dense models and a population of pruned models and
call an example a PIE when the two populations' *modal* (most frequent) predictions differ. PIEs
are few, concentrated in some classes, and tend to be atypical or ambiguous examples: looking at
them shows what pruning forgets.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _tree
from jaxprune._typing import ArrayLike, PathLike
from jaxprune.analysis import _format


class Exemplars(NamedTuple):
  """Pruning-identified exemplars of one dense and one pruned population.

  Attributes:
    mask: bool ``(num_examples,)``, True for a PIE.
    count: int32 scalar, number of PIEs.
    dense_modal: int32 ``(num_examples,)``, modal prediction of the dense population.
    pruned_modal: int32 ``(num_examples,)``, modal prediction of the pruned population.
    class_counts: int32 ``(num_classes,)``, PIEs per true class; None without labels.
    class_fraction: float32 ``(num_classes,)``, PIEs per true class over the class size (NaN
      for a class with no example); None without labels.
  """
  mask: jax.Array
  count: jax.Array
  dense_modal: jax.Array
  pruned_modal: jax.Array
  class_counts: jax.Array | None
  class_fraction: jax.Array | None

  def to_markdown(self) -> str:
    """The PIE count and, with labels, a per-class table."""
    head = f"{int(self.count)} pruning-identified exemplars of {self.mask.shape[0]} examples"
    if self.class_counts is None:
      return head
    rows = [[str(c), _format.fmt(self.class_counts[c]), _format.fmt(self.class_fraction[c])]
            for c in range(self.class_counts.shape[0])]
    return head + "\n\n" + _format.markdown_table(["class", "PIEs", "fraction of class"], rows)

  def __str__(self) -> str:
    return self.to_markdown()


def modal_prediction(preds: ArrayLike, num_classes: int) -> jax.Array:
  """The most frequent prediction per example over a population of models.

  Ties go to the smallest label (``argmax`` returns the first maximum).

  Args:
    preds: integer predictions ``(num_models, num_examples)``.
    num_classes: number of classes; labels lie in ``[0, num_classes)``.

  Returns:
    int32 ``(num_examples,)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.analysis import modal_prediction
    >>> modal_prediction(jnp.array([[0, 2], [1, 2], [1, 0]]), 3).tolist()
    [1, 2]
  """
  preds = jnp.asarray(preds, jnp.int32)
  rows = jnp.broadcast_to(jnp.arange(preds.shape[1], dtype=jnp.int32), preds.shape)
  votes = jnp.zeros((preds.shape[1], num_classes), jnp.int32).at[rows, preds].add(1)
  return jnp.argmax(votes, axis=-1).astype(jnp.int32)


def _check_population(preds, name: str) -> np.ndarray | None:
  if _tree.is_traced(preds):
    return None
  arr = np.asarray(preds)
  if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or arr.shape[0] == 0:
    raise ValueError(f"`{name}` must be integer predictions of shape (num_models, num_examples) "
                     f"with at least one model; got shape {arr.shape}, dtype {arr.dtype}.")
  return arr


def pruning_identified_exemplars(dense_preds: ArrayLike, pruned_preds: ArrayLike,
                                 labels: ArrayLike | None = None, *,
                                 num_classes: int | None = None) -> Exemplars:
  """Finds pruning-identified exemplars (Hooker et al., 2019).

  Example ``i`` is a PIE when the modal prediction of the dense population differs from the
  modal prediction of the pruned population. The mode of each population is taken per example;
  a tie between labels goes to the smallest label (so the result does not depend on the order
  of the models).

  Jit-able when ``num_classes`` is given (static).

  Args:
    dense_preds: integer predictions ``(num_dense_models, num_examples)``.
    pruned_preds: integer predictions ``(num_pruned_models, num_examples)``.
    labels: optional true labels ``(num_examples,)``, for the per-class distribution.
    num_classes: default ``max(preds, labels) + 1``.

  Returns:
    An :class:`Exemplars`.

  Raises:
    ValueError: on shapes that disagree or labels outside ``[0, num_classes)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.analysis import pruning_identified_exemplars
    >>> dense = jnp.array([[0, 1, 1], [0, 1, 1], [1, 1, 0]])
    >>> pruned = jnp.array([[0, 0, 1], [0, 0, 1]])
    >>> r = pruning_identified_exemplars(dense, pruned, jnp.array([0, 1, 1]))
    >>> r.mask.tolist(), int(r.count), r.class_counts.tolist()
    ([False, True, False], 1, [0, 1])

  References:
    Hooker, Courville, Clark, Dauphin and Frome, "What Do Compressed Deep Neural Networks
    Forget?", arXiv:1911.05248, 2019.
  """
  arrays = [_check_population(dense_preds, "dense_preds"),
            _check_population(pruned_preds, "pruned_preds")]
  dense_preds = jnp.asarray(dense_preds, jnp.int32)
  pruned_preds = jnp.asarray(pruned_preds, jnp.int32)
  if dense_preds.shape[1] != pruned_preds.shape[1]:
    raise ValueError(f"`dense_preds` has {dense_preds.shape[1]} examples, `pruned_preds` "
                     f"{pruned_preds.shape[1]}.")
  labels_np = None
  if labels is not None:
    labels_np = _format.as_int_vector(labels, "labels")
    labels = jnp.asarray(labels, jnp.int32)
    if labels.shape != (dense_preds.shape[1],):
      raise ValueError(f"`labels` has shape {labels.shape}; expected ({dense_preds.shape[1]},).")
    arrays.append(labels_np)
  if num_classes is None:
    if any(a is None for a in arrays):
      raise ValueError("`num_classes` must be given when the inputs are traced (under jax.jit).")
    num_classes = max(int(np.max(a, initial=-1)) for a in arrays) + 1
  for arr, name in zip(arrays, ("dense_preds", "pruned_preds", "labels"), strict=False):
    _format.check_range(arr, num_classes, name)

  dense_modal = modal_prediction(dense_preds, num_classes)
  pruned_modal = modal_prediction(pruned_preds, num_classes)
  mask = dense_modal != pruned_modal
  class_counts = class_fraction = None
  if labels is not None:
    class_counts = jax.ops.segment_sum(mask.astype(jnp.int32), labels, num_segments=num_classes)
    sizes = jax.ops.segment_sum(jnp.ones_like(labels), labels, num_segments=num_classes)
    class_fraction = jnp.where(sizes > 0, class_counts / jnp.maximum(sizes, 1), jnp.nan)
    class_fraction = class_fraction.astype(jnp.float32)
  return Exemplars(mask=mask, count=jnp.sum(mask, dtype=jnp.int32), dense_modal=dense_modal,
                   pruned_modal=pruned_modal, class_counts=class_counts,
                   class_fraction=class_fraction)


def plot_exemplar_gallery(x: ArrayLike, labels: ArrayLike | None, pie_mask: ArrayLike,
                          dense_modal: ArrayLike, pruned_modal: ArrayLike, path: PathLike, *,
                          max_examples: int = 16,
                          class_names: Sequence[str] | None = None) -> int:
  """Saves a grid of pruning-identified exemplars, each titled with its labels.

  1-D signals (``x`` of shape ``(num_examples, length)``, e.g. MNIST-1D's 40-sample sequences)
  are drawn as line plots; images (``(num_examples, h, w)`` or ``(num_examples, h, w, c)`` with
  ``c`` in 1, 3, 4) with ``imshow``. The first ``max_examples`` PIEs in dataset order are shown;
  with none, the figure says so.

  Args:
    x: the inputs, first axis = examples.
    labels: true labels ``(num_examples,)`` or None.
    pie_mask: bool ``(num_examples,)``, e.g. ``Exemplars.mask``.
    dense_modal: modal predictions of the dense population ``(num_examples,)``.
    pruned_modal: modal predictions of the pruned population ``(num_examples,)``.
    path: where to write the image (format from the suffix, e.g. ``.png``).
    max_examples: most panels drawn.
    class_names: optional sequence mapping a label to a name.

  Returns:
    The number of exemplars drawn.

  Examples:
    >>> import numpy as np, os, tempfile
    >>> from jaxprune.analysis import plot_exemplar_gallery
    >>> path = os.path.join(tempfile.mkdtemp(), "pies.png")
    >>> plot_exemplar_gallery(np.zeros((3, 40)), np.array([0, 1, 2]),
    ...                       np.array([True, False, True]), np.array([0, 1, 2]),
    ...                       np.array([1, 1, 0]), path)
    2

  References:
    Hooker et al., "What Do Compressed Deep Neural Networks Forget?", arXiv:1911.05248, 2019.
  """
  x = np.asarray(x)
  pie_mask = np.asarray(pie_mask, bool)
  if x.ndim not in (2, 3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3, 4)):
    raise ValueError(f"`x` must be (n, length) signals or (n, h, w[, c]) images with c in "
                     f"1, 3, 4; got shape {x.shape}.")
  if pie_mask.shape != (x.shape[0],):
    raise ValueError(f"`pie_mask` has shape {pie_mask.shape}; expected ({x.shape[0]},).")
  name = (lambda c: str(c)) if class_names is None else (lambda c: str(class_names[int(c)]))
  chosen = np.flatnonzero(pie_mask)[:max_examples]
  cols = max(1, min(4, len(chosen)))
  rows = max(1, math.ceil(len(chosen) / cols))
  fig = _format.new_figure(figsize=(3 * cols, 2.4 * rows))
  if len(chosen) == 0:
    ax = fig.add_subplot(1, 1, 1)
    ax.text(0.5, 0.5, "no pruning-identified exemplars", ha="center", va="center")
    ax.set_axis_off()
  for k, i in enumerate(chosen):
    ax = fig.add_subplot(rows, cols, k + 1)
    if x.ndim == 2:
      ax.plot(x[i], lw=1.2)
      ax.tick_params(labelsize=6)
    else:
      img = x[i][..., 0] if x.ndim == 4 and x.shape[-1] == 1 else x[i]
      ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
      ax.set_axis_off()
    truth = "" if labels is None else f"y={name(np.asarray(labels)[i])} "
    ax.set_title(f"#{i} {truth}dense={name(np.asarray(dense_modal)[i])} "
                 f"pruned={name(np.asarray(pruned_modal)[i])}", fontsize=7)
  fig.suptitle(f"pruning-identified exemplars ({len(chosen)} of {int(pie_mask.sum())} shown)",
               fontsize=9)
  _format.save_figure(fig, path)
  return int(len(chosen))
