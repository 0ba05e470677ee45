"""Benchmark 2 — training-step overhead: a jitted train step with plain optax against the same
step with ``magnitude_pruning`` (chain link) and ``rigl`` (wrapper), with and without a mask
update in the step.

Models: an MLP 1024→2440→1024 (~5M params, MSE on random data; pure JAX) and the MNIST-1D CNN
(``train.models.CNN`` when it exists, else a small inline 1-D conv net; 40-sample sequences,
10 classes, cross-entropy), each at batch 8 and 64, adam(1e-3), params and optimizer state
donated. Variants (all timed interleaved in one process, see ``benchmarks/common.py``):

* ``plain`` — ``optax.adam``.
* ``fixed masks (where only)`` — a chain link that only emits ``where(mask, u, -p)`` with masks
  fixed at init: the least any masked step can add (no schedule, no ``lax.cond``).
* ``magnitude, no update`` — ``chain(adam, magnitude_pruning(0.9, update_every=10**9))``: the
  masks were computed at step 0 (warm-up); timed steps only enforce them.
* ``magnitude, update`` — ``update_every=1``: every timed step recomputes the masks.
* ``magnitude global, update`` — the same with ``scope="global"``.
* ``rigl, no update`` / ``rigl, update`` — ``rigl(adam, sparsity=0.9, update_every=10**9 or 1)``.
* ``naive argsort, update`` — a chain link that recomputes layerwise masks every step with
  ``jnp.argsort`` (as the best-known JAX pruning library does) and enforces them the same way.

Targets: ≤ 1.03× plain for the no-update variants; ≤ 3× plain for a step that updates masks.

Run: ``python -m benchmarks.step_overhead [--quick]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common

SPARSITY = 0.9
NEVER = 10**9


def _transforms():
  """``(magnitude_pruning, rigl)`` from jaxprune (top level if exported, else the modules)."""
  import jaxprune as jp
  mag = getattr(jp, "magnitude_pruning", None)
  rig = getattr(jp, "rigl", None)
  if mag is None:
    from jaxprune.transforms import magnitude_pruning as mag
  if rig is None:
    from jaxprune.sparse_training import rigl as rig
  return mag, rig


def naive_argsort_pruning(sparsity: float) -> optax.GradientTransformation:
  """Chain link recomputing layerwise magnitude masks by ``jnp.argsort`` at every step."""
  def keep(p):
    n = p.size
    order = jnp.argsort(jnp.abs(p).ravel())
    ranks = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return (ranks >= round(sparsity * n)).reshape(p.shape)

  def update_fn(updates, state, params=None):
    out = jax.tree.map(lambda u, p: jnp.where(keep(p), u, -p) if p.ndim >= 2 else u,
                       updates, params)
    return out, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def fixed_masks(sparsity: float) -> optax.GradientTransformation:
  """Chain link holding masks fixed at init (lowest ``|w|`` pruned) and only enforcing them with
  ``where(mask, u, -p)``: the least a masked step can add (no schedule, no ``lax.cond``)."""
  def init_fn(params):
    return jax.tree.map(
        lambda p: jnp.abs(p) >= jnp.quantile(jnp.abs(p), sparsity) if p.ndim >= 2
        else jnp.ones((), bool), params)

  def update_fn(updates, masks, params=None):
    out = jax.tree.map(lambda u, m, p: jnp.where(m, u, -p) if p.ndim >= 2 else u,
                       updates, masks, params)
    return out, masks

  return optax.GradientTransformation(init_fn, update_fn)


def variants(quick: bool = False) -> dict[str, optax.GradientTransformation]:
  mag, rig = _transforms()
  adam = lambda: optax.adam(1e-3)
  out = {
      "plain": adam(),
      "fixed masks (where only)": optax.chain(adam(), fixed_masks(SPARSITY)),
      "magnitude, no update": optax.chain(adam(), mag(SPARSITY, update_every=NEVER)),
      "magnitude, update": optax.chain(adam(), mag(SPARSITY, update_every=1)),
      "magnitude global, update": optax.chain(adam(), mag(SPARSITY, update_every=1,
                                                          scope="global")),
      "rigl, no update": rig(adam(), sparsity=SPARSITY, update_every=NEVER, end_step=NEVER,
                             distribution="uniform"),
      "rigl, update": rig(adam(), sparsity=SPARSITY, update_every=1, end_step=NEVER,
                          distribution="uniform"),
      "naive argsort, update": optax.chain(adam(), naive_argsort_pruning(SPARSITY)),
  }
  if quick:
    for name in ("fixed masks (where only)", "magnitude global, update"):
      out.pop(name)
  return out


# ----------------------------------------------------------------------------- models


def mlp_problem(batch: int, sizes=(1024, 2440, 1024), seed: int = 0):
  """``(params, rest, grad_fn, x, y)`` for the MLP (pure JAX, no mutable state);
  ``grad_fn(params, rest, x, y) -> (loss, rest, grads)``."""
  keys = jax.random.split(jax.random.key(seed), len(sizes) + 1)
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"dense{i}"] = {
        "kernel": jax.random.normal(keys[i], (a, b), jnp.float32) / np.sqrt(a),
        "bias": jnp.zeros((b,), jnp.float32)}
  x = jax.random.normal(keys[-2], (batch, sizes[0]), jnp.float32)
  y = jax.random.normal(keys[-1], (batch, sizes[-1]), jnp.float32)

  def loss_fn(params, x, y):
    h = x
    for i in range(len(sizes) - 1):
      h = h @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
      if i < len(sizes) - 2:
        h = jax.nn.relu(h)
    return jnp.mean((h - y) ** 2)

  def grad_fn(params, rest, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    return loss, rest, grads

  return params, {}, grad_fn, x, y


def cnn_problem(batch: int, seed: int = 0):
  """``(params, rest, grad_fn, x, y)`` for the MNIST-1D CNN (batch stats live in ``rest``)."""
  from flax import nnx
  try:
    from train.models import CNN
    model = CNN((40,), 10, rngs=nnx.Rngs(seed))
    source = "train.models.CNN"
  except ImportError:
    model = _inline_cnn(nnx.Rngs(seed))
    source = "inline 1-D CNN"
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  kx, ky = jax.random.split(jax.random.key(seed + 1))
  x = jax.random.normal(kx, (batch, 40), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, 10)

  def grad_fn(params, rest, x, y):
    model = nnx.merge(graphdef, params, rest)
    loss_of = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_of)(model)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return loss, new_rest, grads

  grad_fn.source = source
  return params, rest, grad_fn, x, y


def _inline_cnn(rngs):
  """3 strided 1-D convs of 32 channels (kernels 5, 3, 3) and a linear head (MNIST-1D shapes)."""
  from flax import nnx

  class InlineCNN(nnx.Module):
    def __init__(self, *, rngs):
      self.c1 = nnx.Conv(1, 32, (5,), (2,), padding=[(1, 1)], rngs=rngs)
      self.c2 = nnx.Conv(32, 32, (3,), (2,), padding=[(1, 1)], rngs=rngs)
      self.c3 = nnx.Conv(32, 32, (3,), (2,), padding=[(1, 1)], rngs=rngs)
      self.head = nnx.Linear(5 * 32, 10, rngs=rngs)

    def __call__(self, x):
      x = x[..., None]
      for c in (self.c1, self.c2, self.c3):
        x = nnx.relu(c(x))
      return self.head(x.reshape(x.shape[0], -1))

  return InlineCNN(rngs=rngs)


# ----------------------------------------------------------------------------- steps


def make_step(grad_fn, tx):
  """A train step ``(params, rest, opt_state, x, y) -> (params, rest, opt_state, loss)``."""
  def step(params, rest, opt_state, x, y):
    loss, rest, grads = grad_fn(params, rest, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, loss
  return step


def bench_problem(model: str, batch: int, *, repeats: int, warmup: int, number: int,
                  names: list[str] | None = None, naive: bool = True,
                  quick: bool = False) -> list[dict]:
  """Times every variant's step on one (model, batch), interleaved; one row per variant."""
  problem = mlp_problem if model == "mlp" else cnn_problem
  params0, rest0, grad_fn, x, y = problem(batch)
  n_params = int(sum(p.size for p in jax.tree.leaves(params0)))
  txs = variants(quick)
  if names:
    txs = {k: v for k, v in txs.items() if k in names or k == "plain"}
  if not naive:
    txs.pop("naive argsort, update", None)
  common.log(f"[step] {model} batch {batch}: {n_params:,} params")
  calls, rows, carries = {}, {}, {}
  for name, tx in txs.items():
    params = jax.tree.map(jnp.copy, params0)
    rest = jax.tree.map(jnp.copy, rest0)
    opt_state = tx.init(params)
    step = make_step(grad_fn, tx)
    compiled, secs, mem = common.compile_fn(step, params, rest, opt_state, x, y,
                                            donate_argnums=(0, 1, 2))
    carry = carries[name] = [params, rest, opt_state]

    def call(compiled=compiled, carry=carry):
      carry[0], carry[1], carry[2], loss = compiled(carry[0], carry[1], carry[2], x, y)
      return carry[2], loss

    calls[name] = call
    rows[name] = {"model": model, "batch": batch, "n_params": n_params, "variant": name,
                  "compile_s": secs, "temp_bytes": (mem or {}).get("temp_bytes"),
                  "model_source": getattr(grad_fn, "source", "pure JAX MLP")}
    common.log(f"[step]   compiled {name}: {secs:.1f} s")
  # The argsort step takes seconds on the MLP: one call per sample is plenty.
  numbers = {n: (1 if n.startswith("naive") and model == "mlp" else number) for n in calls}
  timings = common.interleaved(calls, repeats=repeats, warmup=warmup, number=numbers)
  for name in txs:
    row = rows[name]
    row.update(timings[name].as_dict())
    row["vs_plain"] = common.ratio(timings, name, "plain")
    if name != "plain":
      target = 3.0 if name.endswith(", update") else 1.03
      row["target"] = target
      row["meets_target"] = row["vs_plain"] <= target
    common.log(f"[step]   {name:26s} {common.fmt_seconds(row['median_s']):>9s}  "
               f"{row['vs_plain']:6.3f}× plain")
  # The pruned fraction after the run (a check that the transforms really prune).
  for name, carry in carries.items():
    if name == "plain":
      continue
    p = carry[0]
    leaves = [leaf for leaf in jax.tree.leaves(p) if leaf.ndim >= 2]
    zeros = sum(int(jnp.sum(leaf == 0)) for leaf in leaves)
    rows[name]["sparsity_after"] = zeros / sum(leaf.size for leaf in leaves)
  return list(rows.values())


