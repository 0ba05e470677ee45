"""Benchmark 5 — scaling of mask computation: with the parameter count (1M → 100M, 50 leaves,
one device) and with the device count (1, 2, 4, 8 host devices, params sharded), plotted
log-log in ``results/scaling.png``.

Part 1 times ``floor`` / ``masks pass`` / ``jaxprune global`` / ``jaxprune layerwise`` (and the
naive argsort method up to ``--naive-max-params``) from ``benchmarks/masks.py`` at each size,
interleaved, and fits the log-log slope (1.0 = linear in the parameter count).

Part 2 runs one child process per device count with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``: every leaf is sharded over a 1-D mesh
along its last axis (``jax.make_mesh``, default axis types, inside ``jax.set_mesh``), and the
child times the same
methods and checks that the masks come out sharded like the params. Host devices share the
machine's cores, so this measures the cost of partitioning the computation (on 2 cores, 8
devices cannot be faster than 1), not a speed-up from more hardware.

Run: ``python -m benchmarks.scaling [--quick]``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np

from benchmarks import common
from benchmarks import masks as mb

# 50 leaves each, so only the leaf size changes with the parameter count.
SIZES = {
    "1M": (50, (100, 200)),
    "5M": (50, (200, 500)),
    "20M": (50, (400, 1000)),
    "50M": (50, (1000, 1000)),
    "100M": (50, (1000, 2000)),
}
METHODS = {
    "floor": mb.floor,
    "masks pass": mb.masks_pass,
    "jaxprune global": mb.jp_global,
    "jaxprune layerwise": mb.jp_layerwise,
    "naive global": mb.naive_global,
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _time_methods(params, names, repeats):
  compiled, info = {}, {}
  for name in names:
    c, secs, mem = common.compile_fn(METHODS[name], params)
    compiled[name] = c
    info[name] = {"compile_s": secs, "temp_bytes": (mem or {}).get("temp_bytes")}
    jax.block_until_ready(c(params))  # warm-up
  t = common.interleaved({n: (lambda c=c: c(params)) for n, c in compiled.items()},
                         repeats=repeats, warmup=0)
  for name in names:
    info[name].update(t[name].as_dict())
    info[name]["vs_floor"] = common.ratio(t, name, "floor")
  return info, compiled


def by_params(sizes, *, repeats, naive_max_params, layerwise=True) -> list[dict]:
  rows = []
  for label in sizes:
    n_leaves, shape = SIZES[label]
    n = n_leaves * math.prod(shape)
    names = ["floor", "masks pass", "jaxprune global"] + (["jaxprune layerwise"] if layerwise
                                                          else [])
    if naive_max_params is None or n <= naive_max_params:
      names.append("naive global")
    common.log(f"[scaling] {label}: {n:,} params, methods {names}")
    params = mb.make_params(n_leaves, shape)
    info, _ = _time_methods(params, names, repeats)
    for name in names:
      rows.append({"part": "params", "size": label, "n_params": n, "n_leaves": n_leaves,
                   "devices": 1, "method": name, **info[name]})
      common.log(f"[scaling]   {name:20s} {common.fmt_seconds(info[name]['median_s'])}")
    del params
  return rows


def child(size: str, repeats: int, methods: list[str]) -> dict:
  """Runs in a process with N host devices: shards the params, times, checks shardings."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  n_dev = jax.device_count()
  mesh = jax.make_mesh((n_dev,), ("x",))
  sharding = NamedSharding(mesh, P(None, "x"))
  n_leaves, shape = SIZES[size]
  with jax.set_mesh(mesh):
    params = jax.device_put(mb.make_params(n_leaves, shape), sharding)
    info, compiled = _time_methods(params, ["floor"] + methods, repeats)
    for name in methods:
      if name.startswith("jaxprune"):
        out = compiled[name](params)
        info[name]["masks_sharded_like_params"] = all(
            m.sharding.is_equivalent_to(p.sharding, p.ndim)
            for m, p in zip(jax.tree.leaves(out), jax.tree.leaves(params)))
  return {"devices": n_dev, "size": size, "n_params": n_leaves * math.prod(shape),
          "mesh_axis_types": str(getattr(mesh, "axis_types", "")), "methods": info}


