"""Measurement: tokens/s benchmarks with a statistical regression verdict, quality against a reference, the
results history and its HTML report."""
