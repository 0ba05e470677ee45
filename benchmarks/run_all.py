"""Runs every benchmark, each in its own process, and refreshes the tables in
``benchmarks/README.md`` (``make bench`` calls this).

Run: ``python -m benchmarks.run_all [--quick] [--only masks step_overhead ...]``.
With ``--quick`` each script runs its ~1-minute version and writes to
``benchmarks/results/quick/``; the README is refreshed only from full runs.

Every script listed in :data:`BENCHMARKS` takes ``--quick`` (the flags of ``common.parser``).
A results file whose README has no ``<!-- results:NAME -->`` block is written but copied nowhere
(``surgery_speed``, ``fairness`` and ``fairness_recipe`` are discussed in the top-level
README).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from benchmarks import common

BENCHMARKS = ["masks", "step_overhead", "accuracy", "state_memory", "scaling", "surgery_speed",
              "fairness", "fairness_recipe", "model_scale", "sparse_inference", "oneshot_lm"]
"""Every benchmark script, in the order ``run_all`` runs them."""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")


def update_readme(results_dir: str = common.RESULTS_DIR, readme: str = README) -> list[str]:
  """Replaces each ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` block of the
  README with ``results/NAME.md``; returns the names it refreshed."""
  if not os.path.exists(readme):
    return []
  with open(readme) as f:
    text = f.read()
  # Images next to the results files are referenced from the README's folder.
  rel = os.path.relpath(results_dir, os.path.dirname(os.path.abspath(readme)))
  done = []
  for name in BENCHMARKS:
    md = os.path.join(results_dir, f"{name}.md")
    if not os.path.exists(md):
      continue
    with open(md) as f:
      body = f.read().strip()
    # The results file's own "## title" line is dropped: the README has its own headings.
    body = re.sub(r"\A## .*\n+", "", body)
    body = re.sub(r"!\[([^]]*)\]\(([^/)]+)\)", lambda m: f"![{m[1]}]({rel}/{m[2]})", body)
    pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(\n<!-- /results:{name} -->)", re.S)
    if pattern.search(text):
      text = pattern.sub(lambda m, b=body: m.group(1) + b + m.group(2), text)
      done.append(name)
  with open(readme, "w") as f:
    f.write(text)
  return done


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true")
  p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=BENCHMARKS)
  args = p.parse_args(argv)
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  failed = []
  for name in args.only:
    cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if args.quick else [])
    common.log(f"== {' '.join(cmd[1:])}")
    start = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    common.log(f"== {name}: exit {rc} after {time.perf_counter() - start:.0f} s")
    if rc:
      failed.append(name)
  if not args.quick:
    refreshed = update_readme()
    common.log(f"== README tables refreshed: {', '.join(refreshed) or 'none'}")
  if failed:
    common.log(f"== failed: {', '.join(failed)}")
    sys.exit(1)


if __name__ == "__main__":
  main()
