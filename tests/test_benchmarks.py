"""The benchmark machinery: interleaved timing, the JSON schema a benchmark writes, and the
README refresh. Runs one benchmark on a tiny size (seconds)."""
import json
import pathlib
import types

import jax.numpy as jnp
import pytest

from benchmarks import common, run_all
from benchmarks import masks as masks_bench


def test_interleaved_alternates_and_returns_repeats_samples():
  calls = []
  fns = {"a": lambda: calls.append("a") or jnp.zeros(()),
         "b": lambda: calls.append("b") or jnp.ones(())}
  t = common.interleaved(fns, repeats=5, warmup=1)
  # Warm-up round, then rounds whose order rotates: a b | a b, b a, a b, b a, a b.
  assert calls == ["a", "b"] + ["a", "b", "b", "a"] * 2 + ["a", "b"]
  for name in "ab":
    assert len(t[name].samples) == 5
    assert all(s > 0 for s in t[name].samples)
    assert t[name].min <= t[name].median <= max(t[name].samples)


def test_interleaved_number_per_method_and_minimum_repeats():
  counts = {"a": 0, "b": 0}

  def bump(k):
    counts[k] += 1
    return jnp.zeros(())

  common.interleaved({"a": lambda: bump("a"), "b": lambda: bump("b")}, repeats=5, warmup=0,
                     number={"a": 3})
  assert counts == {"a": 15, "b": 5}
  with pytest.raises(ValueError, match="at least 5"):
    common.interleaved({"a": lambda: 0}, repeats=4)


def test_ratio_is_median_of_paired_ratios():
  t = {"a": common.Timing("a", [2.0, 9.0, 3.0, 4.0, 5.0]),
       "b": common.Timing("b", [1.0, 1.0, 1.0, 2.0, 1.0])}
  # Per-round ratios 2, 9, 3, 2, 5 -> median 3 (the ratio of medians would be 4).
  assert common.ratio(t, "a", "b") == 3.0


def test_masks_benchmark_writes_schema(tmp_path):
  rows = masks_bench.main(["--sizes", "tiny", "--repeats", "5", "--out-dir", str(tmp_path)])
  with open(tmp_path / "masks.json") as f:
    doc = json.load(f)
  assert doc["schema"] == common.SCHEMA_VERSION and doc["benchmark"] == "masks"
  for key in ("cpu_model", "usable_cores", "jax", "jaxlib", "optax", "flax", "backend",
              "device_count"):
    assert doc["machine"][key] is not None, key
  assert doc["config"]["repeats"] == 5
  by_method = {r["method"]: r for r in doc["rows"]}
  assert set(by_method) == {name for name, _, _ in masks_bench.METHODS}
  assert len(rows) == len(doc["rows"])
  for r in doc["rows"]:
    assert len(r["samples_s"]) == 5 and r["median_s"] > 0
    assert r["vs_floor"] > 0 and r["temp_bytes"] is not None
  assert by_method["floor"]["vs_floor"] == 1.0
  n_leaves, shape = masks_bench.SIZES["tiny"]
  n = n_leaves * shape[0] * shape[1]
  per_leaf = shape[0] * shape[1]
  # Exact counts, and the same masks as the argsort baselines.
  assert by_method["jaxprune global"]["kept"] == n - round(0.9 * n)
  assert by_method["jaxprune layerwise"]["kept"] == n_leaves * (per_leaf - round(0.9 * per_leaf))
  assert by_method["jaxprune 2:4"]["kept"] == n // 2
  for name in ("jaxprune global", "jaxprune layerwise", "jaxprune 2:4"):
    assert by_method[name]["masks_equal_naive"] is True, name
    assert by_method[name]["speedup_vs_naive"] > 0
  md = (tmp_path / "masks.md").read_text()
  assert md.startswith("## Mask computation") and "| params | method |" in md


def test_update_readme_replaces_marked_blocks(tmp_path):
  results = tmp_path / "results"
  results.mkdir()
  (results / "masks.md").write_text("## Title\n\n| a |\n|---|\n| 1 |\n")
  (results / "scaling.md").write_text("## Scaling\n\n![plot](scaling.png)\n")
  readme = tmp_path / "README.md"
  readme.write_text("intro\n<!-- results:masks -->\nold\n<!-- /results:masks -->\nend\n"
                    "<!-- results:scaling -->\nold\n<!-- /results:scaling -->\n"
                    "<!-- results:state_memory -->\nkeep\n<!-- /results:state_memory -->\n")
  done = run_all.update_readme(str(results), str(readme))
  assert done == ["masks", "scaling"]
  assert readme.read_text() == (
      "intro\n<!-- results:masks -->\n| a |\n|---|\n| 1 |\n<!-- /results:masks -->\nend\n"
      "<!-- results:scaling -->\n![plot](results/scaling.png)\n<!-- /results:scaling -->\n"
      "<!-- results:state_memory -->\nkeep\n<!-- /results:state_memory -->\n")


