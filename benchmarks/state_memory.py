"""Benchmark 4 — memory of state: bytes of optimizer state each transform adds per parameter, and
the scratch memory of a training step that updates the masks.

For each transform, the state of ``tx.init(params)`` is measured leaf by leaf (``nbytes``) and
the state of the plain optimizer it wraps or follows (adam) is subtracted; the rest is what the
transform adds. Per parameter means per parameter of the whole model (biases included) and per
prunable parameter. Target: ≤ 1 byte per param for the masks, plus what the method itself needs
(movement pruning's float32 running score: 4 bytes; RigL and SET: nothing beyond the masks).

The second table is each step's ``compiled.memory_analysis().temp_size_in_bytes`` (scratch
beyond the arguments and outputs) for a jitted train step that updates the masks in that step
(``update_every=1``), against the plain-adam step: the transient memory a mask update adds.

This benchmark measures bytes, not time, so it does not depend on the machine's load.
Run: ``python -m benchmarks.state_memory [--quick]``.
"""
from __future__ import annotations

import jax
import optax

from benchmarks import common
from benchmarks.step_overhead import make_step, mlp_problem

SPARSITY = 0.9


def transforms(update_every: int = 1) -> dict[str, optax.GradientTransformation]:
  """name -> transform (all built on adam(1e-3)); ``plain`` is adam alone."""
  import jaxprune as jp
  from jaxprune import sparse_training as st
  from jaxprune import transforms as tr
  get = lambda mod, name: getattr(jp, name, None) or getattr(mod, name)
  mag, rnd = get(tr, "magnitude_pruning"), get(tr, "random_pruning")
  sal, mov = get(tr, "saliency_pruning"), get(tr, "movement_pruning")
  rigl, set_training = get(st, "rigl"), get(st, "set_training")
  adam = lambda: optax.adam(1e-3)
  u = update_every
  return {
      "plain": adam(),
      "magnitude_pruning": optax.chain(adam(), mag(SPARSITY, update_every=u)),
      "magnitude_pruning global": optax.chain(adam(), mag(SPARSITY, update_every=u,
                                                          scope="global")),
      "magnitude_pruning straight_through": optax.chain(
          adam(), mag(SPARSITY, update_every=u, straight_through=True)),
      "random_pruning": optax.chain(adam(), rnd(SPARSITY, update_every=u)),
      "saliency_pruning": sal(adam(), SPARSITY, update_every=u),
      "movement_pruning": mov(adam(), SPARSITY, update_every=u),
      "rigl": rigl(adam(), sparsity=SPARSITY, update_every=u, end_step=10**9,
                   distribution="uniform"),
      "set_training": set_training(adam(), sparsity=SPARSITY, update_every=u, end_step=10**9,
                                   distribution="uniform"),
  }


def _by_dtype(tree) -> dict[str, int]:
  out: dict[str, int] = {}
  for x in jax.tree.leaves(tree):
    if hasattr(x, "dtype"):
      out[str(x.dtype)] = out.get(str(x.dtype), 0) + int(x.nbytes)
  return out


def measure(sizes=(1024, 2440, 1024), batch: int = 8, compile_steps: bool = True) -> list[dict]:
  params, rest, grad_fn, x, y = mlp_problem(batch, sizes)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  n_prunable = sum(p.size for p in jax.tree.leaves(params) if p.ndim >= 2)
  txs = transforms()
  base_state = txs["plain"].init(params)
  base_bytes = common.tree_bytes(base_state)
  base_dtypes = _by_dtype(base_state)
  rows, plain_temp = [], None
  for name, tx in txs.items():
    state = tx.init(params)
    total = common.tree_bytes(state)
    added = total - base_bytes
    dtypes = _by_dtype(state)
    added_by_dtype = {k: v - base_dtypes.get(k, 0) for k, v in dtypes.items()
                      if v - base_dtypes.get(k, 0)}
    row = {"transform": name, "n_params": n_params, "n_prunable": n_prunable,
           "state_bytes": total, "added_bytes": added,
           "added_per_param": added / n_params, "added_per_prunable": added / n_prunable,
           "added_by_dtype": added_by_dtype}
    if compile_steps:
      _, secs, mem = common.compile_fn(make_step(grad_fn, tx), params, rest, state, x, y,
                                       donate_argnums=(0, 1, 2))
      row["step_temp_bytes"] = (mem or {}).get("temp_bytes")
      if name == "plain":
        plain_temp = row["step_temp_bytes"]
      if plain_temp is not None and row["step_temp_bytes"] is not None:
        row["step_temp_added_bytes"] = row["step_temp_bytes"] - plain_temp
      common.log(f"[state] {name}: +{added / n_params:.3f} B/param, step temp "
                 f"{common.fmt_bytes(row['step_temp_bytes'])} (compiled in {secs:.1f} s)")
    rows.append(row)
  largest_leaf = max(p.nbytes for p in jax.tree.leaves(params))
  for r in rows:
    r["largest_leaf_bytes"] = largest_leaf
    if r.get("step_temp_added_bytes") is not None:
      r["step_temp_added_over_largest_leaf"] = r["step_temp_added_bytes"] / largest_leaf
  return rows


def _dtypes(d: dict) -> str:
  return ", ".join(f"{k}: {common.fmt_bytes(v)}" for k, v in sorted(d.items())) or "—"


COLUMNS = [
    ("transform", "transform", str),
    ("added_per_param", "added B / param", lambda x: f"{x:.3f}"),
    ("added_per_prunable", "added B / prunable param", lambda x: f"{x:.3f}"),
    ("added_by_dtype", "added, by dtype", _dtypes),
    ("step_temp_bytes", "step temp (update step)", common.fmt_bytes),
    ("step_temp_added_bytes", "temp − plain", common.fmt_bytes),
    ("step_temp_added_over_largest_leaf", "(temp − plain) ÷ largest leaf",
     lambda x: f"{x:.2f}"),
]


def main(argv=None):
  p = common.parser(__doc__.splitlines()[0])
  args = p.parse_args(argv)
  sizes = (256, 610, 256) if args.quick else (1024, 2440, 1024)
  machine = common.machine_info()
  rows = measure(sizes)
  n = rows[0]["n_params"]
  notes = [
      f"MLP {'→'.join(map(str, sizes))} ({n:,} params, {rows[0]['n_prunable']:,} prunable), "
      f"adam(1e-3), sparsity {SPARSITY}; 'plain' is adam alone (its own state: "
      f"{common.fmt_bytes(rows[0]['state_bytes'])}, "
      f"{rows[0]['state_bytes'] / n:.2f} B/param).",
      "added: state bytes beyond adam's (bool masks are 1 byte per element in XLA: no bit "
      "packing in memory). Target: ≤ 1 B/param for masks plus what the method needs.",
      "step temp: `temp_size_in_bytes` of the compiled train step with a mask update in it "
      "(update_every=1), donated params and state.",
  ]
  table = common.markdown_table(rows, COLUMNS)
  paths = common.write_results(
      "state_memory", title="Memory of state (benchmarks/state_memory.py)", rows=rows,
      tables=[table], config={"mlp_sizes": list(sizes), "sparsity": SPARSITY,
                              "quick": args.quick},
      notes=notes, out_dir=args.out_dir, machine=machine)
  print(table)
  common.log("[state] wrote " + ", ".join(paths))
  return rows


if __name__ == "__main__":
  main()
