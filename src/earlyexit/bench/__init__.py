"""Benchmarks: measured costs that the early-exit policies' speed-up claims rest on."""
