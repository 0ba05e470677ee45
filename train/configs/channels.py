"""Structured pruning while training, then shrink, then fine-tune the smaller model.

1. Gradually remove whole channels (conv output channels, hidden units, attention heads):
   every ``update_every`` steps between ``begin_step`` and ``end_step``, each coupled channel
   group that ``jaxprune.surgery.channel_groups`` finds (e.g. a conv's output channels together
   with the next conv's input rows) loses its lowest-norm channels
   (``jaxprune.surgery.group_masks``), following a cubic schedule to ``sparsity`` (the fraction
   of channels removed from every group).
2. ``jaxprune.surgery.shrink_module`` turns the masked model into a physically smaller one.
3. The small model is fine-tuned (dense) for ``finetune_steps`` more steps.
"""

from train.configs import default


def get_config():
  """Removes 50% of the channels of every group, then fine-tunes for 1000 steps."""
  config = default.get_config()
  p = config.pruning
  p.method = "channels"
  p.sparsity = 0.5
  default.gradual_schedule(config)
  p.scope = "layerwise"  # or "global": one ranking over the channels of all groups
  p.finetune_steps = 1000
  return config
