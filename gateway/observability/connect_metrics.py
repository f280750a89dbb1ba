"""Metrics of connections and their tokens (labels never carry a token or an account id)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from gateway.observability.metrics import WorkerGauge

connections = Gauge(
    "switchboard_connections",
    "Connections by channel and status (updated by the refresh worker).",
    ("channel", "status"),
)
token_refreshes_total = Counter(
    "switchboard_token_refreshes_total",
    "Token refresh attempts by outcome: refreshed, not_yet, failed, needs_reauth, skipped.",
    ("channel", "outcome"),
)
subscription_checks_total = Counter(
    "switchboard_subscription_checks_total",
    "Webhook subscription checks by outcome: active, resubscribed, failed, needs_reauth.",
    ("channel", "outcome"),
)
# Set by the refresh worker, in the gRPC process only.
token_nearest_expiry_seconds = WorkerGauge(
    "switchboard_token_nearest_expiry_seconds",
    "Seconds until the earliest token expiry among connected accounts (NaN: none expires).",
)