def test_run_all_lists_every_benchmark_script(monkeypatch):
  # Every script of benchmarks/ that runs as a program is run by run_all, with --quick too.
  folder = pathlib.Path(run_all.__file__).parent
  scripts = sorted(f.stem for f in folder.glob("*.py") if f.stem != "run_all"
                   and 'if __name__ == "__main__":' in f.read_text())
  assert sorted(run_all.BENCHMARKS) == scripts
  assert {"surgery_speed", "fairness"} <= set(scripts)
  for name in scripts:  # common.parser gives every script --quick, --repeats, --out-dir
    assert "common.parser(" in (folder / f"{name}.py").read_text(), name
  commands = []
  monkeypatch.setattr(run_all.subprocess, "run", lambda cmd, **kw: commands.append(cmd[1:])
                      or types.SimpleNamespace(returncode=0))
  run_all.main(["--quick"])
  assert commands == [["-m", f"benchmarks.{name}", "--quick"] for name in run_all.BENCHMARKS]


def test_sparse_inference_benchmark_writes_sizes_and_ratios(tmp_path):
  from benchmarks import sparse_inference
  rows = sparse_inference.main(["--sizes", "tiny", "--structures", "0.9", "2:4", "--repeats", "5",
                                "--out-dir", str(tmp_path)])
  with open(tmp_path / "sparse_inference.json") as f:
    doc = json.load(f)
  assert doc["schema"] == common.SCHEMA_VERSION and doc["benchmark"] == "sparse_inference"
  assert doc["machine"]["jax"] is not None and len(doc["rows"]) == len(rows)
  sizes = [r for r in doc["rows"] if r["kind"] == "size"]
  assert {(r["dtype"], r["structure"]) for r in sizes} == {
      (d, s) for d in ("float32", "bfloat16") for s in ("0.9", "2:4")}
  for r in sizes:
    assert r["round_trip_exact"] is True
    assert r["disk_compressed_orbax_bytes"] > 0 and r["dense_npz_gzip_bytes"] > 0
  by = {(r["dtype"], r["structure"]): r for r in sizes}
  assert by[("float32", "2:4")]["formats"] == ["n_of_m"]
  assert by[("float32", "0.9")]["kernel_ratio"] < 0.14        # 32x64 + 64x32 kernels
  assert by[("float32", "2:4")]["kernel_ratio"] < 0.56
  speed = [r for r in doc["rows"] if r["kind"] == "speed"]
  methods = {(r["model"], r["structure"], r["batch"]): set() for r in speed}
  for r in speed:
    methods[(r["model"], r["structure"], r["batch"])].add(r["method"])
    assert r["ratio_vs_dense"] > 0 and r["max_abs_err"] <= 1e-4 * max(r["output_scale"], 1)
  for (model, structure, batch), ms in methods.items():
    want = {"dense", "bcoo", "bcsr"} | ({"nm_gather"} if structure == "2:4" else set())
    assert ms == want, (model, structure, batch, ms)
  md = (tmp_path / "sparse_inference.md").read_text()
  assert "### File sizes" in md and "### Inference time ÷ dense: MLP" in md


@pytest.mark.slow
def test_oneshot_lm_benchmark_quick(tmp_path, monkeypatch):
  from benchmarks import oneshot_lm
  # Its 8-device child compiles as this process does (--quick keeps the caller's XLA_FLAGS).
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  rows = oneshot_lm.main(["--quick", "--out-dir", str(tmp_path / "out"),
                          "--workdir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "d")])
  doc = json.loads((tmp_path / "out" / "oneshot_lm.json").read_text())
  assert doc["benchmark"] == "oneshot_lm" and doc["machine"]["jax"]
  assert {(r["method"], r["sparsity"]) for r in doc["rows"]} == {
      (m, "2:4") for m in ("magnitude", "wanda", "sparsegpt")} and len(rows) == 3
  for r in doc["rows"]:
    assert r["measured_sparsity"] == 0.5 and r["pruning_warm_s"] > 0
    assert r["pruning_mem_bytes"] > 0
  sharded = doc["extra"]["sharded"]
  assert all(s["masks_equal"] for s in sharded["cases"])   # 8 host devices == 1
  # chunked calibration: the per-chunk Gram matrices are gathered (not all-reduced) per batch
  assert sharded["chunk_size"] == 1
  assert sharded["calibration_collectives_per_batch"]["all-gather"] >= 1
  assert doc["extra"]["recovery"][0]["sparsity_kept"] == 0.5
  assert "| sparsegpt | 2:4 |" in (tmp_path / "out" / "oneshot_lm.md").read_text()
