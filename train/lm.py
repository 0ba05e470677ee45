"""Training, evaluation and masked fine-tuning of the byte-level LM (:class:`train.models.
DecoderLM`) on a TFDS text dataset (default: the offline ``python_stdlib`` corpus).

``python -m train.lm --config train/configs/lm.py --workdir runs/lm`` trains the dense model,
checkpoints it (orbax, through :mod:`train.checkpointing`; running again resumes) and writes
``lm_train.json``: validation bits per byte and perplexity, wall time, tokens seen, and the
dataset's name, config and hash. :mod:`train.oneshot_lm` prunes the checkpoint.

Metrics: the mean next-byte negative log-likelihood ``L`` (nats) over every position of the
validation windows; bits per byte ``L / ln 2``; perplexity ``exp(L)`` (per byte).
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import jaxprune as jp
from train import checkpointing, lm_data, models

__all__ = ["build_model", "evaluate", "finetune", "load_data", "logits_fn", "restore", "train"]


def build_model(config: ml_collections.ConfigDict, seed: int | None = None) -> models.DecoderLM:
  """The LM of ``config.model`` (vocabulary 256: bytes)."""
  m = config.model
  return models.DecoderLM(vocab=256, context=m.context, dim=m.dim, depth=m.depth,
                          num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                          rngs=nnx.Rngs(config.seed if seed is None else seed))


def split(model: nnx.Module):
  """``(graphdef, params)``; the LM has no state besides its ``nnx.Param`` s."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"model: expected only nnx.Param state, found {list(rest.keys())}")
  return graphdef, params


def logits_fn(graphdef) -> Callable:
  """``(params, tokens) -> logits`` for a graphdef from :func:`split`."""
  def fn(params, tokens):
    return nnx.merge(graphdef, params)(tokens)
  return fn


def load_data(config: ml_collections.ConfigDict) -> lm_data.TextData:
  return lm_data.load_text(config.dataset, text_key=config.text_key, data_dir=config.data_dir,
                           splits=(config.train_split, config.eval_split,
                                   config.calibration_split))


def _nll_sums(graphdef):
  @jax.jit
  def sums(params, windows, valid):
    logits = logits_fn(graphdef)(params, windows[:, :-1]).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])
    return jnp.sum(jnp.where(valid[:, None], nll, 0.0)), jnp.sum(valid) * nll.shape[1]
  return sums


_SUMS: dict = {}


def evaluate(graphdef, params, windows: np.ndarray, batch_size: int = 32) -> dict[str, float]:
  """Bits per byte, perplexity and mean NLL of ``params`` on ``windows`` (``(n, T + 1)``),
  in fixed-shape batches (the last one padded and masked, so nothing recompiles).

  Examples:
    >>> import numpy as np, ml_collections
    >>> from train import lm
    >>> cfg = ml_collections.ConfigDict({"seed": 0, "model": {"context": 8, "dim": 16,
    ...     "depth": 1, "num_heads": 2, "mlp_ratio": 2}})
    >>> gd, params = lm.split(lm.build_model(cfg))
    >>> m = lm.evaluate(gd, params, np.zeros((3, 9), np.int32), batch_size=2)
    >>> 7.5 < m["bits_per_byte"] < 9                  # untrained: about log2(256) = 8 bits
    True
  """
  sums = _SUMS.get(graphdef)
  if sums is None:
    sums = _SUMS[graphdef] = _nll_sums(graphdef)
  total, count = 0.0, 0
  for i in range(0, len(windows), batch_size):
    w = windows[i:i + batch_size]
    valid = np.ones(len(w), bool)
    if len(w) < batch_size:
      pad = batch_size - len(w)
      w = np.concatenate([w, np.zeros((pad, w.shape[1]), w.dtype)])
      valid = np.concatenate([valid, np.zeros(pad, bool)])
    s, c = sums(params, jnp.asarray(w), jnp.asarray(valid))
    total += float(s)
    count += int(c)
  nll = total / count
  return {"nll": nll, "bits_per_byte": nll / math.log(2), "perplexity": math.exp(nll)}


def _kd_loss(student, teacher, temperature):
  t = temperature
  log_p = jax.nn.log_softmax(student / t, axis=-1)
  log_q = jax.nn.log_softmax(teacher / t, axis=-1)
  return (t * t) * jnp.mean(jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1))


def make_step(graphdef, tx: optax.GradientTransformation, *, loss: str = "ce",
              temperature: float = 1.0) -> Callable:
  """A jitted step ``(params, opt_state, batch, teacher=None, masks=None) -> (params,
  opt_state, loss)``. ``loss="ce"``: cross-entropy on the next byte; ``"kd"``: KL from the
  teacher's logits (distillation). With ``masks``, the pruned weights are held at exactly 0."""
  fn = logits_fn(graphdef)
  if loss not in ("ce", "kd"):
    raise ValueError(f"loss: must be 'ce' or 'kd', got {loss!r}")

  def loss_fn(params, batch, teacher):
    logits = fn(params, batch["tokens"]).astype(jnp.float32)
    if loss == "ce":
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    target = jax.lax.stop_gradient(fn(teacher, batch["tokens"]).astype(jnp.float32))
    return _kd_loss(logits, target, temperature)

  @jax.jit
  def step(params, opt_state, batch, teacher=None, masks=None):
    value, grads = jax.value_and_grad(loss_fn)(params, batch, teacher)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if masks is not None:
      params = jp.apply_masks(params, masks)
    return params, opt_state, value

  return step


def optimizer(config: ml_collections.ConfigDict, steps: int,
              lr: float) -> optax.GradientTransformation:
  """Clipped AdamW (b2 0.95) with linear warmup and cosine decay to 10% over ``steps``."""
  warmup = min(config.warmup_steps, max(steps // 10, 1))
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1),
                                                end_value=0.1 * lr)
  return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                     optax.adamw(schedule, b2=0.95, weight_decay=config.weight_decay))


