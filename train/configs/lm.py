"""A dense byte-level decoder-only LM on the Python standard library, and its one-shot pruning.

``python -m train.lm --config train/configs/lm.py --workdir runs/lm`` trains the dense model
(:class:`train.models.DecoderLM`: 4 pre-LN blocks, width 256, context 256, 3.3M parameters);
``python -m train.oneshot_lm --config train/configs/lm.py --workdir runs/lm`` loads its
checkpoint, prunes it one-shot with magnitude, Wanda and SparseGPT at every entry of
``oneshot.sparsities`` and reports validation bits per byte and perplexity, then fine-tunes the
``recovery.targets`` with their masks held (cross-entropy and distillation from the dense
model). Any field can be overridden on the command line (``--config.num_steps=300``).

Keys:

* ``dataset`` (TFDS name; ``python_stdlib`` is built locally, see :mod:`train.text_builder`),
  ``text_key``, ``train_split``, ``eval_split``, ``calibration_split``, ``data_dir``.
* ``model``: :class:`train.models.DecoderLM` options.
* ``num_steps``, ``batch_size``, ``learning_rate`` (AdamW, linear warmup over ``warmup_steps``
  then cosine decay to 10%), ``weight_decay``, ``grad_clip``, ``seed``.
* ``eval_windows``: validation windows of ``context + 1`` bytes evenly spaced over the split
  (``0``: all of it), ``eval_batch_size``; ``log_every``, ``eval_every``, ``checkpoint_every``.
* ``oneshot``: ``methods``; ``sparsities`` (fractions, or ``"n:m"``); ``calibration_samples``
  random windows of the calibration split, fed ``calibration_batch`` at a time, evaluated
  ``chunk_size`` windows at a time (masks that are the same bits on any number of devices
  whose share of a batch is a multiple of it; ``None``: a batch at once); ``sequential``
  (block by block, as both papers; else one calibration of the whole dense model);
  ``block_size`` and ``dampening`` (SparseGPT). The embeddings and the head are not pruned.
* ``recovery``: ``targets`` (``"method@sparsity"``), ``steps``, ``learning_rate``,
  ``batch_size``, ``losses`` (``ce``: cross-entropy on the data; ``kd``: KL from the dense
  model's logits at ``temperature``).
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """The default LM recipe: about 10 minutes of training on 2 CPU cores."""
  c = ml_collections.ConfigDict()
  c.dataset = "python_stdlib"
  c.text_key = "text"
  c.train_split = "train"
  c.eval_split = "validation"
  c.calibration_split = "calibration"
  c.data_dir = config_dict.placeholder(str)

  c.model = ml_collections.ConfigDict(
      {"context": 256, "dim": 256, "depth": 4, "num_heads": 4, "mlp_ratio": 4})

  c.num_steps = 500
  c.batch_size = 16
  c.learning_rate = 2e-3
  c.warmup_steps = 50
  c.weight_decay = 0.1
  c.grad_clip = 1.0
  c.seed = 0

  c.eval_windows = 256
  c.eval_batch_size = 32
  c.log_every = 50
  c.eval_every = 200
  c.checkpoint_every = 200

  c.oneshot = ml_collections.ConfigDict()
  c.oneshot.methods = ("magnitude", "wanda", "sparsegpt")
  c.oneshot.sparsities = ("0.5", "0.6", "0.7", "2:4", "4:8")
  c.oneshot.calibration_samples = 128
  c.oneshot.calibration_batch = 16
  c.oneshot.chunk_size = config_dict.placeholder(int)
  c.oneshot.chunk_size = 2
  c.oneshot.sequential = True
  c.oneshot.block_size = 128
  c.oneshot.dampening = 0.01

  c.recovery = ml_collections.ConfigDict()
  c.recovery.targets = ("magnitude@2:4", "sparsegpt@2:4")
  c.recovery.losses = ("ce", "kd")
  c.recovery.steps = 50
  c.recovery.learning_rate = 3e-4
  c.recovery.batch_size = 16
  c.recovery.temperature = 1.0
  return c
