"""Disparate impact and its mitigation: GMP to 90% on unbalanced MNIST-1D, then constrained
fine-tuning (Tran et al., 2022; Hashemizadeh et al., 2024).

Classes 0, 1 and 2 keep a tenth of their training examples (the minority; the test split is
whole). The CNN is trained and pruned as ``gmp.py`` does, then fine-tuned for
``mitigation.steps`` with the masks fixed, under one loss constraint per class
(``L_class − L ≤ 0.05``) solved by dual ascent. The run writes ``predictions.npz`` (after) and
``predictions_before_mitigation.npz`` (the pruned model). With the dense reference and the
control arm (plain fine-tuning, ``--config.mitigation.constrained=False``) trained on the same
data, ``python -m train.analyze`` reports every metric before and after::

  for seed in 0 1 2; do
    python -m train --config train/configs/mitigation.py --workdir runs/fair/mitigated_$seed \\
        --config.seed=$seed
    python -m train --config train/configs/mitigation.py --workdir runs/fair/control_$seed \\
        --config.seed=$seed --config.mitigation.constrained=False
    python -m train --config train/configs/mitigation.py --workdir runs/fair/dense_$seed \\
        --config.seed=$seed --config.pruning.method=dense --config.mitigation.enabled=False
  done
  python -m train.analyze --workdir runs/fair
"""

from train.configs import gmp


def get_config():
  """GMP 90% (ERK) of the CNN on MNIST-1D with classes 0–2 at 1/10, then 1000 mitigated steps."""
  config = gmp.get_config()
  config.imbalance.classes = (0, 1, 2)
  config.imbalance.keep_fraction = 0.1
  config.mitigation.enabled = True
  config.mitigation.steps = 1000
  return config
