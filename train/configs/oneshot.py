"""One-shot magnitude pruning, then fine-tuning with the masks fixed.

Dense training until ``pruning.at_step``; there the smallest-magnitude weights are removed
(``jp.magnitude_pruning(jp.one_shot_schedule(sparsity, at_step), ...)``, the last link of the
optax chain) and training continues with those weights held at exactly zero.
"""

from train.configs import default


def get_config():
  """One-shot pruning to 90% (ERK allocation) at half of the training budget."""
  config = default.get_config()
  p = config.pruning
  p.method = "oneshot"
  p.sparsity = 0.9
  p.at_step = config.get_ref("num_steps") // 2
  p.structure = "unstructured"  # "unstructured", "channels", "per_output", "2:4" (N:M), "4x4"
  p.scope = "layerwise"         # or "global"
  p.distribution = "erk"        # or "uniform" (with scope="layerwise")
  return config
