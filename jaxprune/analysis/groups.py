"""Per-class and per-group cost of pruning: accuracy, recall, precision, loss, and their change.

Pruning can keep the overall accuracy of a model while hurting some classes or groups of
examples much more than others (Tran et al., 2022). :func:`per_group_metrics` measures one model
per group; :func:`disparate_impact` compares a dense and a pruned model on the same data.

Groups are the classes by default (``groups=None``), or any integer id per example that the
user gives (a protected attribute, a data source, a cluster, ...).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import _tree
from jaxprune._typing import ArrayLike
from jaxprune.analysis import _format


class GroupMetrics(NamedTuple):
  """Metrics of one model, per group. Group arrays have shape ``(num_groups,)``.

  Attributes:
    count: int32, number of examples in each group.
    accuracy: float32, fraction of the group's examples predicted correctly; NaN for an empty
      group. When the groups are the classes this is the per-class **recall** (also available
      as the ``recall`` property).
    loss: float32, mean softmax cross-entropy over the group's examples; NaN for an empty group;
      ``None`` when the model was given as predictions instead of logits.
    precision: float32, per-class precision (correct predictions of class ``c`` over all
      predictions of ``c``; NaN when ``c`` is never predicted); only when the groups are the
      classes, else ``None``.
    overall_accuracy: float32 scalar, accuracy over all examples.
    overall_loss: float32 scalar, mean cross-entropy over all examples, or ``None``.
  """
  count: jax.Array
  accuracy: jax.Array
  loss: jax.Array | None
  precision: jax.Array | None
  overall_accuracy: jax.Array
  overall_loss: jax.Array | None

  @property
  def recall(self) -> jax.Array:
    """Per-group recall: the accuracy on the group's examples (per-class recall for classes)."""
    return self.accuracy

  def to_markdown(self) -> str:
    """A table with one row per group and a final ``all`` row."""
    header = ["group", "n", "accuracy"]
    header += ["loss"] if self.loss is not None else []
    header += ["precision"] if self.precision is not None else []
    rows = []
    for g in range(len(np.asarray(self.count))):
      row = [str(g), _format.fmt(self.count[g]), _format.fmt(self.accuracy[g])]
      row += [_format.fmt(self.loss[g])] if self.loss is not None else []
      row += [_format.fmt(self.precision[g])] if self.precision is not None else []
      rows.append(row)
    total = [_format.fmt(np.asarray(self.count).sum()), _format.fmt(self.overall_accuracy)]
    total += [_format.fmt(self.overall_loss)] if self.loss is not None else []
    total += ["-"] if self.precision is not None else []
    rows.append(["all"] + total)
    return _format.markdown_table(header, rows)

  def __str__(self) -> str:
    return self.to_markdown()


