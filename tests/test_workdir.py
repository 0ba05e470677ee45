"""The runner is never silently wrong: train/workdir.py, train/validation.py and their use in
train/train.py (issue 14, runner half).

* a rerun with another config is refused, naming the keys, and every file of the workdir is
  byte-identical afterwards; an explicit ``allow_config_change`` continues and is recorded;
* a corrupted latest checkpoint: the run resumes from the newest intact one (with a warning
  naming the bad one) and ends bit-identical to the uninterrupted run; all corrupt: an error
  naming each;
* a torn last line of ``metrics.jsonl`` is repaired on resume, with a warning naming the file;
* a diverging run (``learning_rate=1e30``) stops with the step, a NaN learning rate is refused
  up front, and the command line exits non-zero;
* every unclear error of the issue now names its config key.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from test_train_recipes import tiny_config

from train import checkpointing, reporting, runs, train, validation, workdir

pytestmark = pytest.mark.usefixtures("fast_compile")


def _config(data_dir, **overrides):
  config = tiny_config("gmp", "mlp", num_steps=4)
  config.eval_batch_size = 500
  config.checkpoint_every, config.keep_checkpoints = 1, 10
  config.data_dir = data_dir
  for key, value in overrides.items():
    node, *path = key.split("__")
    target = config
    for part in [node, *path][:-1]:
      target = target[part]
    target[[node, *path][-1]] = value
  return config


def _hashes(path) -> dict[str, str | None]:
  """Every file (sha256) and directory (None) under ``path``, by relative path."""
  out = {}
  for root, dirs, files in os.walk(path):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), path)] = None
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        out[os.path.relpath(os.path.join(root, f), path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _npz(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
  """A finished tiny GMP run (4 steps, a checkpoint after every step) and its final params."""
  run = tmp_path_factory.mktemp("finished") / "run"
  final = train.train_and_evaluate(_config(data_dir), str(run))
  assert final["step"] == 4
  return run, _npz(run / "params.npz")


# --- the config contract --------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, error, match", [
    ("pruning__sparsity", 0.5, workdir.ConfigMismatchError, r"pruning\.sparsity: 0\.9 -> 0\.5"),
    ("seed", 7, workdir.ConfigMismatchError, r"seed: 0 -> 7"),
    ("num_steps", 6, workdir.ConfigMismatchError, r"num_steps: 4 -> 6"),
    ("model", "cnn", workdir.ConfigMismatchError, r'model: "mlp" -> "cnn"'),
    ("pruning__sparsity", 1.5, ValueError, r"pruning\.sparsity: must be a finite number in"),
    ("learning_rate", float("nan"), ValueError, r"learning_rate: must be a finite number"),
])
def test_rerun_with_another_config_is_refused_and_touches_nothing(finished, data_dir, key, value,
                                                                  error, match):
  run, _ = finished
  before = _hashes(run)
  with pytest.raises(error, match=match) as info:
    train.train_and_evaluate(_config(data_dir, **{key: value}), str(run))
  if error is workdir.ConfigMismatchError:
    assert list(info.value.differences) == [key.replace("__", ".")]
    assert "allow_config_change" in str(info.value)
  assert _hashes(run) == before  # every file byte-identical, no file added or removed


def test_several_differences_are_all_listed(finished, data_dir):
  run, _ = finished
  config = _config(data_dir, num_steps=6, pruning__sparsity=0.5, progress=True)
  with pytest.raises(workdir.ConfigMismatchError) as info:
    workdir.check_config(run, config)
  assert sorted(info.value.differences) == ["num_steps", "pruning.sparsity"]  # not `progress`
  assert "--config.allow_config_change=num_steps,pruning.sparsity" in str(info.value)


def test_run_files_without_config_json_are_refused(tmp_path, data_dir):
  (tmp_path / "checkpoints" / "3").mkdir(parents=True)
  with pytest.raises(workdir.ConfigMismatchError, match="no config.json"):
    workdir.check_config(tmp_path, _config(data_dir))
  assert workdir.check_config(tmp_path, _config(data_dir, allow_config_change="*")) is None


def test_allowed_config_change_continues_and_is_recorded(tmp_path, data_dir):
  run = tmp_path / "run"
  train.train_and_evaluate(_config(data_dir), str(run))
  config = _config(data_dir, num_steps=6, allow_config_change="num_steps")
  final = train.train_and_evaluate(config, str(run))
  assert final["step"] == 6
  assert json.loads((run / "config.json").read_text())["num_steps"] == 6
  lines = (run / "config_changes.jsonl").read_text().splitlines()
  assert len(lines) == 1
  record = json.loads(lines[0])
  assert record["changed"] == {"num_steps": [4, 6]}
  assert record["allow_config_change"] == "num_steps"
  assert "resumed with a changed config (allow_config_change=num_steps): `num_steps` 4 -> 6" in (
      run / "report.md").read_text()
  steps = [m["step"] for m in reporting.read_metrics(run) if "loss" in m]
  assert steps == [4, 6]  # the 4-step run's final line was cut; training went on from step 4
  # The same command again: the config now equals config.json (allow_config_change is exempt).
  assert workdir.check_config(run, config) is None
  assert workdir.check_config(run, _config(data_dir, num_steps=6)) is None


# --- corrupted checkpoints ------------------------------------------------------------------------

def _flip_array_data(step_dir):
  """Flips one byte in the middle of every array data file of a checkpoint step."""
  flipped = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(root) != "d":
      continue
    for f in files:
      path = os.path.join(root, f)
      data = bytearray(open(path, "rb").read())
      data[len(data) // 2] ^= 0xFF
      with open(path, "wb") as fh:
        fh.write(data)
      flipped += 1
  assert flipped
  return flipped


# When TensorStore fails on a damaged file, orbax's pending reads call back into its closed
# event loop ("Event loop is closed", raised in a destructor): orbax's noise, not a failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_resumes_from_previous_one(tmp_path, data_dir, finished):
  _, reference = finished
  run = tmp_path / "run"
  train.train_and_evaluate(_config(data_dir), str(run))
  os.remove(run / "params.npz")  # as if killed right after the last checkpoint
  _flip_array_data(run / "checkpoints" / "4")
  with pytest.warns(checkpointing.CheckpointIntegrityWarning,
                    match=r"restored step 3 .*skipping newer ones that are not intact: step 4"):
    final = train.train_and_evaluate(_config(data_dir), str(run))
  assert final["step"] == 4
  resumed = _npz(run / "params.npz")
  assert resumed.keys() == reference.keys()
  for k in reference:
    np.testing.assert_array_equal(resumed[k], reference[k], err_msg=k)
  assert (run / "checkpoints" / "4.corrupt").is_dir()  # kept for inspection, out of orbax's way
  with checkpointing.Checkpoints(run / "checkpoints") as ckpts:
    assert ckpts.steps() == [1, 2, 3, 4]  # step 4 was saved again, intact
  steps = [m["step"] for m in reporting.read_metrics(run) if "loss" in m]
  assert steps == sorted(set(steps))

  # Every checkpoint corrupt: an error naming each, and no training on a damaged state.
  for s in (1, 2, 3, 4):
    _flip_array_data(run / "checkpoints" / str(s))
  with pytest.raises(checkpointing.CheckpointIntegrityError) as info:
    train.train_and_evaluate(_config(data_dir), str(run))
  for s in (1, 2, 3, 4):
    assert os.path.join(str(run / "checkpoints"), str(s)) + ":" in str(info.value)
  assert sorted(info.value.failures) == [1, 2, 3, 4]


# --- metrics.jsonl --------------------------------------------------------------------------------

def test_torn_metrics_line_is_repaired_on_resume(tmp_path, data_dir):
  run = tmp_path / "run"
  config = _config(data_dir, log_every=1)
  train.train_and_evaluate(config, str(run))
  complete = reporting.read_metrics(run)
  # As if killed while writing the line after the checkpoint of step 3.
  shutil.rmtree(run / "checkpoints" / "4")
  os.remove(run / "params.npz")
  text = (run / "metrics.jsonl").read_text()
  upto3 = "".join(line + "\n" for line in text.splitlines()
                  if json.loads(line)["step"] <= 3 and not json.loads(line).get("final"))
  (run / "metrics.jsonl").write_text(upto3 + '{"step": 4, "loss": 2.2')
  with pytest.warns(UserWarning, match=r"metrics\.jsonl: ignoring a torn last line"):
    assert reporting.read_metrics(run)[-1]["step"] == 3
  with pytest.warns(UserWarning, match=r"metrics\.jsonl: cut off a torn last line"):
    train.train_and_evaluate(config, str(run))
  repaired = reporting.read_metrics(run)  # no warning now: the file is whole again
  assert [m["step"] for m in repaired] == [m["step"] for m in complete]
  assert repaired[-1]["final"] and repaired[-1]["test_accuracy"] == complete[-1]["test_accuracy"]
  assert (run / "metrics.jsonl").read_text().startswith(upto3)  # the kept prefix untouched


def test_damaged_metrics_line_in_the_middle_names_file_and_line(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2,,}\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not a JSON object"):
    runs.read_metrics(tmp_path)


def test_metrics_log_changes_nothing_before_its_first_write(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "final": true}\n')
  before = (tmp_path / "metrics.jsonl").read_bytes()
  with workdir.MetricsLog(tmp_path, tensorboard=False) as log:
    log.resume(1)  # e.g. the run fails after restoring, before it writes anything
  assert (tmp_path / "metrics.jsonl").read_bytes() == before
  with workdir.MetricsLog(tmp_path, tensorboard=False) as log:
    log.resume(2)
    log.write(3, {"loss": 0.5})
  assert [(m["step"], m.get("loss")) for m in runs.read_metrics(tmp_path)] == [
      (1, None), (2, None), (3, 0.5)]


# --- non-finite training --------------------------------------------------------------------------

def test_diverging_run_stops_at_the_step_before_checkpointing(tmp_path, data_dir):
  run = tmp_path / "run"
  config = _config(data_dir, learning_rate=1e30, log_every=1)
  with pytest.raises(validation.TrainingDivergedError,
                     match=r"the loss of step 1 is (nan|inf).*lower config\.learning_rate.*"
                           r"optax\.apply_if_finite") as info:
    train.train_and_evaluate(config, str(run))
  assert info.value.step == 1
  # Step 0's update made the weights ~1e30 (finite, checkpointed); the loss of step 1
  # overflows, and the run stops before the state after step 1 is checkpointed.
  with checkpointing.Checkpoints(run / "checkpoints") as ckpts:
    assert ckpts.steps() == [1]
  assert not (run / "params.npz").exists()


def test_non_finite_parameters_are_named():
  # The check the loop runs before every checkpoint (a nan/inf update with a finite loss).
  import jax.numpy as jnp
  params = {"w": jnp.array([1.0, jnp.inf]), "b": jnp.zeros(2), "count": jnp.array(3)}
  validation.check_finite_params({"w": jnp.ones(2), "count": jnp.array(3)}, 3)
  with pytest.raises(validation.TrainingDivergedError, match=r"after step 3 .*: \['w'\]") as info:
    validation.check_finite_params(params, 3)
  assert info.value.step == 3


def test_command_line_exits_non_zero_on_divergence(tmp_path, data_dir):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  cmd = [sys.executable, "-m", "train", "--config", "train/configs/gmp.py",
         "--workdir", str(tmp_path / "run"), f"--config.data_dir={data_dir}",
         "--config.model=mlp", "--config.model_kwargs.mlp.hidden=(8,)", "--config.num_steps=4",
         "--config.pruning.update_every=1", "--config.pruning.begin_step=0",
         "--config.pruning.end_step=2", "--config.batch_size=8", "--config.eval_batch_size=500",
         "--config.log_every=1", "--config.progress=False", "--config.learning_rate=1e30"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "TrainingDivergedError: training diverged: the loss of step 1" in \
      proc.stderr
  assert "test_loss" not in proc.stdout


# --- config errors name the key -------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (dict(num_steps=60), r"pruning\.end_step: must be greater than pruning\.begin_step \(0\), "
                         r"got 0 \(num_steps=60\).*needs num_steps >= 75"),
    (dict(num_steps=3000, pruning__end_step=3000), r"pruning\.end_step: must be less than "
                                                   r"num_steps \(3000\)"),
    (dict(pruning__end_step=1990), r"pruning\.end_step: must be a multiple of "
                                   r"pruning\.update_every \(50\)"),
    (dict(log_every=0), r"^log_every: must be >= 1, got 0"),
    (dict(eval_every=0), r"^eval_every: must be >= 1, got 0"),
    (dict(pruning__update_every=0), r"^pruning\.update_every: must be >= 1, got 0"),
    (dict(checkpoint_every=0), r"^checkpoint_every: must be >= 1, got 0"),
    (dict(keep_checkpoints=0), r"^keep_checkpoints: must be >= 1 \(or None: keep all\), got 0"),
    (dict(learning_rate=float("inf")), r"^learning_rate: must be a finite number in"),
    (dict(learning_rate=-1e-3), r"^learning_rate: must be a finite number in"),
    (dict(pruning__method="lasso"), r"^pruning\.method: expected one of \['dense', "),
    (dict(model="lenet"), r"^model: expected one of \["),
    (dict(lr_schedule="linear"), r"^lr_schedule: expected one of \['cosine', 'constant'\]"),
    (dict(pruning__structure="2:4"), r"^pruning\.sparsity: the structure 2:4 gives sparsity 0\.5 "
                                     r"only, got 0\.9"),
    (dict(pruning__structure="2:4", pruning__sparsity=0.5),
     r"^pruning\.method: 'gmp' ramps the sparsity through values the structure 2:4 cannot give"),
])
def test_config_errors_name_the_key(overrides, match):
  from train.configs import gmp
  config = gmp.get_config()  # the real recipe: update_every 50, begin/end from num_steps
  for key, value in overrides.items():
    *path, last = key.split("__")
    target = config
    for part in path:
      target = target[part]
    target[last] = value
  with pytest.raises(ValueError, match=match):
    validation.validate_config(config)


def test_recipe_configs_validate():
  import importlib

  from test_train_recipes import RECIPES
  for recipe in RECIPES + ("mitigation",):
    validation.validate_config(importlib.import_module(f"train.configs.{recipe}").get_config())


def test_unknown_dataset_names_config_dataset(tmp_path, data_dir):
  with pytest.raises(ValueError, match=r"^dataset: 'mnist_1d' is not a TFDS dataset; did you "
                                       r"mean \['mnist1d'"):
    train.train_and_evaluate(_config(data_dir, dataset="mnist_1d"), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_offline_dataset_names_config_dataset_and_leaves_nothing(tmp_path, monkeypatch):
  # No network: every HTTP request fails at once as it does offline (without the ~3 minutes of
  # urllib3 retries a real offline machine spends first).
  import requests

  def offline(self, request, **kwargs):
    raise requests.exceptions.ConnectionError(f"offline: {request.url}")

  monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", offline)
  data = tmp_path / "tfds"
  data.mkdir()
  (data / "other_dataset").mkdir()  # what was there before stays
  config = _config(str(data), dataset="cifar10")
  with pytest.raises(RuntimeError, match=r"^dataset: 'cifar10' is not prepared in data_dir=.*"
                                         r"ConnectionError: offline.*tfds build cifar10"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert sorted(os.listdir(data)) == ["other_dataset"]  # no partial download left behind
  assert not (tmp_path / "run").exists()
