"""Tests for the experiment runner's loop: train/train.py, train/configs, train/main.py,
train/reporting.py.

* a run killed with SIGKILL after its first checkpoint and started again with the same
  command ends with bit-identical parameters to an uninterrupted run;
* the channels recipe shrinks the CNN, learns, and resumes inside its fine-tuning phase with
  identical results;
* a data-parallel step on 8 host devices equals the single-device step;
* configs, overrides and bad values.

(Every model x recipe is in tests/test_train_recipes.py.)
"""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_with_devices
from test_train_recipes import RECIPES, tiny_config

from train import reporting, train

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def mock_info():
  return train.input_pipeline.Metadata("mnist1d", (40,), 10, 4000, 1000, "x", "label")


# --- resume after SIGKILL -------------------------------------------------------------------------

_ARGS = ("--config", "train/configs/imp.py", "--config.model=mlp",
         "--config.model_kwargs.mlp.hidden=(16,)", "--config.num_steps=300",
         "--config.pruning.rounds=2", "--config.pruning.rewind_step=25",
         "--config.checkpoint_every=50", "--config.keep_checkpoints=10",
         "--config.eval_every=50", "--config.log_every=10", "--config.progress=False")


def _cli(workdir, data_dir):
  return [sys.executable, "-m", "train", *_ARGS, "--workdir", str(workdir),
          f"--config.data_dir={data_dir}"]


# One process, the CLI's own flags and main: the uninterrupted run into ``full``, then the same
# command into ``killed``, which waits after step 75 (past its rewind point, step 25, and its
# first checkpoint, step 50; before the first prune, step 100) until the test SIGKILLs it.
# The reference shares the compiled programs of the run to be killed: one process less.
_FULL_THEN_KILLED = """
import sys, time
from absl import flags
from train import main
main._define_flags()
flags.FLAGS(sys.argv)
main.main(sys.argv[:1])
from train import train
step = train._Progress.__call__
def wait_at_75(self, done, metrics):
  step(self, done, metrics)
  if done == 75:
    print("waiting", flush=True)
    while True:
      time.sleep(1)
train._Progress.__call__ = wait_at_75
flags.FLAGS.workdir = sys.argv.pop()
main.main(sys.argv[:1])
"""


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # compiles faster; the same in all the runs
  return env


def _npz(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, data_dir):
  # IMP with rewinding: the killed run has saved its rewind point (step 25) and its first
  # checkpoint (step 50); the resumed run must restore both and then prune, rewind and
  # restart the optimizer at steps 100 and 200 exactly as the uninterrupted run did.
  full, killed = tmp_path / "full", tmp_path / "killed"
  argv = [sys.executable, "-c", _FULL_THEN_KILLED, *_cli(full, data_dir)[3:], str(killed)]
  proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  lines = iter(proc.stdout.readline, "")  # the reference's final line, then "waiting"
  line = next((x for x in lines if x == "waiting\n"), "")  # "" if it ended
  first = killed / "checkpoints" / "50"
  assert (full / "params.npz").exists() and first.exists(), (line, proc.poll())
  proc.send_signal(signal.SIGKILL)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, (line + out + err)[-3000:]
  assert line == "waiting\n" and not (killed / "params.npz").exists()
  assert not (killed / "checkpoints" / "100").exists()
  assert not (killed / "checkpoints" / "300").exists()

  rerun = subprocess.run(_cli(killed, data_dir), cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]

  a, b = _npz(killed / "params.npz"), _npz(full / "params.npz")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  kernels = [a["layers/0/kernel"], a["head/kernel"]]  # global scope: 90% over both, exactly
  n = sum(k.size for k in kernels)
  assert sum(int((k == 0).sum()) for k in kernels) == round(0.9 * n)

  # metrics.jsonl reads as one run: no step repeated, same final line.
  ma, mb = reporting.read_metrics(killed), reporting.read_metrics(full)
  train_steps = [m["step"] for m in ma if "loss" in m]
  assert train_steps == sorted(set(train_steps)) == [m["step"] for m in mb if "loss" in m]
  assert train_steps == list(range(10, 301, 10))
  fa, fb = ma[-1], mb[-1]
  assert fa["final"] and fa["step"] == 300
  for key in ("test_accuracy", "test_loss", "sparsity", "params", "nonzero_params"):
    assert fa[key] == fb[key], key
  for name in ("report.md", "curves.png", "sparsity.png", "config.json"):
    assert (killed / name).stat().st_size > 0
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(killed / "tensorboard"))
  report = (killed / "report.md").read_text()
  zeros = int((a["layers/0/kernel"] == 0).sum())
  assert f"| layers/0/kernel | 40x16 | 640 | {640 - zeros} | {zeros / 640:.3f} | yes |" in report