class DisparateImpact(NamedTuple):
  """How pruning changed each group (Tran et al., 2022). Group arrays: ``(num_groups,)``.

  A group's *drop* is ``dense accuracy − pruned accuracy`` (positive: pruning hurt it); empty
  groups (NaN) are ignored by the summaries.

  Attributes:
    dense: :class:`GroupMetrics` of the dense model.
    pruned: :class:`GroupMetrics` of the pruned model.
    accuracy_change: ``pruned.accuracy − dense.accuracy`` (negative: pruning hurt the group);
      for classes this is also the change of recall.
    precision_change: ``pruned.precision − dense.precision`` for classes, else ``None``.
    excess_loss: ``pruned.loss − dense.loss`` per group, the *excess loss* of Tran et al.;
      ``None`` unless both models were given as logits.
    worst_group: int32 scalar, the group with the largest drop (smallest id on ties).
    worst_group_drop: float32 scalar, that largest drop ``max_g (dense_g − pruned_g)``.
    gap: float32 scalar, ``max_g drop_g − min_g drop_g``: the spread between the most- and the
      least-hurt group (0 when pruning changes every group equally).
    overall_accuracy_change: float32 scalar, change of the overall accuracy.
  """
  dense: GroupMetrics
  pruned: GroupMetrics
  accuracy_change: jax.Array
  precision_change: jax.Array | None
  excess_loss: jax.Array | None
  worst_group: jax.Array
  worst_group_drop: jax.Array
  gap: jax.Array
  overall_accuracy_change: jax.Array

  def to_markdown(self) -> str:
    """A per-group table (dense, pruned, change, losses) followed by the summary line."""
    with_loss = self.excess_loss is not None
    header = ["group", "n", "dense acc", "pruned acc", "Δ acc"]
    header += ["dense loss", "pruned loss", "excess loss"] if with_loss else []
    header += ["Δ precision"] if self.precision_change is not None else []
    rows = []
    for g in range(len(np.asarray(self.dense.count))):
      row = [str(g), _format.fmt(self.dense.count[g]), _format.fmt(self.dense.accuracy[g]),
             _format.fmt(self.pruned.accuracy[g]), _format.signed(self.accuracy_change[g])]
      if with_loss:
        row += [_format.fmt(self.dense.loss[g]), _format.fmt(self.pruned.loss[g]),
                _format.signed(self.excess_loss[g])]
      if self.precision_change is not None:
        row += [_format.signed(self.precision_change[g])]
      rows.append(row)
    summary = (f"overall accuracy {_format.fmt(self.dense.overall_accuracy)} -> "
               f"{_format.fmt(self.pruned.overall_accuracy)} "
               f"({_format.signed(self.overall_accuracy_change)}); worst group "
               f"{int(self.worst_group)} drops {_format.fmt(self.worst_group_drop)}; "
               f"gap between most- and least-hurt groups {_format.fmt(self.gap)}")
    return _format.markdown_table(header, rows) + "\n\n" + summary

  def __str__(self) -> str:
    return self.to_markdown()


def _group_mean(values: jax.Array, groups: jax.Array, num_groups: int) -> jax.Array:
  """Mean of ``values`` within each group; NaN for empty groups."""
  total = jax.ops.segment_sum(values, groups, num_segments=num_groups)
  count = jax.ops.segment_sum(jnp.ones_like(values), groups, num_segments=num_groups)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


def _split_model_output(logits_or_preds, name: str):
  """Returns ``(preds, logits_or_None)`` and checks the shape."""
  x = jnp.asarray(logits_or_preds)
  if x.ndim == 2 and jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.argmax(x, axis=-1).astype(jnp.int32), x
  if x.ndim == 1 and jnp.issubdtype(x.dtype, jnp.integer):
    return x.astype(jnp.int32), None
  raise ValueError(f"`{name}` must be float logits of shape (num_examples, num_classes) or "
                   f"integer predictions of shape (num_examples,); got shape {x.shape}, "
                   f"dtype {x.dtype}.")


def _num_ids(arrays, given: int | None, name: str) -> int:
  """``given`` or ``max(arrays) + 1`` (needs concrete arrays)."""
  if given is not None:
    return int(given)
  if any(_tree.is_traced(a) for a in arrays):
    raise ValueError(f"`{name}` must be given when the inputs are traced (under jax.jit).")
  return int(max(int(np.max(np.asarray(a), initial=-1)) for a in arrays)) + 1


