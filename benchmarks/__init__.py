"""Benchmarks that reproduce the seed paper's experiments through the real server."""