# --- channels: shrink, fine-tune, resume inside the fine-tuning phase --------------------------

def test_channels_recipe_shrinks_learns_and_resumes_in_finetune_phase(tmp_path, data_dir):
  # The default CNN (3 convs of 32 channels): half of every conv's channels go, the model is
  # shrunk to 16 channels per conv and fine-tuned; it still learns MNIST-1D.
  config = importlib.import_module("train.configs.channels").get_config()
  config.num_steps = 200
  config.pruning.update_every = 10
  config.pruning.begin_step, config.pruning.end_step = 20, 100
  config.pruning.finetune_steps = 100
  config.checkpoint_every = 50
  config.keep_checkpoints = 10
  config.eval_every = 100
  config.progress = False
  config.data_dir = data_dir
  workdir = tmp_path / "run"
  final = train.train_and_evaluate(config, str(workdir))
  assert final["step"] == 300
  assert final["params_before"] == 8106 and final["params"] == final["params_after"] < 3000
  assert final["accuracy_shrunk"] == final["accuracy_masked"]
  assert final["test_accuracy"] > 0.8
  params = _npz(workdir / "params.npz")
  assert params["convs/0/kernel"].shape == (5, 1, 16)
  assert params["convs/1/kernel"].shape == (3, 16, 16)
  assert params["bns/2/mean"].shape == (16,)
  assert params["head/kernel"].shape == (5 * 16, 10)
  last = reporting.read_metrics(workdir)[-1]
  assert last["final"] and last["step"] == 300
  assert last["sparsity"] == pytest.approx(final["removed_fraction"])
  report = (workdir / "report.md").read_text()
  assert "| shrunk |" in report and "channel groups pruned" in report

  # As if killed after step 250: drop the last fine-tuning checkpoint and the outputs.
  shutil.rmtree(workdir / "checkpoints_finetune" / "300")
  os.remove(workdir / "params.npz")
  again = train.train_and_evaluate(config, str(workdir))
  resumed = _npz(workdir / "params.npz")
  for k in params:
    np.testing.assert_array_equal(resumed[k], params[k], err_msg=k)
  assert again["test_accuracy"] == final["test_accuracy"]
  shrink_lines = [m for m in reporting.read_metrics(workdir) if m.get("phase") == "finetune"]
  assert len(shrink_lines) == 1


# --- configs and command line ---------------------------------------------------------------------

@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_configs(recipe):
  config = importlib.import_module(f"train.configs.{recipe}").get_config()
  for key in ("model", "dataset", "num_steps", "batch_size", "seed", "checkpoint_every"):
    assert key in config
  assert config.dataset == "mnist1d" and config.model == "cnn"
  assert config.pruning.method == {"nm24": "oneshot"}.get(recipe, recipe)
  assert 0.0 <= config.pruning.sparsity <= 1.0
  assert (config.pruning.sparsity == 0.0) == (recipe == "dense")


def test_derived_steps_follow_num_steps_overrides():
  from train.configs import gmp
  config = gmp.get_config()
  config.num_steps = 4000
  # end_step follows num_steps and stays a multiple of update_every (exact final sparsity).
  assert config.pruning.end_step == 2650 and config.pruning.end_step % 50 == 0
  config.pruning.end_step = 1000  # an explicit override wins
  assert config.pruning.end_step == 1000


def test_bad_config_values_raise_naming_the_key(mock_info):
  info = mock_info
  mesh = train.make_mesh()
  cases = [("pruning.method", "method", "lasso"), ("pruning.structure", "structure", "2-4"),
           ("pruning.where", "where", "nothing_matches_this"),
           ("pruning.sparsity", "sparsity", 1.5)]
  for key, field, value in cases:
    config = tiny_config("gmp", "mlp")
    config.pruning[field] = value
    with pytest.raises(ValueError, match=key):
      train.Experiment(config, info, mesh=mesh)
  config = tiny_config("dense", "mlp")
  config.model = "lenet"
  with pytest.raises(ValueError, match="model"):
    train.Experiment(config, info, mesh=mesh)


def test_where_regex_keeps_other_leaves_dense(mock_info):
  config = tiny_config("gmp", "mlp")
  config.pruning.where = "^layers/"
  exp = train.Experiment(config, mock_info, mesh=train.make_mesh())
  batch = {"x": np.ones((8, 40), np.float32), "label": np.arange(8, dtype=np.int32)}
  for _ in range(2):
    exp.trainer.train_step(batch)
  params = exp.trainer.params()
  assert (np.asarray(params["layers"][0]["kernel"]) == 0).mean() == pytest.approx(0.9)
  assert (np.asarray(params["head"]["kernel"]) != 0).all()


