"""Checkpoint integrity in train/checkpointing.py: checksums written at save, verified at
restore; a damaged checkpoint is never returned.

orbax 0.12.8 checksums the index of its zarr3 shards and its OCDBT b-tree nodes, not the array
bytes: a flipped byte in array data mostly loads without an error (issue 14: 34 of 40). Here
every flip either fails loudly or falls back to the previous step, or the restored data are
exactly what was saved.
"""

import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from train import checkpointing, models

# When TensorStore fails on a damaged file, orbax's pending reads call back into its closed
# event loop ("Event loop is closed", raised in a destructor): orbax's noise, not a failure.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(seed, step):
  model = models.create_model("mlp", input_shape=(40,), num_classes=10, rngs=nnx.Rngs(seed),
                              hidden=(32,))
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  return {"model": nnx.state(model), "opt": nnx.state(opt), "step": step, "elapsed": 1.5,
          "mask": jnp.array(True)}


def _equal(a, b):
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Steps 1 and 2 of two different states."""
  root = tmp_path_factory.mktemp("ckpt") / "ckpts"
  states = {1: _state(1, 1), 2: _state(2, 2)}
  with checkpointing.Checkpoints(root) as ckpts:
    for s, state in states.items():
      assert ckpts.save(s, state)
  return root, states


def _array_data_files(step_dir):
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state"))
                for f in fs if os.path.basename(r) == "d")


def _flip(path, offset, bit=0):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ (1 << bit)]))


def test_forty_single_byte_flips_in_array_data_never_load_silently(saved, tmp_path):
  root, states = saved
  rng = np.random.default_rng(0)
  files = [os.path.relpath(f, root) for f in _array_data_files(root / "2")]
  assert files
  outcomes = {"fell back to step 1": 0, "restored step 2, identical": 0}
  for i in range(40):
    copy = tmp_path / f"c{i}"
    shutil.copytree(root, copy)
    rel = files[rng.integers(len(files))]
    path = copy / rel
    _flip(path, int(rng.integers(os.path.getsize(path))), int(rng.integers(8)))
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      with checkpointing.Checkpoints(copy) as ckpts:
        restored = ckpts.restore(_state(0, 0))
    integrity = [w for w in caught if w.category is checkpointing.CheckpointIntegrityWarning]
    if restored["step"] == 1:
      assert _equal(restored, states[1])
      assert len(integrity) == 1 and "skipping newer ones that are not intact: step 2" in str(
          integrity[0].message)
      assert (copy / "2.corrupt").is_dir() and not (copy / "2").exists()
      outcomes["fell back to step 1"] += 1
    else:  # the flip hit bytes the restore does not read: the data are exactly the saved ones
      assert restored["step"] == 2 and _equal(restored, states[2]) and not integrity
      outcomes["restored step 2, identical"] += 1
    shutil.rmtree(copy)
  assert outcomes["fell back to step 1"] > 0


def test_flip_in_chunk_data_is_caught_by_the_checksum(saved, tmp_path):
  # The largest data file holds the kernels' chunks; flipping a byte well inside it leaves
  # TensorStore's own checks (index, b-tree) intact: only the sha256 of the leaf notices.
  root, states = saved
  copy = tmp_path / "c"
  shutil.copytree(root, copy)
  biggest = max(_array_data_files(copy / "2"), key=os.path.getsize)
  _flip(biggest, os.path.getsize(biggest) // 3)
  with checkpointing.Checkpoints(copy) as ckpts:
    with pytest.raises(checkpointing.CheckpointIntegrityError,
                       match=r"/2: the data of 1 of \d+ leaves differ from the checksums "
                             r"written at save: \['model/"):
      ckpts.restore(_state(0, 0), step=2)
    assert ckpts.steps() == [1, 2]  # an explicit step is not moved aside
    with pytest.warns(checkpointing.CheckpointIntegrityWarning, match="step 2"):
      assert _equal(ckpts.restore(_state(0, 0)), states[1])


def test_all_corrupt_names_every_checkpoint(saved, tmp_path):
  root, _ = saved
  copy = tmp_path / "c"
  shutil.copytree(root, copy)
  for s in (1, 2):
    (copy / str(s) / checkpointing.METADATA_FILE).write_text("{not json")
  with checkpointing.Checkpoints(copy) as ckpts:
    with pytest.raises(checkpointing.CheckpointIntegrityError) as info:
      ckpts.restore(_state(0, 0))
    assert sorted(info.value.failures) == [1, 2]
    for s in (1, 2):
      assert f"{copy / str(s)}: its metadata file _CHECKPOINT_METADATA cannot be read" in str(
          info.value)
    assert ckpts.steps() == [1, 2]  # nothing moved when nothing could be restored


def test_another_tree_is_refused_before_loading(saved):
  root, _ = saved
  model = models.create_model("mlp", input_shape=(40,), num_classes=10, rngs=nnx.Rngs(0),
                              hidden=(16,))
  other = {"model": nnx.state(model), "opt": nnx.state(nnx.Optimizer(model, optax.adam(1e-3),
                                                                     wrt=nnx.Param)),
           "step": 0, "elapsed": 0.0, "mask": jnp.array(False)}
  with checkpointing.Checkpoints(root) as ckpts:
    with pytest.raises(checkpointing.CheckpointIntegrityError,
                       match=r"2: it holds another tree than the one to restore .*9 leaves of "
                             r"another dtype or shape \(model/head/kernel/value: saved "
                             r"float32\(32, 10\), expected float32\(16, 10\)\)"):
      ckpts.restore(other, step=2)


def test_damaged_checksum_entry_is_not_mistaken_for_an_old_checkpoint(saved, tmp_path):
  root, states = saved
  copy = tmp_path / "c"
  shutil.copytree(root, copy)
  path = copy / "2" / checkpointing.METADATA_FILE
  path.write_text(path.read_text().replace(checkpointing.DIGESTS_KEY, "jaxprune_sha25X"))
  with checkpointing.Checkpoints(copy) as ckpts:
    with pytest.warns(checkpointing.CheckpointIntegrityWarning,
                      match=r"step 2 \(its checksums in _CHECKPOINT_METADATA are damaged\)"):
      assert _equal(ckpts.restore(_state(0, 0)), states[1])


def test_checkpoint_without_checksums_loads_with_a_warning(saved, tmp_path):
  root, states = saved
  copy = tmp_path / "c"
  shutil.copytree(root, copy)
  path = copy / "2" / checkpointing.METADATA_FILE
  meta = json.loads(path.read_text())
  meta["custom_metadata"] = {}  # as orbax wrote it before checksums existed
  path.write_text(json.dumps(meta))
  with checkpointing.Checkpoints(copy) as ckpts:
    with pytest.warns(checkpointing.CheckpointIntegrityWarning,
                      match="step 2 .* has no checksums .*loaded unverified"):
      assert _equal(ckpts.restore(_state(0, 0)), states[2])


def test_tree_digests_cover_every_leaf_kind():
  tree = {"f": jnp.arange(6.0).reshape(2, 3), "bf": jnp.ones(3, jnp.bfloat16),
          "b": jnp.array(True), "n": np.arange(3, dtype=np.uint8), "i": 7, "x": 0.5, "s": "a",
          "key": jax.random.key(0)}
  d = checkpointing.tree_digests(tree)
  assert sorted(d) == sorted(tree)
  assert d["bf"]["dtype"] == "bfloat16" and d["b"]["shape"] == [] and d["i"]["dtype"] == "int64"
  assert d["key"]["dtype"] == "uint32" and d["key"]["shape"] == [2]  # its key data
  assert all(len(v["sha256"]) == 64 for v in d.values())
  changed = checkpointing.tree_digests({**tree, "f": tree["f"].at[1, 2].set(5.000001)})
  assert [k for k in d if d[k] != changed[k]] == ["f"]
  # The same bytes in another dtype or shape hash differently.
  assert checkpointing.tree_digests({"f": tree["f"].reshape(3, 2)})["f"] != d["f"]
  assert checkpointing.tree_digests({"n": tree["n"].view(np.int8)})["n"] != d["n"]
