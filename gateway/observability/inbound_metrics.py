"""Prometheus metrics of webhook ingestion (default registry). Labels never carry ids."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

WEBHOOK_DELIVERIES = Counter(
    "switchboard_webhook_deliveries",
    "Webhook deliveries by outcome: accepted, test, forbidden, too_large, bad_encoding"
    " (a body that does not decode as its Content-Encoding or chunking says), malformed,"
    " unavailable, error.",
    ["channel", "outcome"],
)
WEBHOOK_REJECTED_SIGNATURES = Counter(
    "switchboard_webhook_signature_rejections",
    "Deliveries refused (403) by signature problem: missing, malformed, mismatch.",
    ["channel", "reason"],
)
INBOUND_EVENTS = Counter(
    "switchboard_inbound_events",
    "Events stored in the outbox from webhooks, by kind.",
    ["channel", "kind"],
)
INBOUND_DUPLICATES = Counter(
    "switchboard_inbound_duplicates",
    "Received or echoed messages already stored (Meta's retries and duplicates).",
    ["channel"],
)
INBOUND_QUARANTINED = Counter(
    "switchboard_inbound_quarantined",
    "Deliveries or items kept in quarantine, by reason (UNKNOWN_ACCOUNT, MALFORMED, ...).",
    ["channel", "reason"],
)
WEBHOOK_ACK_SECONDS = Histogram(
    "switchboard_webhook_ack_seconds",
    "Time from a webhook request to its 200 (events durably stored).",
    ["channel"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
INGEST_BATCH_ITEMS = Histogram(
    "switchboard_ingest_batch_items",
    "Items committed per group-commit transaction.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
)
EVENT_DELIVERY_SECONDS = Histogram(
    "switchboard_event_delivery_seconds",
    "Time from an event's receipt (received_at) to its delivery to a subscriber.",
    ["channel"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PROFILE_FETCHES = Counter(
    "switchboard_profile_fetches",
    "Background profile lookups by outcome: ok, no_credential, refused, failed.",
    ["channel", "outcome"],
)
