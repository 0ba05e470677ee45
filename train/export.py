"""A run's final pruned model, stored compressed: ``python -m train.export --workdir DIR``.

:func:`export_run` (called by the runner at the end of a run, or by this command for a run that
has finished) writes into the run directory:

``compressed/``
    An orbax checkpoint (``train.checkpointing.save_tree``) of
    ``{"params": jp.compress(params, masks), "rest": rest}``: the pruned kernels as kept values
    plus a packed bitmask (or N:M in-group indices, or flat indices), every other leaf as it is;
    ``rest`` is the model's non-parameter state (BatchNorm statistics). Leaves are keyed by
    their path components (``params/convs/0/kernel/values``). Restore it with no target::

        from orbax.checkpoint import v1 as ocp
        tree = ocp.load("DIR/compressed")
        params = jp.decompress(tree["params"])    # nested dicts, masks applied, bit for bit

``export.json``
    Sizes in bytes: ``compressed_bytes`` (``compressed/`` on disk), ``dense_checkpoint_bytes``
    (the same model, dense with its zeros, written the same way to a temporary directory,
    measured and deleted), ``dense_npz_gzip_bytes`` (``np.savez`` of the dense-with-zeros
    arrays, then ``gzip -6``), ``training_checkpoint_bytes`` (the run's last checkpoint: model
    plus optimizer state), the raw array bytes of the prunable leaves before and after
    compression, and one row per leaf (format chosen, kept count, bytes). ``round_trip_exact``
    records that reading ``compressed/`` back gave the masked params bit for bit.

orbax compresses every array with zstd by default, so the dense checkpoint on disk is already
smaller than its raw bytes (its zeros compress well); the ratios in ``export.json`` compare what
is on disk.

A run of the main loop has its final params, masks and BatchNorm statistics in
``predictions.npz`` (:data:`train.train.PREDICTIONS`); that is what the command reads. Given a
directory holding several runs, it exports each one.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

import jaxprune as jp
from jaxprune.compress import size_summary
from train import checkpointing

__all__ = ["COMPRESSED", "EXPORT_JSON", "export_run", "export_workdir", "main", "read_run",
           "report_line", "report_table"]

COMPRESSED = "compressed"
"""The directory, inside the run's workdir, of the compressed model."""
EXPORT_JSON = "export.json"
PREDICTIONS = "predictions.npz"  # = train.train.PREDICTIONS (not imported: keeps this light)
_BLOCK = ("<!-- export -->", "<!-- /export -->")


def _dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def _flat(tree, what: str) -> dict[str, Any]:
  """``{path: leaf}`` of a pytree (or of an already flat ``{path: array}`` dict)."""
  if tree is None:
    return {}
  if isinstance(tree, Mapping) and all(isinstance(v, (np.ndarray, jax.Array, np.generic, bool))
                                       for v in tree.values()):
    return {str(k): v for k, v in tree.items()}
  paths, leaves, _ = jp.tree.flatten(tree)
  if len(set(paths)) != len(paths):
    raise ValueError(f"{what}: two leaves share a path: {sorted(paths)[:8]}")
  return dict(zip(paths, leaves, strict=True))


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``{"a/b": x}`` -> ``{"a": {"b": x}}``: plain string-keyed dicts, the form orbax gives back
  with no target."""
  out: dict[str, Any] = {}
  for path, leaf in flat.items():
    *parents, last = path.split("/")
    node = out
    for key in parents:
      node = node.setdefault(key, {})
      if not isinstance(node, dict):
        raise ValueError(f"params: '{path}' lies under a leaf")
    node[last] = leaf
  return out


def _split_model(model) -> tuple[Any, Any]:
  from flax import nnx
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return nnx.as_pure(params), nnx.as_pure(rest)


def _training_checkpoint_bytes(workdir: str) -> int | None:
  """Size of the newest step directory over the run's ``checkpoints*/`` directories."""
  best = None
  for name in sorted(os.listdir(workdir)):
    d = os.path.join(workdir, name)
    if not (name.startswith("checkpoints") and os.path.isdir(d)):
      continue
    steps = [int(s) for s in os.listdir(d) if s.isdigit() and os.path.isdir(os.path.join(d, s))]
    if steps and (best is None or max(steps) >= best[0]):
      best = (max(steps), os.path.join(d, str(max(steps))))
  return None if best is None else _dir_bytes(best[1])


