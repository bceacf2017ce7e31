"""Benchmarks that print JSON: `wallbreak bench switch|fuse|serve`."""
