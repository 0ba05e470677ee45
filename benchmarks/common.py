"""Shared benchmark machinery: interleaved timing, compiled-memory figures, machine info, and
the JSON + markdown writer every benchmark uses.

Timing rule (every speed figure in ``benchmarks/``): the candidate and its baseline run in the
same process, *interleaved* (A B A B ..., the order rotated each round so no method always runs
first), each call ends in ``jax.block_until_ready``, ``warmup`` rounds are discarded, and the
figure is the median of at least 5 rounds. A ratio is the median of the per-round ratios
``t_A / t_B``: on a shared, noisy machine, two calls made back to back see the same load, so
their ratio is steadier than either time.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MIN_REPEATS = 5
SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
  """Seconds per call of one method, one entry per measured round."""
  name: str
  samples: list[float]

  @property
  def median(self) -> float:
    return statistics.median(self.samples)

  @property
  def min(self) -> float:
    return min(self.samples)

  @property
  def iqr(self) -> tuple[float, float]:
    if len(self.samples) < 2:
      return self.samples[0], self.samples[0]
    q = statistics.quantiles(self.samples, n=4, method="inclusive")
    return q[0], q[2]

  def as_dict(self) -> dict:
    lo, hi = self.iqr
    return {"median_s": self.median, "min_s": self.min, "q25_s": lo, "q75_s": hi,
            "samples_s": list(self.samples)}


def _call(fn: Callable[[], Any], number: int) -> float:
  start = time.perf_counter()
  for _ in range(number):
    jax.block_until_ready(fn())
  return (time.perf_counter() - start) / number


def interleaved(fns: Mapping[str, Callable[[], Any]], *, repeats: int = 7, warmup: int = 1,
                number: int | Mapping[str, int] = 1) -> dict[str, Timing]:
  """Times zero-argument callables interleaved: round r calls each once (A B C, B C A, ...).

  Args:
    fns: name -> callable; what it returns is passed to ``jax.block_until_ready``. A callable
      may carry state between calls (a training step that feeds its own output back).
    repeats: measured rounds (at least 5).
    warmup: discarded rounds before them.
    number: calls per sample (the sample is their mean), for calls too short to time alone;
      one number for all, or name -> number (names not in it: 1).

  Returns:
    name -> :class:`Timing` with ``repeats`` samples (seconds per call).

  Examples:
    >>> t = interleaved({"a": lambda: 1, "b": lambda: 2}, repeats=5, warmup=0)
    >>> len(t["a"].samples), len(t["b"].samples)
    (5, 5)
  """
  if repeats < MIN_REPEATS:
    raise ValueError(f"repeats must be >= {MIN_REPEATS} (a median of at least 5), got {repeats}.")
  names = list(fns)
  num = {n: (number.get(n, 1) if isinstance(number, Mapping) else number) for n in names}
  for r in range(warmup):
    for name in names[r % len(names):] + names[:r % len(names)]:
      _call(fns[name], num[name])
  samples: dict[str, list[float]] = {n: [] for n in names}
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      samples[name].append(_call(fns[name], num[name]))
  return {n: Timing(n, s) for n, s in samples.items()}


def ratio(timings: Mapping[str, Timing], a: str, b: str) -> float:
  """Median over rounds of ``t_a / t_b`` (the paired ratio of two interleaved methods).

  Examples:
    >>> ratio({"a": Timing("a", [2., 4., 6.]), "b": Timing("b", [1., 2., 2.])}, "a", "b")
    2.0
  """
  return statistics.median(x / y for x, y in zip(timings[a].samples, timings[b].samples,
                                                 strict=True))


# ----------------------------------------------------------------------------- compile + memory


def compile_fn(fn: Callable, *args, donate_argnums=(), static_argnums=()):
  """AOT-compiles ``jax.jit(fn)`` for ``args``; returns ``(compiled, seconds, memory)``.

  ``memory`` holds the executable's own accounting (``compiled.memory_analysis()``): temp
  (scratch buffers beyond arguments and outputs), argument, output and alias bytes; None where
  the backend reports nothing.
  """
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate_argnums,
                     static_argnums=static_argnums).lower(*args).compile()
  seconds = time.perf_counter() - start
  return compiled, seconds, memory_of(compiled)


def memory_of(compiled) -> dict | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if m is None:
    return None
  fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {f.removesuffix("_size_in_bytes") + "_bytes": int(getattr(m, f, 0) or 0) for f in fields}


def peak_rss_bytes() -> int:
  """The process's peak resident set size so far (Linux reports KiB)."""
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def tree_bytes(tree) -> int:
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- machine


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
  try:
    from importlib import metadata
    return metadata.version(module)
  except Exception:  # noqa: BLE001
    return None


def _git_commit() -> str | None:
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
    return out.stdout.strip() or None
  except Exception:  # noqa: BLE001
    return None


def _jaxprune_modified() -> bool | None:
  """Whether jaxprune/ differs from the commit (numbers then belong to uncommitted code)."""
  try:
    out = subprocess.run(["git", "status", "--porcelain", "--", "jaxprune"], capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         timeout=10)
    return bool(out.stdout.strip()) if out.returncode == 0 else None
  except Exception:  # noqa: BLE001
    return None