def per_group_metrics(logits_or_preds: ArrayLike, labels: ArrayLike,
                      groups: ArrayLike | None = None, *, num_groups: int | None = None,
                      num_classes: int | None = None) -> GroupMetrics:
  """Accuracy, recall, precision and cross-entropy of one model, per class or per group.

  For group ``g`` with examples ``S_g``: ``accuracy_g = |{i ∈ S_g : pred_i = label_i}| / |S_g|``
  and ``loss_g = mean_{i ∈ S_g} CE(logits_i, label_i)`` (softmax cross-entropy). With
  ``groups=None`` the groups are the classes, ``accuracy_g`` is the recall of class ``g``, and
  the per-class precision ``|{i : pred_i = label_i = g}| / |{i : pred_i = g}|`` is added.

  Jit-able when ``num_groups`` (and, for class groups with integer predictions,
  ``num_classes``) is given; pass them as static arguments.

  Args:
    logits_or_preds: float logits ``(num_examples, num_classes)`` (predictions are their argmax,
      first index on ties) or integer predictions ``(num_examples,)`` (then ``loss`` is None).
    labels: integer labels ``(num_examples,)``.
    groups: optional integer group id per example ``(num_examples,)``; default: the labels.
    num_groups: number of groups (ids in ``[0, num_groups)``); default ``max(groups) + 1``,
      or the number of classes when ``groups`` is None.
    num_classes: number of classes when predictions are given and ``groups`` is None; default
      ``max(labels, preds) + 1``. Ignored with logits (their last axis).

  Returns:
    A :class:`GroupMetrics`.

  Raises:
    ValueError: on shapes that disagree, or ids outside ``[0, num_groups)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.analysis import per_group_metrics
    >>> preds, labels = jnp.array([0, 1, 1, 1, 1, 0]), jnp.array([0, 0, 1, 1, 1, 1])
    >>> m = per_group_metrics(preds, labels)
    >>> m.count.tolist(), m.recall.tolist(), m.precision.tolist()
    ([2, 4], [0.5, 0.75], [0.5, 0.75])

  References:
    Tran, Fioretto, Kim and Naidu, "Pruning has a disparate impact on model accuracy",
    NeurIPS 2022.
  """
  preds, logits = _split_model_output(logits_or_preds, "logits_or_preds")
  labels_np = _format.as_int_vector(labels, "labels")
  labels = jnp.asarray(labels).astype(jnp.int32)
  if labels.shape != preds.shape:
    raise ValueError(f"`labels` has shape {labels.shape} but the model gives "
                     f"{preds.shape[0]} examples.")
  if logits is not None:
    num_classes = logits.shape[-1]
  elif num_classes is None and groups is None:
    num_classes = num_groups
  if num_classes is None and not (_tree.is_traced(labels) or _tree.is_traced(preds)):
    num_classes = _num_ids([labels, preds], None, "num_classes")
  if num_classes is None and groups is None:
    raise ValueError("`num_groups` (or `num_classes`) must be given when the inputs are traced "
                     "(under jax.jit).")
  if num_classes is not None:   # not needed for user groups under jit: only range checks use it
    _format.check_range(labels_np, num_classes, "labels")
    if logits is None:
      _format.check_range(_format.as_int_vector(preds, "logits_or_preds"), num_classes,
                          "logits_or_preds")

  if groups is None:
    if num_groups is not None and int(num_groups) != num_classes:
      raise ValueError(f"`num_groups`={num_groups} but the groups are the {num_classes} classes.")
    num_groups, group_ids = num_classes, labels
  else:
    groups_np = _format.as_int_vector(groups, "groups")
    group_ids = jnp.asarray(groups).astype(jnp.int32)
    if group_ids.shape != labels.shape:
      raise ValueError(f"`groups` has shape {group_ids.shape}; `labels` has {labels.shape}.")
    num_groups = _num_ids([group_ids], num_groups, "num_groups")
    _format.check_range(groups_np, num_groups, "groups")

  correct = (preds == labels).astype(jnp.float32)
  count = jax.ops.segment_sum(jnp.ones_like(labels), group_ids, num_segments=num_groups)
  accuracy = _group_mean(correct, group_ids, num_groups)
  loss = overall_loss = precision = None
  if logits is not None:
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    loss = _group_mean(per_example, group_ids, num_groups)
    overall_loss = jnp.mean(per_example)
  if groups is None:
    precision = _group_mean(correct, preds, num_classes)
  return GroupMetrics(count=count, accuracy=accuracy, loss=loss, precision=precision,
                      overall_accuracy=jnp.mean(correct), overall_loss=overall_loss)


