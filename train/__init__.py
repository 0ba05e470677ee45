"""jaxprune's experiment runner: data (tfds), models (Flax NNX), checkpoints (orbax), loop."""
