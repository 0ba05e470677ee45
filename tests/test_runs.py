"""train.runs: the on-disk format of runs, written and read back without loss, and loud errors."""
import json

import ml_collections
import numpy as np
import pytest

from train import runs


def test_run_file_round_trip_keeps_every_array_by_path(tmp_path):
  params = {"layers": [{"kernel": np.arange(6.0).reshape(2, 3), "bias": np.ones(3)}]}
  rest = {"bn": {"mean": np.full(3, 0.5, np.float32)}}
  masks = {"layers": [{"kernel": np.array([[True, False, True], [False, True, True]]),
                       "bias": np.bool_(True)}]}
  path = tmp_path / "run.npz"
  runs.save_run_file(path, logits=np.eye(3)[[0, 2]], labels=[0, 2], params=params, rest=rest,
                     masks=masks, multipliers=[0.5, 0.0], train_class_loss=[1.0, 2.0, 3.0])
  run = runs.read_run_file(path, method="gmp", sparsity=0.5, seed=3, num_classes=3,
                           labels=np.array([0, 2]))
  assert (run.method, run.sparsity, run.seed) == ("gmp", 0.5, 3)
  assert run.logits.dtype == np.float32 and run.logits.tolist() == [[1, 0, 0], [0, 0, 1]]
  assert sorted(run.params) == ["layers/0/bias", "layers/0/kernel"]
  np.testing.assert_array_equal(run.params["layers/0/kernel"], params["layers"][0]["kernel"])
  assert list(run.masks) == ["layers/0/kernel"]          # unpruned (scalar) masks left out
  np.testing.assert_array_equal(run.masks["layers/0/kernel"], masks["layers"][0]["kernel"])
  np.testing.assert_array_equal(run.rest["bn/mean"], rest["bn"]["mean"])
  assert sorted(run.arrays) == ["label", "logits", "multipliers", "train_class_loss"]
  assert run.arrays["multipliers"].dtype == np.float32
  with pytest.raises(ValueError, match="run.npz: logits have"):
    runs.read_run_file(path, method="gmp", sparsity=0.5, seed=3, num_classes=4)
  with pytest.raises(ValueError, match="run.npz: its labels differ"):
    runs.read_run_file(path, method="gmp", sparsity=0.5, seed=3, labels=np.array([0, 1]))


def test_experiment_directory_index_replaces_records_and_is_checked(tmp_path):
  labels = np.array([0, 1, 1])
  runs.start_experiment(tmp_path, {"num_classes": 2, "keep_dense": ["a/kernel"]},
                        np.zeros((3, 4)), labels)
  for acc in (0.1, 0.2):  # the same file twice: one record, the last one
    runs.add_run(tmp_path, method="pruned+mitigation", sparsity=0.9, seed=0,
                 logits=np.zeros((3, 2)), extra={"accuracy": acc})
  runs.add_run(tmp_path, method="dense", sparsity=0.0, seed=0, logits=np.zeros((3, 2)))
  index = json.loads((tmp_path / runs.INDEX).read_text())
  assert [(r["file"], r.get("accuracy")) for r in index] == [
      ("runs/pruned-mitigation_s0.9_seed0.npz", 0.2), ("runs/dense_s0_seed0.npz", None)]
  wd = runs.load_workdir(tmp_path)
  assert wd.arms() == [("pruned+mitigation", 0.9)] and wd.reference_run(0).method == "dense"
  assert wd.where("a/kernel", np.ones((2, 2))) is False
  assert wd.where("b/kernel", np.ones((2, 2))) is True
  # A new experiment in the same directory starts a new index.
  runs.start_experiment(tmp_path, {"num_classes": 2}, np.zeros((3, 4)), labels)
  assert not (tmp_path / runs.INDEX).exists()
  runs.add_run(tmp_path, method="dense", sparsity=0.0, seed=0, logits=np.zeros((3, 5)))
  with pytest.raises(ValueError, match=r"dense_s0_seed0.npz/logits has shape \(3, 5\)"):
    runs.load_workdir(tmp_path)


def test_main_loop_files(tmp_path):
  config = ml_collections.ConfigDict({"seed": 1, "pruning": {"method": "gmp"}})
  runs.write_config(tmp_path, config)
  assert json.loads((tmp_path / runs.CONFIG).read_text()) == config.to_dict()
  runs.save_params(tmp_path, {"head": {"kernel": np.ones((2, 2))}})
  with np.load(tmp_path / runs.PARAMS) as z:
    assert z.files == ["head/kernel"]
  (tmp_path / runs.METRICS).write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2}\n')
  assert runs.read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2}]
  with pytest.raises(ValueError, match="no runs.json and no run of `python -m train`"):
    runs.load_workdir(tmp_path)  # config.json but no predictions.npz