COLUMNS = [
    ("model", "model", str),
    ("batch", "batch", str),
    ("variant", "variant", str),
    ("median_s", "step (median)", common.fmt_seconds),
    ("vs_plain", "÷ plain", lambda x: f"{x:.3f}×"),
    ("target", "target", lambda x: f"≤ {x:g}×"),
    ("meets_target", "meets", lambda x: "yes" if x else "no"),
    ("sparsity_after", "sparsity", lambda x: f"{x:.3f}"),
    ("compile_s", "compile", common.fmt_seconds),
]


def main(argv=None):
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--models", nargs="+", choices=["mlp", "cnn"], default=["mlp", "cnn"])
  p.add_argument("--batches", nargs="+", type=int, default=[8, 64])
  p.add_argument("--variants", nargs="+", default=None, help="subset of variant names")
  args = p.parse_args(argv)
  repeats = args.repeats or (5 if args.quick else 9)
  warmup = 2
  machine = common.machine_info()
  rows = []
  problems = [(m, b) for m in args.models for b in args.batches]
  if args.quick:  # compiles dominate a quick run: the CNN at one batch size only
    problems = [(m, b) for m, b in problems if m == "mlp" or b == max(args.batches)]
  for model, batch in problems:
    # A sample is the mean of `number` steps: the CNN step is well under a millisecond.
    number = (3 if args.quick else 5) if model == "mlp" else (20 if args.quick else 50)
    # --quick: no seconds-long argsort step on the MLP (the CNN's is cheap).
    naive = not (args.quick and model == "mlp")
    rows += bench_problem(model, batch, repeats=repeats, warmup=warmup, number=number,
                          names=args.variants, naive=naive, quick=args.quick)
  notes = [
      f"Sparsity {SPARSITY}; adam(1e-3); params and optimizer state donated; {repeats} "
      f"interleaved rounds after {warmup} warm-up, each sample the mean of several steps "
      "(5 for the MLP, 50 for the CNN; 3 and 20 with --quick; 1 for the argsort step on the "
      "MLP).",
      "÷ plain: median of per-round ratios to the plain-optax step of the same model and "
      "batch. Targets: ≤ 1.03× without a mask update, ≤ 3× for a step that updates the masks.",
      "'no update' variants computed their masks at step 0 (in the warm-up); 'update' variants "
      "recompute them at every timed step.",
  ]
  table = common.markdown_table(rows, COLUMNS)
  paths = common.write_results(
      "step_overhead", title="Training-step overhead (benchmarks/step_overhead.py)", rows=rows,
      tables=[table], config={"models": args.models, "batches": args.batches,
                              "repeats": repeats, "warmup": warmup, "sparsity": SPARSITY,
                              "quick": args.quick},
      notes=notes, out_dir=args.out_dir, machine=machine)
  print(table)
  common.log("[step] wrote " + ", ".join(paths))
  return rows


if __name__ == "__main__":
  main()