def _state(params, opt_state, step):
  return {"params": params, "opt": opt_state, "step": step}


_print = functools.partial(print, flush=True)


def train(config: ml_collections.ConfigDict, workdir: str, *, log: Callable = _print) -> dict:
  """Trains the dense LM (resuming from ``workdir``'s latest checkpoint) and writes
  ``lm_train.json``; returns its contents."""
  workdir = os.path.abspath(workdir)  # orbax needs absolute paths
  os.makedirs(workdir, exist_ok=True)
  data = load_data(config)
  graphdef, params = split(build_model(config))
  tx = optimizer(config, config.num_steps, config.learning_rate)
  opt_state = tx.init(params)
  step_fn = make_step(graphdef, tx)
  start = 0
  t0 = time.perf_counter()
  eval_w = lm_data.eval_windows(data.streams[config.eval_split], config.model.context,
                                config.eval_windows or None)
  history = []
  with checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"),
                                 every=config.checkpoint_every, keep=1) as ckpts:
    if ckpts.latest_step() is not None:
      restored = ckpts.restore(_state(params, opt_state, 0))
      params, opt_state, start = restored["params"], restored["opt"], int(restored["step"])
      log(f"resumed at step {start}")
    loss = float("nan")
    for t in range(start, config.num_steps):
      batch = lm_data.train_batch(data.streams[config.train_split], t,
                                  batch_size=config.batch_size, context=config.model.context,
                                  seed=config.seed)
      params, opt_state, loss = step_fn(params, opt_state, batch)
      done = t + 1
      if done % config.log_every == 0 or done == config.num_steps:
        log(f"step {done}: train loss {float(loss):.4f} "
            f"({float(loss) / math.log(2):.3f} bits/byte), {time.perf_counter() - t0:.0f} s")
      if done % config.eval_every == 0 and done < config.num_steps:
        m = evaluate(graphdef, params, eval_w, config.eval_batch_size)
        history.append({"step": done, **m})
        log(f"step {done}: validation {m['bits_per_byte']:.4f} bits/byte")
      ckpts.save(done, _state(params, opt_state, done), force=done == config.num_steps)
  seconds = time.perf_counter() - t0
  final = evaluate(graphdef, params, eval_w, config.eval_batch_size)
  out = {"steps": config.num_steps, "resumed_from": start, "train_seconds": seconds,
         "tokens_seen": config.num_steps * config.batch_size * config.model.context,
         "params": int(sum(x.size for x in jax.tree.leaves(params))),
         "validation": final, "history": history, "dataset": data.info,
         "eval_windows": int(len(eval_w)), "config": config.to_dict()}
  with open(os.path.join(workdir, "lm_train.json"), "w") as f:
    json.dump(out, f, indent=1, default=str)
  log(f"dense: validation {final['bits_per_byte']:.4f} bits/byte, perplexity "
      f"{final['perplexity']:.3f}, {seconds:.0f} s")
  return out


def restore(config: ml_collections.ConfigDict, workdir: str):
  """``(graphdef, params)`` of the latest checkpoint in ``workdir`` (from :func:`train`)."""
  workdir = os.path.abspath(workdir)
  graphdef, params = split(build_model(config))
  tx = optimizer(config, config.num_steps, config.learning_rate)
  with checkpointing.Checkpoints(os.path.join(workdir, "checkpoints")) as ckpts:
    if ckpts.latest_step() is None:
      raise ValueError(f"workdir: no LM checkpoint in {workdir}/checkpoints; train it first "
                       "(python -m train.lm --config train/configs/lm.py --workdir ...)")
    restored = ckpts.restore(_state(params, tx.init(params), 0))
  return graphdef, restored["params"]


_FINETUNE: dict = {}


def finetune(config: ml_collections.ConfigDict, graphdef, params, masks, data: lm_data.TextData,
             *, loss: str, teacher=None, seed: int = 1) -> tuple[Any, list[float]]:
  """``config.recovery.steps`` of AdamW on ``params`` with ``masks`` held (pruned weights stay
  exactly 0): ``loss="ce"`` on the training data, or ``"kd"``, distillation from ``teacher``
  (the dense params). Returns the params and the loss every 10 steps."""
  r = config.recovery
  key = (graphdef, loss, r.steps, r.learning_rate, r.temperature, config.warmup_steps,
         config.weight_decay, config.grad_clip)
  if key not in _FINETUNE:
    tx = optimizer(config, r.steps, r.learning_rate)
    _FINETUNE[key] = tx, make_step(graphdef, tx, loss=loss, temperature=r.temperature)
  tx, step = _FINETUNE[key]
  opt_state = tx.init(params)
  losses = []
  for t in range(r.steps):
    batch = lm_data.train_batch(data.streams[config.train_split], t, batch_size=r.batch_size,
                                context=config.model.context, seed=seed)
    params, opt_state, value = step(params, opt_state, batch,
                                    teacher if loss == "kd" else None, masks)
    if t % 10 == 0 or t == r.steps - 1:
      losses.append(float(value))
  return params, losses


def main(argv=None) -> dict:
  from absl import app, flags, logging
  from ml_collections import config_flags

  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, lm_train.json).")
  config_flags.DEFINE_config_file("config", "train/configs/lm.py", "LM config file.",
                                  lock_config=True)
  flags.mark_flags_as_required(["workdir"])
  result = {}

  def run(args):
    del args
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
      logging.set_verbosity(logging.WARNING)
    result.update(train(flags.FLAGS.config, flags.FLAGS.workdir))

  app.run(run, argv=argv)
  return result


if __name__ == "__main__":
  main()
