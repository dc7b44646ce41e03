"""Benchmarks run by ./scripts/bench; each prints its figures and ratios against its substrate."""
