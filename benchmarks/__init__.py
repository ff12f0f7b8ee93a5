"""Benchmarks: measured apart from the test suite (each has a smoke test on a tiny grid)."""
