"""Benchmarks, one script per path (``python -m bench.<name>``)."""