def _bits_equal(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  if a.dtype != b.dtype or a.shape != b.shape:
    return False
  view = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(a.dtype.itemsize)
  return bool(np.array_equal(a.view(view), b.view(view))) if view else bool(np.array_equal(a, b))


def export_run(workdir: str | os.PathLike, params, masks=None, *, rest=None) -> dict[str, Any]:
  """Writes the compressed model (``workdir/compressed/``) and ``workdir/export.json``.

  Args:
    workdir: the run directory (created if missing); an existing ``compressed/`` is replaced.
    params: the final params (a pytree, e.g. ``nnx.as_pure(nnx.state(model, nnx.Param))``, or a
      flat ``{path: array}`` dict), or an ``nnx.Module`` (then ``rest`` is its non-Param state).
    masks: keep-masks like ``params`` (a pytree, or a flat ``{path: mask}`` dict where a missing
      path means "not pruned"); None for a model without masks (dense, or shrunk).
    rest: the model's other state (BatchNorm statistics), stored as it is; optional.

  Returns:
    What ``export.json`` holds (see the module docstring).

  Raises:
    ValueError: masks that do not fit the params, naming the leaf.

  Examples:
    >>> import tempfile, numpy as np
    >>> from train import export
    >>> w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    >>> mask = np.abs(w) > np.quantile(np.abs(w), 0.9)                 # 90% pruned
    >>> info = export.export_run(tempfile.mkdtemp(), {"fc": {"kernel": w}}, {"fc/kernel": mask})
    >>> info["round_trip_exact"], info["leaves"][0]["format"]
    (True, 'indices')
    >>> round(info["prunable"]["ratio"], 3)                             # raw array bytes
    0.127
  """
  workdir = os.path.abspath(os.fspath(workdir))
  if _is_module(params):
    params, module_rest = _split_model(params)
    rest = module_rest if rest is None else rest
  flat_params = {p: np.asarray(x) for p, x in _flat(params, "params").items()}
  flat_masks = _flat(masks, "masks")
  unknown = sorted(set(flat_masks) - set(flat_params))
  if unknown:
    raise ValueError(f"masks: paths not in the params: {unknown[:5]}")
  flat_masks = {p: np.asarray(flat_masks.get(p, True), bool) for p in flat_params}
  flat_rest = {p: np.asarray(x) for p, x in _flat(rest, "rest").items()}

  p_tree, m_tree = _nest(flat_params), _nest(flat_masks)
  compressed = {"params": jp.compress(p_tree, m_tree)}
  dense = {"params": jax.tree.map(np.asarray, jp.apply_masks(p_tree, m_tree))}
  if flat_rest:
    compressed["rest"] = dense["rest"] = _nest(flat_rest)

  os.makedirs(workdir, exist_ok=True)
  out_dir = os.path.join(workdir, COMPRESSED)
  checkpointing.save_tree(out_dir, compressed)
  restored = checkpointing.load_tree(out_dir)
  back = jp.decompress(restored["params"])
  exact = all(_bits_equal(a, b) for a, b in zip(jax.tree.leaves(back),
                                                 jax.tree.leaves(dense["params"]), strict=True))
  with tempfile.TemporaryDirectory(dir=workdir, prefix=".export-dense-") as tmp:
    checkpointing.save_tree(os.path.join(tmp, "dense"), dense)
    dense_bytes = _dir_bytes(os.path.join(tmp, "dense"))
  buf = io.BytesIO()
  np.savez(buf, **{p: x for p, x in zip(jp.tree.flatten(dense)[0], jax.tree.leaves(dense))})
  npz = buf.getvalue()

  rows = size_summary(compressed["params"])
  pruned = [r for r in rows if r["format"] != "dense"]
  raw_dense = sum(r["dense_bytes"] for r in pruned)
  raw_stored = sum(r["stored_bytes"] for r in pruned)
  compressed_bytes = _dir_bytes(out_dir)
  gz = len(gzip.compress(npz, compresslevel=6))
  info = {
      "compressed_dir": COMPRESSED,
      "compressed_bytes": compressed_bytes,
      "dense_checkpoint_bytes": dense_bytes,
      "dense_npz_bytes": len(npz),
      "dense_npz_gzip_bytes": gz,
      "training_checkpoint_bytes": _training_checkpoint_bytes(workdir),
      "ratio_vs_dense_checkpoint": compressed_bytes / dense_bytes,
      "ratio_vs_dense_npz_gzip": compressed_bytes / gz,
      "prunable": {"leaves": len(pruned), "dense_bytes": raw_dense, "stored_bytes": raw_stored,
                   "ratio": raw_stored / raw_dense if raw_dense else 1.0},
      "round_trip_exact": exact,
      "restore": "params = jp.decompress(ocp.load('compressed')['params'])",
      "leaves": [{**r, "shape": list(r["shape"])} for r in rows],
  }
  with open(os.path.join(workdir, EXPORT_JSON), "w") as f:
    json.dump(info, f, indent=1)
  return info


def _is_module(x) -> bool:
  try:
    from flax import nnx
  except ImportError:
    return False
  return isinstance(x, nnx.Module)


def _kb(b: int | None) -> str:
  if b is None:
    return "—"
  return f"{b / 1e6:.2f} MB" if b >= 1e6 else f"{b / 1e3:.1f} kB"


def report_line(info: Mapping[str, Any]) -> str:
  """One sentence for ``report.md``: the compressed model's size against the dense ones.

  Examples:
    >>> from train import export
    >>> line = export.report_line({
    ...     "compressed_bytes": 25_000, "dense_checkpoint_bytes": 100_000,
    ...     "dense_npz_gzip_bytes": 50_000, "ratio_vs_dense_checkpoint": 0.25,
    ...     "ratio_vs_dense_npz_gzip": 0.5, "prunable": {"ratio": 0.13}})
    >>> print(line.replace(", ", ",\\n"))
    compressed model (compressed/): 25.0 kB on disk,
    0.250x the dense checkpoint (100.0 kB),
    0.500x gzip of the dense-with-zeros file (50.0 kB); pruned leaves 0.130x their dense bytes
  """
  return (f"compressed model ({COMPRESSED}/): {_kb(info['compressed_bytes'])} on disk, "
          f"{info['ratio_vs_dense_checkpoint']:.3f}x the dense checkpoint "
          f"({_kb(info['dense_checkpoint_bytes'])}), {info['ratio_vs_dense_npz_gzip']:.3f}x gzip "
          f"of the dense-with-zeros file ({_kb(info['dense_npz_gzip_bytes'])}); pruned leaves "
          f"{info['prunable']['ratio']:.3f}x their dense bytes")


def report_table(info: Mapping[str, Any]) -> dict[str, list]:
  """The sizes as a small table (``{"header", "rows"}``, the ``extra`` of
  :func:`train.reporting.write_report`)."""
  c = info["compressed_bytes"]
  rows = [["compressed (jp.compress, orbax)", _kb(c), "1.000x"],
          ["dense with zeros (orbax)", _kb(info["dense_checkpoint_bytes"]),
           f"{info['dense_checkpoint_bytes'] / c:.3f}x"],
          ["dense with zeros (npz, gzip -6)", _kb(info["dense_npz_gzip_bytes"]),
           f"{info['dense_npz_gzip_bytes'] / c:.3f}x"]]
  if info.get("training_checkpoint_bytes"):
    t = info["training_checkpoint_bytes"]
    rows.append(["last training checkpoint (model + optimizer)", _kb(t), f"{t / c:.3f}x"])
  return {"header": ["stored as", "size on disk", "vs compressed"], "rows": rows}


# ----------------------------------------------------------------------------- existing runs

def read_run(run_dir: str | os.PathLike) -> tuple[dict, dict, dict]:
  """``(params, masks, rest)`` of a finished run, as flat ``{path: array}`` dicts, from its
  ``predictions.npz``."""
  path = os.path.join(os.fspath(run_dir), PREDICTIONS)
  if not os.path.exists(path):
    raise ValueError(f"workdir: {run_dir} has no {PREDICTIONS} (is the run finished?)")
  with np.load(path) as z:
    parts = {prefix: {k[len(prefix) + 1:]: z[k] for k in z.files if k.startswith(prefix + "/")}
             for prefix in ("params", "masks", "rest")}
  if not parts["params"]:
    raise ValueError(f"workdir: {path} holds no params/ entries")
  return parts["params"], parts["masks"], parts["rest"]


def _update_report(run_dir: str, info: Mapping[str, Any]) -> None:
  path = os.path.join(run_dir, "report.md")
  if not os.path.exists(path):
    return
  t = report_table(info)
  table = "\n".join(["| " + " | ".join(t["header"]) + " |",
                     "|" + "|".join("---" for _ in t["header"]) + "|"]
                    + ["| " + " | ".join(r) + " |" for r in t["rows"]])
  block = f"{_BLOCK[0]}\n## Compressed export\n\n{report_line(info)}.\n\n{table}\n{_BLOCK[1]}"
  with open(path) as f:
    text = f.read()
  if _BLOCK[0] in text and _BLOCK[1] in text:
    head, tail = text.split(_BLOCK[0], 1)
    text = head + block + tail.split(_BLOCK[1], 1)[1]
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  with open(path, "w") as f:
    f.write(text)


def export_workdir(workdir: str | os.PathLike) -> dict[str, dict[str, Any]]:
  """Exports every finished run under ``workdir`` (itself included); returns run dir -> sizes.

  Each run gets ``compressed/`` and ``export.json``, and its ``report.md`` a "Compressed export"
  section (replaced when exported again).
  """
  workdir = os.fspath(workdir)
  runs = sorted(root for root, dirs, files in os.walk(workdir) if PREDICTIONS in files
                and not os.path.basename(root).startswith("."))
  if not runs:
    raise ValueError(f"workdir: no {PREDICTIONS} under {workdir} (is the run finished?)")
  out = {}
  for run in runs:
    params, masks, rest = read_run(run)
    info = export_run(run, params, masks, rest=rest)
    _update_report(run, info)
    out[run] = info
  return out


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a run directory, or one holding several")
  args = p.parse_args(argv)
  done = export_workdir(args.workdir)
  for run, info in done.items():
    print(f"{run}: {report_line(info)}")
  return done


if __name__ == "__main__":
  main()
