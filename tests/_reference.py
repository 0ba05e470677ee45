"""NumPy references for the property tests (no jax here: the float64 subprocess of
tests/test_properties.py imports this module after enabling x64 itself)."""
import math

import numpy as np
from hypothesis import strategies as st


def draw_from(data, pool: np.ndarray, shape) -> np.ndarray:
  """An array of ``shape`` drawn, with repeats, from the values of ``pool``."""
  n = math.prod(shape)
  idx = data.draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))
  return pool[np.array(idx)].reshape(shape)


def ref_pruned(flats, k: int) -> np.ndarray:
  """Marks the ``k`` lowest over the concatenated flat arrays (leaf order, then index): NaN
  lowest, ``-0.0 == +0.0``, compared in float64."""
  x = np.concatenate([np.asarray(f, np.float64).reshape(-1) for f in flats])
  nan = np.isnan(x)
  order = np.lexsort((np.arange(x.size), np.where(nan, 0.0, x + 0.0), ~nan))
  out = np.zeros(x.size, bool)
  out[order[:k]] = True
  return out
