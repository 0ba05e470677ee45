"""``dense``: ``optax.adam`` (AdamW with ``weight_decay > 0``), no pruning: the baseline."""

from train.recipes.base import Recipe, register


@register("dense")
class Dense(Recipe):
  """Dense training: the base recipe as it is, ``where`` only used to report."""
  prunes = False
