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
* ``allow_config_change``: a rerun in an existing ``--workdir`` continues only with the config
  it was started with (``train/workdir.py``); list here the keys it may change on purpose,
  comma-separated (``num_steps,pruning.sparsity``; ``*``: any), and the change is recorded.
* ``pruning``: a nested ConfigDict; ``pruning.method`` picks the jaxprune factory and the
  other fields are its keyword arguments (see each recipe file). ``pruning.sparsity`` is the
  fraction of weights removed; ``pruning.where`` is ``None`` (jaxprune's default: every float
  leaf with ``ndim >= 2``, i.e. kernels and, in the Transformer, ``pos_embed``) or a regular
  expression that a leaf path must match (``re.search``) as well, e.g. ``'^(?!convs/0/)'`` to
  keep the first conv dense.
* ``imbalance``: train on a split unbalanced on purpose: every class in ``imbalance.classes``
  keeps ``imbalance.keep_fraction`` of its training examples (chosen by ``imbalance.seed``,
  the same for every ``seed``); the test split stays whole. Empty ``classes``: no change.
* ``mitigation``: with ``mitigation.enabled``, a ``mitigate`` phase of ``mitigation.steps``
  follows training: the pruned model (masks fixed) is fine-tuned with Adam (cosine decay from
  ``mitigation.learning_rate``) under per-group loss constraints ``L_g − L ≤ epsilon``, the
  Lagrange multipliers taking a dual ascent step of size ``dual_lr`` after every step (Tran et
  al., 2022). ``groups``: ``classes`` (one constraint per class) or ``minority``
  (``minority_classes``, default ``imbalance.classes``, against the rest).
  ``constrained=False`` fine-tunes the same way with plain cross-entropy: the control arm.
  The run then also writes ``predictions_before_mitigation.npz``; ``python -m train.analyze``
  compares the two (see ``train/configs/mitigation.py``).
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
  config.allow_config_change = ""

  config.pruning = ml_collections.ConfigDict()
  config.pruning.method = "dense"
  config.pruning.sparsity = 0.0
  config.pruning.where = config_dict.placeholder(str)

  config.imbalance = ml_collections.ConfigDict()
  config.imbalance.classes = ()
  config.imbalance.keep_fraction = 1.0
  config.imbalance.seed = 0

  config.mitigation = ml_collections.ConfigDict()
  config.mitigation.enabled = False
  config.mitigation.constrained = True
  config.mitigation.steps = 1000
  config.mitigation.learning_rate = 2e-3
  config.mitigation.epsilon = 0.05
  config.mitigation.dual_lr = 0.01
  config.mitigation.groups = "classes"
  config.mitigation.minority_classes = config.imbalance.get_ref("classes")
  return config


def gradual_schedule(config: ml_collections.ConfigDict, update_every: int = 50) -> None:
  """Sets ``config.pruning``'s cubic schedule (Zhu & Gupta 2017): masks every
  ``update_every`` steps from 10% to 67% of ``num_steps``, both rounded down to multiples of
  ``update_every`` (so that the masks are updated at ``end_step``: exact final sparsity). The
  steps follow ``num_steps`` overrides (``get_ref``); an explicit override wins."""
  p = config.pruning
  p.update_every = update_every
  every = p.get_ref("update_every")
  p.begin_step = config.get_ref("num_steps") // 10 // every * every
  p.end_step = config.get_ref("num_steps") * 2 // 3 // every * every
  p.power = 3
