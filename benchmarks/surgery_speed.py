"""Benchmark 6 — surgery speed-up: inference time of the dense model against the 50%- and
75%-channel-pruned models that :func:`jaxprune.surgery.shrink_module` makes physically smaller.

Models (Flax NNX, float32, built with non-trivial values everywhere, BatchNorm statistics
included):

* ``mlp`` — ``nnx.Sequential`` 1024→2048→2048→1024 with ReLU, batch 256. Both hidden layers
  shrink, so the middle kernel shrinks in both dimensions.
* ``cnn`` — three 3×3 ``nnx.Conv`` (3→64→128→128) each followed by ``nnx.BatchNorm`` (running
  averages) and ReLU, a 2×2 average pool after the second, global mean pooling and a linear
  head; 32×32×3 inputs, batch 16. All three conv widths shrink (with their BatchNorm).
* ``transformer`` — a pre-LayerNorm block: ``nnx.MultiHeadAttention`` (d_model 512, 8 heads of
  64) and an MLP 512→2048→512 with GELU, both residual; sequences of 128, batch 4. Whole heads
  (q/k/v/out projections together) and MLP hidden units shrink; d_model (the residual stream)
  cannot.

For each model and sparsity s ∈ {0.5, 0.75}: :func:`~jaxprune.surgery.channel_groups` traces the
model, :func:`~jaxprune.surgery.group_masks` removes the lowest-L2 fraction s of the channels of
every prunable group, :func:`~jaxprune.surgery.shrink_module` builds the smaller module (it checks
shrunk == masked on the tracing input), and the script checks it again on the benchmark batch.
Then the jitted forward passes of the dense and both shrunk models are timed interleaved in one
process (``benchmarks/common.py``: A B C, B C A, ..., ``block_until_ready``, median of the
per-round ratios after warm-up).

The ideal speed-up is the ratio of the models' matmul + convolution FLOPs, counted exactly from
the traced programs' shapes (``dot_general`` and ``conv_general_dilated``); for a layer whose
output (or input) alone shrinks it is ``1/(1-s)``, for a hidden×hidden layer ``1/(1-s)²``. The
target: the measured speed-up is within 15% of this ideal (``measured / ideal ≥ 0.85``). XLA's own
FLOP count (``cost_analysis``, which adds the elementwise work) is recorded as well.

Size: parameter count (``nnx.Param``) and the on-disk size of an orbax checkpoint (V1 API
through ``train/checkpointing.py``'s ``Checkpoints``) of the model's params and batch
statistics.

Run: ``python -m benchmarks.surgery_speed [--quick]``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxprune as jp
from benchmarks import common
from jaxprune import surgery

SPARSITIES = (0.5, 0.75)
TARGET = 0.85  # measured speed-up / ideal (FLOP) speed-up


# ----------------------------------------------------------------------------- models


def mlp(sizes=(1024, 2048, 2048, 1024), *, rngs: nnx.Rngs) -> nnx.Sequential:
  """An MLP: Linear layers of the given widths with ReLU between them."""
  layers = []
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
    layers.append(nnx.Linear(a, b, rngs=rngs))
    if i < len(sizes) - 2:
      layers.append(nnx.relu)
  return nnx.Sequential(*layers)


class CNN(nnx.Module):
  """Conv3×3 → BatchNorm → ReLU blocks, an average pool after the second, a linear head."""

  def __init__(self, channels=(64, 128, 128), in_features: int = 3, classes: int = 10, *,
               rngs: nnx.Rngs):
    widths = (in_features, *channels)
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), rngs=rngs)
                           for a, b in zip(widths[:-1], widths[1:], strict=False)])
    self.norms = nnx.List([nnx.BatchNorm(b, use_running_average=True, rngs=rngs)
                           for b in channels])
    self.head = nnx.Linear(channels[-1], classes, rngs=rngs)

  def __call__(self, x):
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
      x = nnx.relu(norm(conv(x)))
      if i == 1:
        x = nnx.avg_pool(x, (2, 2), (2, 2))
    return self.head(x.mean((1, 2)))


class TransformerBlock(nnx.Module):
  """Pre-LayerNorm block: x + attn(ln1(x)), then x + mlp(ln2(x)) (GELU)."""

  def __init__(self, d_model: int = 512, num_heads: int = 8, hidden: int = 2048, *,
               rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=num_heads, in_features=d_model,
                                       qkv_features=d_model, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.mlp_in = nnx.Linear(d_model, hidden, rngs=rngs)
    self.mlp_out = nnx.Linear(hidden, d_model, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln2(x))))


def build(make: Callable[[nnx.Rngs], nnx.Module], seed: int = 0) -> nnx.Module:
  """``make(rngs)`` with values drawn on the host: kernels N(0, 1/fan_in); biases, norm scales
  and BatchNorm statistics random too (so masking changes every part of the function).

  Built abstractly (``nnx.eval_shape``) and filled from numpy: no initializer compiles.
  """
  model = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  rng = np.random.default_rng(seed)

  def fill(kp, x):
    path = jp.tree.path_str(kp)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key(0)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.zeros(x.shape, x.dtype)
    if path.endswith("var"):
      v = rng.uniform(0.5, 1.5, x.shape)
    elif path.endswith("scale"):
      v = rng.uniform(0.8, 1.2, x.shape)
    elif path.endswith("kernel"):
      # q/k/v kernels are (in, heads, head_dim); every other kernel has its inputs before -1
      qkv = path.endswith(("query/kernel", "key/kernel", "value/kernel"))
      fan_in = x.shape[0] if qkv else math.prod(x.shape[:-1])
      v = rng.standard_normal(x.shape) / np.sqrt(fan_in)
    else:  # biases, BatchNorm means
      v = rng.uniform(-0.1, 0.1, x.shape)
    return jnp.asarray(v.astype(x.dtype))

  nnx.update(model, jax.tree_util.tree_map_with_path(fill, nnx.state(model)))
  return model


@dataclasses.dataclass(frozen=True)
class Problem:
  """A model to benchmark: its constructor and the input shape (batch first)."""
  name: str
  make: Callable[[nnx.Rngs], nnx.Module]
  input_shape: tuple[int, ...]


def problems(quick: bool) -> list[Problem]:
  if quick:
    return [
        Problem("mlp", lambda r: mlp((512, 1024, 1024, 512), rngs=r), (128, 512)),
        Problem("cnn", lambda r: CNN((32, 64, 64), rngs=r), (8, 16, 16, 3)),
        Problem("transformer", lambda r: TransformerBlock(256, 4, 1024, rngs=r), (4, 64, 256)),
    ]
  return [
      Problem("mlp", lambda r: mlp((1024, 2048, 2048, 1024), rngs=r), (256, 1024)),
      Problem("cnn", lambda r: CNN((64, 128, 128), rngs=r), (16, 32, 32, 3)),
      Problem("transformer", lambda r: TransformerBlock(512, 8, 2048, rngs=r), (4, 128, 512)),
  ]


# ----------------------------------------------------------------------------- surgery


def shrink_model(model: nnx.Module, sparsity: float, x: jax.Array, groups=None):
  """``(small, masks, groups)``: ``model`` with the fraction ``sparsity`` of the channels of
  every prunable group (lowest L2 norm) removed; ``masks`` are the matching group masks over
  ``nnx.state(model)``."""
  fn, state = surgery.module_fn(model)
  if groups is None:
    groups = surgery.channel_groups(fn, state, x)
  masks = surgery.group_masks(groups, state, sparsity)
  small = surgery.shrink_module(model, masks, x)  # verify=True: shrunk == masked on x
  return small, masks, groups


def masked_model(model: nnx.Module, masks) -> nnx.Module:
  """The dense model with the masks applied (zeros in place, same shapes)."""
  return nnx.merge(nnx.graphdef(model), jp.apply_masks(nnx.state(model), masks))


def forward(model: nnx.Module):
  """``(f, state)`` with ``f(state, x) == model(x)``, for ``jax.jit`` (the state is an argument,
  so XLA cannot fold the weights into the program)."""
  graphdef, state = nnx.split(model)
  return (lambda state, x: nnx.merge(graphdef, state)(x)), state


def param_count(model: nnx.Module) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def matmul_flops(fn: Callable, *args) -> int:
  """FLOPs (2 per multiply-add) of every ``dot_general`` and ``conv_general_dilated`` in the
  traced program of ``fn(*args)``, from shapes alone (sub-programs included, a ``scan`` body
  counted ``length`` times).

  Examples:
    >>> import jax.numpy as jnp
    >>> matmul_flops(lambda a, b: a @ b, jnp.ones((4, 3)), jnp.ones((3, 5)))
    120
  """
  from jax.extend import core as jcore

  def count(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        out = eqn.outvars[0].aval.shape
        total += 2 * math.prod(out) * math.prod(lhs[i] for i in lc)
      elif name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        out = eqn.outvars[0].aval.shape
        total += 2 * math.prod(out) * (math.prod(rhs) // rhs[out_dim])
      times = eqn.params.get("length", 1) if name == "scan" else 1
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          if isinstance(sub, jcore.ClosedJaxpr):
            total += times * count(sub.jaxpr)
          elif isinstance(sub, jcore.Jaxpr):
            total += times * count(sub)
    return total

  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def checkpoint_bytes(model: nnx.Module) -> int:
  """Bytes on disk of an orbax checkpoint (``train.checkpointing.Checkpoints``, orbax V1) of
  the model's params and batch statistics: every file under the step directory."""
  from train import checkpointing

  state = nnx.state(model, (nnx.Param, nnx.BatchStat))
  with tempfile.TemporaryDirectory() as root:
    with checkpointing.Checkpoints(root) as ckpts:
      ckpts.save(0, state, force=True)
    total = 0
    for dirpath, _, files in os.walk(root):
      total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
  return total


