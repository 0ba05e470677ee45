"""One-shot pruning without fine-tuning: accuracy vs sparsity for four ways of choosing masks.

Trains a dense model on MNIST-1D (Adam, in the training loop of every recipe), then prunes a
copy at each sparsity with layerwise magnitude masks, one global threshold, ERK per-layer
sparsities, and 2:4, and evaluates each on the test split. No fine-tuning: the table shows
what the masks alone cost.

Usage::

    python -m train.oneshot [--model mlp] [--steps 3000] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxprune as jp
from train import input_pipeline, models
from train.trainer import Trainer, make_mesh

SPARSITIES = (0.5, 0.8, 0.9, 0.95)


def train_dense(model_name: str, steps: int, seed: int, *, batch_size: int = 128,
                learning_rate: float = 1e-2):
  """Trains a dense model with Adam (cosine decay) in :meth:`train.trainer.Trainer.run`, the
  loop of every recipe; returns ``(graphdef, params, rest, data)``."""
  data = input_pipeline.get_datasets("mnist1d", batch_size=batch_size, seed=seed)
  model = models.create_model(model_name, input_shape=data.info.input_shape,
                              num_classes=data.info.num_classes, rngs=nnx.Rngs(seed))
  lr = optax.cosine_decay_schedule(learning_rate, steps)
  trainer = Trainer(model, optax.adam(lr), mesh=make_mesh(), lr=lr)
  trainer.run(data.train.batch, 0, steps)
  graphdef, params, rest = nnx.split(trainer.model(), nnx.Param, ...)
  return graphdef, params, rest, data


def _apply(graphdef, params, rest, x, *, train: bool):
  model = nnx.merge(graphdef, params, rest, copy=True)
  view = models.train_view(model) if train else models.eval_view(model)
  logits = view(x)
  return logits, nnx.state(model, nnx.Not(nnx.Param))


def evaluate(graphdef, params, rest, data) -> float:
  """Test accuracy over the whole test split."""
  @jax.jit
  def correct(params, x, y, mask):
    logits, _ = _apply(graphdef, params, rest, x, train=False)
    return jnp.sum((jnp.argmax(logits, -1) == y) & mask)
  hits = sum(int(correct(params, b["x"], b["label"], b["mask"])) for b in data.test)
  return hits / data.test.num_examples


def oneshot_table(graphdef, params, rest, data) -> list[dict]:
  """Rows of (method, target sparsity, measured sparsity, accuracy)."""
  scores = jp.magnitude_scores(params)
  methods = {
      "layerwise": lambda s: jp.topk_mask(scores, s),
      "global": lambda s: jp.topk_mask(scores, s, scope="global"),
      "erk": lambda s: jp.topk_mask(scores, jp.erk_sparsities(params, s)),
  }
  rows = [{"method": "dense", "sparsity": 0.0, "measured": 0.0,
           "accuracy": evaluate(graphdef, params, rest, data)}]
  for name, make in methods.items():
    for s in SPARSITIES:
      masks = make(s)
      pruned = jp.apply_masks(params, masks)
      rows.append({"method": name, "sparsity": s, "measured": float(jp.sparsity(masks)),
                   "accuracy": evaluate(graphdef, pruned, rest, data)})
  nm_ok = all(x.shape[-2] % 4 == 0 for x in jax.tree.leaves(params) if x.ndim >= 2)
  if nm_ok:
    masks = jp.topk_mask(scores, 0.5, structure=jp.n_of_m(2, 4))
    rows.append({"method": "2:4", "sparsity": 0.5, "measured": float(jp.sparsity(masks)),
                 "accuracy": evaluate(graphdef, jp.apply_masks(params, masks), rest, data)})
  return rows


def format_table(rows: list[dict]) -> str:
  lines = ["| method | sparsity | measured | test accuracy |", "|---|---:|---:|---:|"]
  lines += [f"| {r['method']} | {r['sparsity']:.2f} | {r['measured']:.4f} | "
            f"{100 * r['accuracy']:.1f}% |" for r in rows]
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="mlp")
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  graphdef, params, rest, data = train_dense(args.model, args.steps, args.seed)
  print(f"trained dense {args.model} for {args.steps} steps in "
        f"{time.perf_counter() - t0:.0f} s")
  print(jp.summary(params))
  rows = oneshot_table(graphdef, params, rest, data)
  print(format_table(rows))
  return rows


if __name__ == "__main__":
  main()
