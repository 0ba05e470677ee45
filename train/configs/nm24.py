"""2:4 semi-structured sparsity: one-shot N:M magnitude pruning, then fine-tuning.

The one-shot recipe with ``structure="2:4"`` (``jp.n_of_m(2, 4)``: in every group of 4
consecutive weights along a kernel's input axis, 2 are kept) and sparsity 0.5. Kernels whose
input axis is not a multiple of 4 (e.g. a first conv on a 1-channel signal) stay dense; the
report lists them.
"""

from train.configs import oneshot


def get_config():
  """2:4 sparsity from half of the training budget on."""
  config = oneshot.get_config()
  config.pruning.sparsity = 0.5
  config.pruning.structure = "2:4"
  config.pruning.distribution = "uniform"  # N:M fixes every leaf's sparsity at 1 - N/M
  return config