def machine_info() -> dict:
  """CPU model, cores, memory, library versions, backend and devices of this process."""
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  try:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError):
    mem = None
  devices = jax.devices()
  return {
      "cpu_model": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "usable_cores": usable,
      "memory_bytes": mem,
      "load_average": list(os.getloadavg()),
      "python": platform.python_version(),
      "platform": platform.platform(),
      "jax": _version("jax"),
      "jaxlib": _version("jaxlib"),
      "optax": _version("optax"),
      "flax": _version("flax"),
      "numpy": _version("numpy"),
      "backend": jax.default_backend(),
      "device_count": jax.device_count(),
      "device_kind": devices[0].device_kind if devices else None,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "git_commit": _git_commit(),
      "jaxprune_modified": _jaxprune_modified(),
  }


# ----------------------------------------------------------------------------- output


def fmt_seconds(s: float | None) -> str:
  if s is None:
    return "—"
  if s >= 1:
    return f"{s:.2f} s"
  if s >= 1e-3:
    return f"{s * 1e3:.1f} ms"
  return f"{s * 1e6:.0f} µs"


def fmt_bytes(b: float | None) -> str:
  if b is None:
    return "—"
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if abs(b) >= scale:
      return f"{b / scale:.1f} {unit}"
  return f"{int(b)} B"


def fmt_ratio(x: float | None) -> str:
  if x is None:
    return "—"
  return f"{x:.2f}×" if x < 100 else f"{x:.0f}×"


Column = tuple[str, str, Callable[[Any], str]]


def markdown_table(rows: Sequence[Mapping], columns: Sequence[Column]) -> str:
  """A markdown table; ``columns`` are ``(key, header, formatter)``; missing keys show "—"."""
  head = "| " + " | ".join(h for _, h, _ in columns) + " |"
  rule = "|" + "|".join("---" for _ in columns) + "|"
  body = []
  for r in rows:
    cells = [fmt(r[k]) if r.get(k) is not None else "—" for k, _, fmt in columns]
    body.append("| " + " | ".join(cells) + " |")
  return "\n".join([head, rule, *body])


def machine_line(m: Mapping) -> str:
  return (f"{m['cpu_model']}, {m['usable_cores']} usable cores, backend {m['backend']} "
          f"({m['device_count']} device{'s' if m['device_count'] != 1 else ''}), "
          f"jax {m['jax']} / jaxlib {m['jaxlib']} / optax {m['optax']} / flax {m['flax']}, "
          f"load average at start {m['load_average'][0]:.1f}")


def write_results(name: str, *, title: str, rows: list[dict], tables: Sequence[str],
                  config: Mapping, notes: Sequence[str] = (), out_dir: str | None = None,
                  machine: Mapping | None = None, extra: Mapping | None = None) -> tuple[str, str]:
  """Writes ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``; returns both paths.

  The JSON holds ``schema``, ``benchmark``, ``created``, ``machine``, ``config``, ``rows``,
  ``notes`` (and ``extra``); the markdown holds the title, the machine line, the tables and
  the notes.
  """
  out_dir = out_dir or RESULTS_DIR
  os.makedirs(out_dir, exist_ok=True)
  machine = dict(machine or machine_info())
  created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
  doc = {"schema": SCHEMA_VERSION, "benchmark": name, "created": created, "machine": machine,
         "config": dict(config), "rows": rows, "notes": list(notes), "extra": dict(extra or {})}
  json_path = os.path.join(out_dir, f"{name}.json")
  with open(json_path, "w") as f:
    json.dump(doc, f, indent=1, default=_json_default)
  md = [f"## {title}", "", f"Machine: {machine_line(machine)}. Created {created}.", ""]
  for t in tables:
    md += [t, ""]
  md += [f"- {n}" for n in notes]
  md_path = os.path.join(out_dir, f"{name}.md")
  with open(md_path, "w") as f:
    f.write("\n".join(md).rstrip() + "\n")
  return json_path, md_path


def _json_default(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  return str(x)


class _Parser(argparse.ArgumentParser):
  def parse_args(self, args=None, namespace=None):
    ns = super().parse_args(args, namespace)
    if ns.out_dir is None:
      ns.out_dir = os.path.join(RESULTS_DIR, "quick") if ns.quick else RESULTS_DIR
    return ns


def parser(description: str) -> argparse.ArgumentParser:
  """The flags every benchmark script shares: ``--quick``, ``--repeats``, ``--out-dir``.

  ``--out-dir`` defaults to ``benchmarks/results`` (``benchmarks/results/quick`` with
  ``--quick``, so a quick run never overwrites the full results).
  """
  p = _Parser(description=description)
  p.add_argument("--quick", action="store_true", help="small sizes, fewer repeats (~1 min)")
  p.add_argument("--repeats", type=int, default=None,
                 help=f"measured rounds per method (>= {MIN_REPEATS})")
  p.add_argument("--out-dir", default=None,
                 help="where <name>.json/.md are written (default benchmarks/results, "
                      "or benchmarks/results/quick with --quick)")
  return p


def log(*args) -> None:
  print(*args, file=sys.stderr, flush=True)
