"""Benchmarks for jaxprune: speed and memory, always as ratios to a baseline measured in the
same process (see ``benchmarks/README.md``). Run all with ``python -m benchmarks.run_all``.
"""
