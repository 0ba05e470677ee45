"""Strict test settings shared by the whole suite (see STYLE.md, section 7).

- rank promotion raises, so a silent broadcast of a mask against a leaf is a bug;
- two CPU devices, so the default path already sees more than one device;
- warnings are errors (pyproject's filterwarnings).

Tests that need 8 devices run in a subprocess with XLA_FLAGS set (see ``run_with_devices``).

Compiling dominates this suite (tiny arrays, many programs), so XLA runs without most of its
optimizations here (``jax_disable_most_optimizations``: 30-40% less CPU time for
tests/test_masks.py and tests/test_transforms.py, same results). A module whose assertions are
about the optimized program (buffer sizes, fusion) opts back in with
``pytestmark = pytest.mark.usefixtures("xla_optimized")``.

XLA:CPU also compiles with its older fusion emitters here (``--xla_cpu_use_fusion_emitters=false``
in ``XLA_FLAGS``): 35-40% less compile CPU time on this suite's programs, but only with the
optimizations off (with them on, ~3x more), and generates each module's code in one piece
(``--xla_cpu_parallel_codegen_split_count=1``: 7-12% less CPU time on test_masks,
test_transforms and test_train_recipes, since both cores already run a test worker). These
settings are in the environment, so every subprocess a test starts inherits them. The footprint
and collective tests pass either way.

Each test module starts with ``gc.freeze()`` (``_freeze_long_lived_objects``): 3-13% less CPU time.
"""
import gc
import os
import subprocess
import sys
import textwrap

# Set before jax starts its backend, and inherited by every subprocess a test starts. The older
# emitters go with the optimizations off (with XLA's optimizations on they compile ~3x SLOWER);
# one codegen piece per module: the two test workers already use both cores.
_TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
for _flag in _TEST_XLA_FLAGS.split():
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_disable_most_optimizations", True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_devices(code: str, num_devices: int = 8, timeout: int = 300) -> str:
  """Runs ``code`` in a fresh Python with ``num_devices`` host CPU devices; returns stdout.

  Fails the calling test with the child's stderr if the child exits non-zero.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices} {_TEST_XLA_FLAGS}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
      [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
      capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
  if proc.returncode != 0:
    pytest.fail(f"subprocess failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc.stdout


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data directory with MNIST-1D generated into it (once per test process)."""
  from train import mnist1d_builder
  d = str(tmp_path_factory.mktemp("tfds"))
  mnist1d_builder.prepare(d)
  return d


def _optimizations(disabled: bool):
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", disabled)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def fast_compile():
  """XLA without most optimizations (the suite's default; kept for the modules that name it)."""
  yield from _optimizations(True)


@pytest.fixture(scope="module")
def xla_optimized():
  """XLA with its optimizations, for a module that asserts on the compiled program's buffers.

  Use with ``pytestmark = pytest.mark.usefixtures("xla_optimized")``.
  """
  yield from _optimizations(False)


@pytest.fixture(scope="module", autouse=True)
def _freeze_long_lived_objects():
  """Moves every object alive when a test module starts (imported libraries, cached programs,
  earlier modules' fixtures) into Python's permanent GC generation, so that the collector's full
  passes no longer traverse them: they are a large heap by the suite's middle, and orbax's failed
  restores collect explicitly (``train/checkpointing.py``). Objects a test creates are collected
  as before. Measured on the whole suite, two pairs, a quiet 2-core AMD host: 539 and 600 s user
  CPU without it, 521 and 520 s with it; peak RSS 4.99 GB and 5.03 GB."""
  gc.freeze()
  yield