def by_devices(size, device_counts, *, repeats, methods, timeout=900) -> list[dict]:
  rows = []
  for n in device_counts:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={n}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--child", "--size", size,
           "--repeats", str(repeats), "--methods", *methods]
    common.log(f"[scaling] {n} device(s): {size}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)
    if proc.returncode != 0:
      err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no stderr"
      common.log(f"[scaling]   failed: {err}")
      rows.append({"part": "devices", "size": size, "devices": n, "method": "(all)",
                   "error": err})
      continue
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, info in res["methods"].items():
      rows.append({"part": "devices", "size": size, "n_params": res["n_params"], "devices": n,
                   "method": name, **info})
      common.log(f"[scaling]   {name:20s} {common.fmt_seconds(info['median_s'])}")
  return rows


def slopes(rows) -> dict[str, float]:
  """Least-squares slope of log(time) against log(params) per method (part 1)."""
  out = {}
  for name in METHODS:
    pts = [(r["n_params"], r["median_s"]) for r in rows
           if r["part"] == "params" and r["method"] == name and "median_s" in r]
    if len(pts) >= 2:
      x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
      out[name] = float(np.polyfit(x, y, 1)[0])
  return out


def plot(rows, path) -> str | None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
  for name in METHODS:
    pts = sorted((r["n_params"], r["median_s"]) for r in rows
                 if r["part"] == "params" and r["method"] == name and "median_s" in r)
    if pts:
      a1.plot(*zip(*pts), marker="o", label=name)
    dts = sorted((r["devices"], r["median_s"]) for r in rows
                 if r["part"] == "devices" and r["method"] == name and "median_s" in r)
    if dts:
      a2.plot(*zip(*dts), marker="o", label=name)
  xs = sorted({r["n_params"] for r in rows if r["part"] == "params"})
  floor_pts = {r["n_params"]: r["median_s"] for r in rows
               if r["part"] == "params" and r["method"] == "floor" and "median_s" in r}
  if xs and xs[0] in floor_pts:
    a1.plot(xs, [floor_pts[xs[0]] * x / xs[0] for x in xs], "k:", lw=1, label="slope 1")
  for ax, xl, title in ((a1, "parameters", "time vs parameter count (1 device)"),
                        (a2, "host devices (params sharded)", "time vs device count")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xl)
    ax.set_ylabel("seconds per call (median)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  dev_sizes = {r["size"] for r in rows if r["part"] == "devices"}
  if dev_sizes:
    a2.set_title(f"time vs device count ({', '.join(sorted(dev_sizes))} params)")
  a2.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
  a2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


COLUMNS = [
    ("part", "part", str),
    ("size", "params", str),
    ("devices", "devices", str),
    ("method", "method", str),
    ("median_s", "median", common.fmt_seconds),
    ("vs_floor", "÷ floor", common.fmt_ratio),
    ("compile_s", "compile", common.fmt_seconds),
    ("temp_bytes", "temp memory", common.fmt_bytes),
    ("masks_sharded_like_params", "masks sharded like params",
     lambda x: "yes" if x else "NO"),
    ("error", "error", str),
]


def main(argv=None):
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--child", action="store_true", help=argparse_hidden())
  p.add_argument("--size", default="20M", choices=list(SIZES),
                 help="size for the device-count part")
  p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=None)
  p.add_argument("--devices", nargs="+", type=int, default=None,
                 help="device counts (default 1 2 4 8; 1 8 with --quick)")
  p.add_argument("--methods", nargs="+", default=None)
  p.add_argument("--naive-max-params", type=int, default=None,
                 help="naive argsort only up to this many params (default 5M; 1M in --quick)")
  p.add_argument("--replot", action="store_true",
                 help="only redraw scaling.png from <out-dir>/scaling.json")
  args = p.parse_args(argv)
  repeats = args.repeats or 5
  if args.replot:
    with open(os.path.join(args.out_dir, "scaling.json")) as f:
      return plot(json.load(f)["rows"], os.path.join(args.out_dir, "scaling.png"))
  if args.child:
    methods = args.methods or ["masks pass", "jaxprune global", "jaxprune layerwise"]
    print(json.dumps(child(args.size, repeats, methods)))
    return None
  sizes = args.sizes or (["1M", "20M"] if args.quick else list(SIZES))
  naive_max = args.naive_max_params or (1_000_000 if args.quick else 5_000_000)
  dev_size = "1M" if args.quick else args.size
  dev_methods = args.methods or (["jaxprune global"] if args.quick
                                 else ["masks pass", "jaxprune global", "jaxprune layerwise"])
  devices = args.devices or ([1, 8] if args.quick else [1, 2, 4, 8])
  machine = common.machine_info()
  rows = by_params(sizes, repeats=repeats, naive_max_params=naive_max, layerwise=not args.quick)
  rows += by_devices(dev_size, devices, repeats=repeats, methods=dev_methods)
  fit = slopes(rows)
  os.makedirs(args.out_dir, exist_ok=True)
  png = plot(rows, os.path.join(args.out_dir, "scaling.png"))
  dev_med = {(r["method"], r["devices"]): r["median_s"] for r in rows
             if r["part"] == "devices" and "median_s" in r}
  notes = [
      "Log-log slope of time against parameter count (1.0 = linear): "
      + ", ".join(f"{k} {v:.2f}" for k, v in fit.items()) + ".",
      f"Naive argsort measured up to {naive_max:,} params. {repeats} interleaved rounds after "
      "one warm-up call per method; sizes are 50 leaves each.",
      f"Device part: {dev_size} params, each leaf sharded along its last axis over "
      "`jax.make_mesh((N,), ('x',))`, one child process per N; the host devices share "
      f"{machine['usable_cores']} cores.",
  ]
  for m in dev_methods:
    if (m, 1) in dev_med and (m, max(devices)) in dev_med:
      notes.append(f"{m}: {max(devices)} devices / 1 device = "
                   f"{dev_med[(m, max(devices))] / dev_med[(m, 1)]:.2f}× the time.")
  tables = [common.markdown_table(rows, COLUMNS)]
  if png:
    tables.append("![scaling](scaling.png)")
  paths = common.write_results(
      "scaling", title="Scaling of mask computation (benchmarks/scaling.py)", rows=rows,
      tables=tables, config={"sizes": {s: SIZES[s] for s in sizes}, "device_size": dev_size,
                             "devices": devices, "repeats": repeats, "quick": args.quick,
                             "naive_max_params": naive_max},
      notes=notes, out_dir=args.out_dir, machine=machine, extra={"slopes": fit, "plot": png})
  print(tables[0])
  common.log("[scaling] wrote " + ", ".join(paths) + (f", {png}" if png else ""))
  return rows


def argparse_hidden():
  import argparse
  return argparse.SUPPRESS


if __name__ == "__main__":
  main()
