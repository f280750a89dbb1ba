"""Prometheus metrics of sending (default registry). Labels never carry ids or tokens."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from gateway.observability.metrics import WorkerGauge

SENDS = Counter(
    "switchboard_outbound_sends",
    "Send attempts by outcome (sent, retrying, failed, held) and the channel's error code"
    " (0: none); a message that fails before any attempt (its connection gone or needing"
    " re-authorization) counts as failed with code 0.",
    ["channel", "outcome", "code"],
)
CHANNEL_API_SECONDS = Histogram(
    "switchboard_channel_api_seconds",
    "Latency of the channel platform's API, by endpoint: send (timed by the core for every"
    " channel); Instagram's Graph calls besides: access_token, refresh_access_token, me,"
    " accounts, subscribed_apps, profile.",
    ["channel", "endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15),
)
# Set by the send worker, in the gRPC process only.
QUEUE_DEPTH = WorkerGauge(
    "switchboard_outbound_queue_depth",
    "Outbound messages QUEUED or RETRYING (as last counted by this process's worker).",
)
RATE_LIMIT_WAITS = Counter(
    "switchboard_outbound_rate_limit_waits",
    "Sends the rate limiter delayed: wait (slept briefly), hold (queued until later),"
    " refused (fail_fast).",
    ["channel", "category", "kind"],
)
RATE_LIMIT_WAIT_SECONDS = Counter(
    "switchboard_outbound_rate_limit_wait_seconds",
    "Time sends spent waiting for a rate-limit token in place.",
    ["channel", "category"],
)
ACCOUNT_PAUSES = Counter(
    "switchboard_outbound_account_pauses",
    "Times an account was paused because the channel throttled it (error or usage header).",
    ["channel", "source"],
)