# --- data parallelism -----------------------------------------------------------------------------

def test_sharded_step_equals_single_device_step():
  out = run_with_devices("""
      import jax, json, numpy as np
      from jax.sharding import PartitionSpec as P
      from train import input_pipeline, train
      from train.configs import gmp
      assert jax.device_count() == 8
      info = input_pipeline.Metadata("mnist1d", (40,), 10, 4000, 1000, "x", "label")
      config = gmp.get_config()  # CNN with BatchNorm: batch statistics span all devices
      config.model_kwargs.cnn.features = (8, 8)
      config.model_kwargs.cnn.kernel_sizes = (3, 3)
      config.num_steps, config.batch_size = 3, 16
      config.pruning.update_every, config.pruning.begin_step, config.pruning.end_step = 1, 0, 1
      rng = np.random.default_rng(0)
      batches = [{"x": rng.normal(size=(16, 40)).astype(np.float32),
                  "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(3)]
      runs = {}
      for n in (8, 1):
        exp = train.Experiment(config, info, mesh=train.make_mesh(jax.devices()[:n]))
        sharded = exp.trainer.shard(batches[0])["x"]
        assert sharded.sharding.spec == P("data") and len(sharded.sharding.device_set) == n
        losses = []
        for t, b in enumerate(batches):
          exp.before_step(t)
          losses.append(float(exp.trainer.train_step(b)["loss"]))
        leaves = jax.tree.leaves(exp.trainer.state["model"])
        assert all(x.sharding.is_fully_replicated and len(x.sharding.device_set) == n
                   for x in leaves)
        runs[n] = (losses, [np.asarray(x) for x in leaves],
                   [np.asarray(m) for m in jax.tree.leaves(exp.trainer.masks())])
      (l8, p8, m8), (l1, p1, m1) = runs[8], runs[1]
      print(json.dumps({
          "loss": float(np.max(np.abs(np.subtract(l8, l1)))),
          "params": max(float(np.max(np.abs(a - b))) for a, b in zip(p8, p1)),
          "masks_equal": all(np.array_equal(a, b) for a, b in zip(m8, m1)),
          "sparsity": float(sum((~m).sum() for m in m8) / sum(m.size for m in m8 if m.ndim))}))
      """)
  diff = json.loads(out.strip().splitlines()[-1])
  assert diff["loss"] < 1e-6 * 3  # losses are ~2.3: a few float32 ulps
  assert diff["params"] < 1e-6
  assert diff["masks_equal"] and diff["sparsity"] == pytest.approx(0.9, abs=0.01)


# --- sweep ----------------------------------------------------------------------------------------

def test_sweep_writes_mean_and_std_over_seeds(tmp_path, data_dir):
  from train import sweep
  config = tiny_config("gmp", "mlp", num_steps=2)
  config.data_dir = data_dir
  records = sweep.run_sweep(config, str(tmp_path), sparsities=[0.5, 0.9], seeds=[0, 1])
  assert [(r["sparsity"], r["seed"]) for r in records] == [(0.5, 0), (0.5, 1), (0.9, 0),
                                                           (0.9, 1)]
  for r in records:
    assert r["measured_sparsity"] == pytest.approx(r["sparsity"], abs=0.01)
    assert (tmp_path / f"s{r['sparsity']}_seed{r['seed']}" / "report.md").exists()
  assert json.loads((tmp_path / "sweep.json").read_text()) == records
  table = (tmp_path / "sweep.md").read_text()
  for s in (0.5, 0.9):
    accs = [r["accuracy"] for r in records if r["sparsity"] == s]
    assert f"| gmp | {s:.4f} | 2 | {np.mean(accs):.4f} | {np.std(accs):.4f} |" in table
  assert (tmp_path / "sweep.png").stat().st_size > 1000
  # train.analyze reads the sweep's runs (no dense reference: absolute metrics, curves, overlap).
  from train import analyze
  with open(analyze.analyze(tmp_path)) as f:
    md = f.read()
  for s in (0.5, 0.9):
    accs = [r["accuracy"] for r in records if r["sparsity"] == s]
    assert f"| gmp | {s:.4f} | 2 | {np.mean(accs):.4f} | {np.std(accs):.4f} |" in md
  assert "### gmp, sparsity 0.9 (2 seeds)" in md and "| layers/0/kernel |" in md