# ----------------------------------------------------------------------------- benchmark


def _samples_per_call(compiled, state, x, target_s: float) -> int:
  """Calls per timing sample so that a sample lasts about ``target_s``."""
  jax.block_until_ready(compiled(state, x))
  t = common.interleaved({"one": lambda: compiled(state, x)}, repeats=5, warmup=0)["one"].min
  return max(1, math.ceil(target_s / max(t, 1e-6)))


def bench_problem(problem: Problem, *, repeats: int, warmup: int, sample_s: float,
                  seed: int = 0) -> list[dict]:
  """Shrinks ``problem``'s model at every sparsity, checks it, times it; one row per variant."""
  model = build(problem.make, seed)
  rng = np.random.default_rng(seed + 1)
  x = jnp.asarray(rng.standard_normal(problem.input_shape).astype(np.float32))
  x_trace = x[:2]  # tracing and shrink_module's own check: a small batch is enough
  variants: dict[str, nnx.Module] = {"dense": model}
  rows: dict[str, dict] = {"dense": {"sparsity": 0.0}}
  groups = None
  for s in SPARSITIES:
    small, masks, groups = shrink_model(model, s, x_trace, groups)
    name = f"{round(100 * s)}%"
    variants[name] = small
    # the script's own check, on the full benchmark batch: shrunk == masked
    fwd_small, st_small = forward(small)
    fwd_masked, st_masked = forward(masked_model(model, masks))
    got = np.asarray(jax.jit(fwd_small)(st_small, x), np.float64)
    want = np.asarray(jax.jit(fwd_masked)(st_masked, x), np.float64)
    err = float(np.max(np.abs(got - want)))
    scale = max(1.0, float(np.max(np.abs(want))))
    if err > 1e-4 * scale:
      raise AssertionError(f"{problem.name} at sparsity {s}: shrunk differs from masked by "
                           f"{err:.3g} (scale {scale:.3g}).")
    rows[name] = {"sparsity": s, "max_abs_diff_vs_masked": err}
  prunable = [g.name for g in groups if g.prunable]
  common.log(f"[surgery] {problem.name}: prunable groups {prunable}")

  calls, number = {}, None
  for name, m in variants.items():
    f, state = forward(m)
    compiled, compile_s, _ = common.compile_fn(f, state, x)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    row = rows[name]
    row.update(model=problem.name, variant=name, input_shape=list(problem.input_shape),
               params=param_count(m), state_bytes=common.tree_bytes(state),
               checkpoint_bytes=checkpoint_bytes(m), matmul_flops=matmul_flops(f, state, x),
               xla_flops=float((cost or {}).get("flops", float("nan"))), compile_s=compile_s,
               prunable_groups=prunable)
    if number is None:  # dense first: samples of ~sample_s for the slowest variant
      number = _samples_per_call(compiled, state, x, sample_s)
    calls[name] = (lambda c=compiled, st=state: c(st, x))
  common.log(f"[surgery] {problem.name}: timing {list(calls)}, {number} calls per sample")
  timings = common.interleaved(calls, repeats=repeats, warmup=warmup, number=number)
  dense = rows["dense"]
  for name, row in rows.items():
    row.update(timings[name].as_dict())
    row["calls_per_sample"] = number
    row["speedup"] = 1.0 if name == "dense" else common.ratio(timings, "dense", name)
    per_round = [d / t for d, t in zip(timings["dense"].samples, timings[name].samples,
                                       strict=True)]
    row["speedup_q25"], _, row["speedup_q75"] = statistics.quantiles(
        per_round, n=4, method="inclusive")
    row["ideal"] = dense["matmul_flops"] / row["matmul_flops"]
    row["xla_flop_ratio"] = dense["xla_flops"] / row["xla_flops"]
    row["of_ideal"] = row["speedup"] / row["ideal"]
    row["params_ratio"] = row["params"] / dense["params"]
    row["checkpoint_ratio"] = row["checkpoint_bytes"] / dense["checkpoint_bytes"]
    if name != "dense":
      row["one_over_1_minus_s"] = 1.0 / (1.0 - row["sparsity"])
      row["target"] = TARGET
      row["meets_target"] = row["of_ideal"] >= TARGET
    common.log(f"[surgery]   {problem.name:11s} {name:5s} {row['params']:>11,d} params  "
               f"{common.fmt_seconds(row['median_s']):>9s}  speed-up {row['speedup']:5.2f}× "
               f"(ideal {row['ideal']:5.2f}×, {100 * row['of_ideal']:5.1f}%)")
  return list(rows.values())


