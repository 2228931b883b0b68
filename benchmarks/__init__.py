"""Benchmarks: ratios measured side by side in one run (make benchmark, make gpu-check)."""
