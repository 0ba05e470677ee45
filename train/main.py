"""Command line: ``python -m train --config train/configs/<recipe>.py --workdir runs/<name>``.

Overrides use ml_collections' ``config_flags`` syntax, e.g. ``--config.pruning.sparsity=0.95``
or ``--config.model=mlp``. Running the same command again resumes from the latest checkpoint
in ``--workdir``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """``--workdir`` and ``--config``; defined by :func:`run` only, so importing is harmless."""
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, report and plots.")
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (train/configs/*.py).", lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])


def _hide_gpus_from_tensorflow() -> None:
  """TensorFlow (if installed) must not grab accelerator memory that JAX needs."""
  try:
    import tensorflow as tf
  except ImportError:
    return
  tf.config.experimental.set_visible_devices([], "GPU")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  _hide_gpus_from_tensorflow()
  from train import train  # after flag parsing: importing jax is slow

  logging.info("config:\n%s", FLAGS.config)
  final = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in final.items() if k != "final"))


def run() -> None:
  """Entry point of ``python -m train``."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
