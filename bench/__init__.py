"""Benchmarks of softvq-fast: `python -m bench --help` (run from the repository root)."""