def disparate_impact(dense_logits: ArrayLike, pruned_logits: ArrayLike, labels: ArrayLike,
                     groups: ArrayLike | None = None, *,
                     num_groups: int | None = None,
                     num_classes: int | None = None) -> DisparateImpact:
  """Per-class (or per-group) change caused by pruning, as measured by Tran et al. (2022).

  Both models are evaluated on the same examples. For each group ``g``:

  - ``accuracy_change_g = acc_pruned_g − acc_dense_g`` (for classes: the change of recall);
  - ``drop_g = −accuracy_change_g``; ``worst_group_drop = max_g drop_g`` and
    ``gap = max_g drop_g − min_g drop_g`` (Tran et al.'s disparity between the most- and the
    least-affected group);
  - ``excess_loss_g = loss_pruned_g − loss_dense_g`` (mean cross-entropy on the group), the
    quantity Tran et al. tie to disparate impact.

  Args:
    dense_logits: logits ``(num_examples, num_classes)`` or integer predictions of the dense
      model. With predictions the losses are ``None``.
    pruned_logits: the same for the pruned model.
    labels: integer labels ``(num_examples,)``.
    groups: optional integer group id per example; default: the classes.
    num_groups: as in :func:`per_group_metrics`.
    num_classes: as in :func:`per_group_metrics`.

  Returns:
    A :class:`DisparateImpact`; ``str()`` prints it as a markdown table.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.analysis import disparate_impact
    >>> labels = jnp.array([0, 0, 1, 1])
    >>> r = disparate_impact(jnp.array([0, 0, 1, 1]), jnp.array([0, 0, 0, 1]), labels)
    >>> r.accuracy_change.tolist(), int(r.worst_group), float(r.gap)
    ([0.0, -0.5], 1, 0.5)

  References:
    Tran, Fioretto, Kim and Naidu, "Pruning has a disparate impact on model accuracy",
    NeurIPS 2022.
  """
  if groups is None and num_classes is None and num_groups is None:
    # Both models must see the same classes, even when one never predicts the last one.
    outs = [_split_model_output(x, n)[0] for x, n in
            ((dense_logits, "dense_logits"), (pruned_logits, "pruned_logits"))]
    widths = [np.shape(x)[-1] for x in (dense_logits, pruned_logits) if np.ndim(x) == 2]
    num_classes = widths[0] if widths else _num_ids([labels, *outs], None, "num_classes")
  kw = dict(num_groups=num_groups, num_classes=num_classes)
  dense = per_group_metrics(dense_logits, labels, groups, **kw)
  pruned = per_group_metrics(pruned_logits, labels, groups, **kw)
  if dense.count.shape != pruned.count.shape:
    raise ValueError(f"`dense_logits` and `pruned_logits` give {dense.count.shape[0]} and "
                     f"{pruned.count.shape[0]} groups; pass `num_groups`.")
  change = pruned.accuracy - dense.accuracy
  drop = -change
  worst_drop = jnp.nanmax(drop)
  worst_group = jnp.argmax(jnp.where(jnp.isnan(drop), -jnp.inf, drop)).astype(jnp.int32)
  excess = None
  if dense.loss is not None and pruned.loss is not None:
    excess = pruned.loss - dense.loss
  precision_change = None
  if dense.precision is not None and pruned.precision is not None:
    precision_change = pruned.precision - dense.precision
  return DisparateImpact(
      dense=dense, pruned=pruned, accuracy_change=change, precision_change=precision_change,
      excess_loss=excess, worst_group=worst_group, worst_group_drop=worst_drop,
      gap=worst_drop - jnp.nanmin(drop),
      overall_accuracy_change=pruned.overall_accuracy - dense.overall_accuracy)
