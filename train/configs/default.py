"""Default hyperparameters: a dense CNN on MNIST-1D, shared by every recipe.

Every recipe file (``dense.py``, ``gmp.py``, ...) imports :func:`get_config` from here and
overrides fields. Any field can be overridden on the command line, e.g.::

  python -m train --config train/configs/gmp.py --workdir runs/gmp \\
      --config.model=mlp --config.pruning.sparsity=0.95 --config.num_steps=4000

Keys:

* ``model``: ``mlp``, ``cnn``, ``rnn``, ``resnet`` or ``transformer``; the model's own options
  are in ``model_kwargs.<model>`` (e.g. ``--config.model_kwargs.mlp.hidden="(256, 256)"``).
* ``dataset``: a TFDS name (default ``mnist1d``, generated locally); ``data_dir``: TFDS data
  directory (default: ``$JAXPRUNE_DATA_DIR`` or TFDS's default).
* ``num_steps``, ``batch_size`` (global, split over all devices), ``eval_batch_size``, ``seed``.
* ``learning_rate``, ``lr_schedule`` (``cosine`` or ``constant``), ``warmup_steps``,
  ``weight_decay`` (Adam, or AdamW when ``> 0``).
* ``checkpoint_every``, ``keep_checkpoints``, ``eval_every``, ``log_every``, ``progress``.
* ``pruning``: a nested ConfigDict; ``pruning.method`` picks the jaxprune factory and the
  other fields are its keyword arguments (see each recipe file). ``pruning.sparsity`` is the
  fraction of weights removed; ``pruning.where`` is ``None`` (jaxprune's default: every float
  leaf with ``ndim >= 2``, i.e. kernels and, in the Transformer, ``pos_embed``) or a regular
  expression that a leaf path must match (``re.search``) as well, e.g. ``'^(?!convs/0/)'`` to
  keep the first conv dense.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """The default config: dense CNN, MNIST-1D, Adam 1e-2 with cosine decay, 3000 steps."""
  config = ml_collections.ConfigDict()
  config.model = "cnn"
  config.model_kwargs = ml_collections.ConfigDict({
      "mlp": {"hidden": (100, 100)},
      "cnn": {"features": (32, 32, 32), "kernel_sizes": (5, 3, 3), "stride": 2},
      "rnn": {"hidden": 64, "cell": "gru"},
      "resnet": {"widths": (16, 32, 64), "blocks_per_stage": 1},
      "transformer": {"patch": 4, "dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2},
  })
  config.dataset = "mnist1d"
  config.data_dir = config_dict.placeholder(str)

  config.num_steps = 3000
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.seed = 0

  config.learning_rate = 1e-2
  config.lr_schedule = "cosine"
  config.warmup_steps = 0
  config.weight_decay = 0.0

  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  config.eval_every = 500
  config.log_every = 50
  config.progress = True

  config.pruning = ml_collections.ConfigDict()
  config.pruning.method = "dense"
  config.pruning.sparsity = 0.0
  config.pruning.where = config_dict.placeholder(str)
  return config
