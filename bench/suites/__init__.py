"""Benchmark suites; each module is listed in bench.harness.SUITES."""
