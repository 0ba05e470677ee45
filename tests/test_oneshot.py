"""train.oneshot: the one-shot accuracy-vs-sparsity table of the core demo."""
import pytest

from train import oneshot


@pytest.mark.slow
def test_oneshot_table_exact_sparsities_and_learning(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXPRUNE_DATA_DIR", str(tmp_path))
  graphdef, params, rest, data = oneshot.train_dense("mlp", 300, 0)
  rows = oneshot.oneshot_table(graphdef, params, rest, data)
  by = {(r["method"], r["sparsity"]): r for r in rows}
  # The MLP's kernels: 40x100, 100x100, 100x10 = 15000 prunable weights.
  sizes = (4000, 10000, 1000)
  for s in oneshot.SPARSITIES:
    assert by[("global", s)]["measured"] == pytest.approx(round(s * 15000) / 15000, abs=1e-7)
    layer = sum(round(s * n) for n in sizes) / 15000
    assert by[("layerwise", s)]["measured"] == pytest.approx(layer, abs=1e-7)
  assert by[("2:4", 0.5)]["measured"] == 0.5
  dense = by[("dense", 0.0)]["accuracy"]
  assert dense > 0.35                                # 10 classes: chance is 0.1
  assert by[("layerwise", 0.95)]["accuracy"] < dense  # pruning without fine-tuning costs
  assert "| layerwise | 0.50 |" in oneshot.format_table(rows)
