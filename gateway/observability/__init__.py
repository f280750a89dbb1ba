"""Logging (request ids, JSON or text) and Prometheus metrics."""
