"""Benchmarks that print figures (never timed tests). Run each from the repository root: `python -m bench.<name>`."""