COLUMNS = [
    ("model", "model", str),
    ("variant", "channels pruned", str),
    ("params", "params", lambda n: f"{n:,d}"),
    ("checkpoint_bytes", "checkpoint", common.fmt_bytes),
    ("median_s", "forward (median)", common.fmt_seconds),
    ("speedup", "speed-up", common.fmt_ratio),
    ("ideal", "ideal (FLOP ratio)", common.fmt_ratio),
    ("of_ideal", "of ideal", lambda x: f"{100 * x:.0f}%"),
    ("meets_target", "≥ 85%", lambda x: "yes" if x else "no"),
    ("xla_flop_ratio", "XLA FLOP ratio", common.fmt_ratio),
]


def main(argv=None):
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--models", nargs="+", choices=["mlp", "cnn", "transformer"],
                 default=["mlp", "cnn", "transformer"])
  args = p.parse_args(argv)
  repeats = args.repeats or (5 if args.quick else 15)
  warmup = 1 if args.quick else 2
  sample_s = 0.02 if args.quick else 0.25
  machine = common.machine_info()
  rows = []
  for problem in problems(args.quick):
    if problem.name in args.models:
      rows += bench_problem(problem, repeats=repeats, warmup=warmup, sample_s=sample_s)
  shapes = {pr.name: list(pr.input_shape) for pr in problems(args.quick)}
  notes = [
      f"Inputs (batch first): {shapes}. float32, jitted forward passes, the params passed as "
      f"arguments. {repeats} interleaved rounds after {warmup} warm-up; a sample is the mean of "
      f"several calls (≈{sample_s * 1e3:.0f} ms of the dense model).",
      "speed-up: median of the per-round ratios t(dense) / t(shrunk), measured in the same run. "
      "ideal: dense / shrunk FLOPs of all matmuls and convolutions, counted from the traced "
      "programs' shapes. of ideal = speed-up / ideal; the target is ≥ 85%. XLA FLOP ratio: the "
      "same ratio from XLA's cost analysis (elementwise work included).",
      "Channels pruned: the fraction of every prunable group's channels removed (lowest L2 "
      "norm): MLP hidden units, conv channels with their BatchNorm, attention heads and the "
      "transformer's MLP hidden units. Input, output and the transformer's residual width "
      "(d_model) never shrink, so the ideal is not 1/(1-s): it is higher where a layer shrinks "
      "on both sides (1/(1-s)² for hidden×hidden layers) and lower where a part is fixed.",
      "Each shrunk model was checked equal to the masked dense model on the benchmark batch "
      "(max abs diff in the JSON, `max_abs_diff_vs_masked`).",
      "checkpoint: bytes on disk of an orbax checkpoint (V1, through "
      "train.checkpointing.Checkpoints) of params and BatchNorm statistics.",
  ]
  table = common.markdown_table(rows, COLUMNS)
  paths = common.write_results(
      "surgery_speed", title="Surgery speed-up (benchmarks/surgery_speed.py)", rows=rows,
      tables=[table], config={"models": args.models, "sparsities": list(SPARSITIES),
                              "input_shapes": shapes, "repeats": repeats, "warmup": warmup,
                              "sample_s": sample_s, "target_of_ideal": TARGET,
                              "quick": args.quick},
      notes=notes, out_dir=args.out_dir, machine=machine)
  print(table)
  common.log("[surgery] wrote " + ", ".join(paths))
  return rows


if __name__ == "__main__":
  main()
