"""Prometheus metrics of the event bus (default registry), shared by both backends."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

EVENTS_PUBLISHED = Counter(
    "switchboard_bus_events_published",
    "Events appended to the bus.",
    ["backend"],
)
EVENTS_DELIVERED = Counter(
    "switchboard_bus_events_delivered",
    "Deliveries handed to consumers, redeliveries included.",
    ["backend", "group"],
)
EVENTS_ACKED = Counter(
    "switchboard_bus_events_acked",
    "Deliveries acknowledged by consumers.",
    ["backend", "group"],
)
EVENTS_FILTERED = Counter(
    "switchboard_bus_events_filtered",
    "Events acked for a group without delivery because the consumer's filters exclude them.",
    ["backend", "group"],
)
BUFFER_PARKS = Counter(
    "switchboard_bus_buffer_parks",
    "Times a consumer's buffer, full of conversations each waiting for a delivery of its "
    "own, was parked (entries kept by id, fetched again in their turn) so that the other "
    "conversations could be read.",
    ["backend", "group"],
)
EVENTS_REDELIVERED = Counter(
    "switchboard_bus_events_redelivered",
    "Deliveries made again, by reason: deadline, nack, consumer_gone.",
    ["backend", "group", "reason"],
)
IN_FLIGHT = Gauge(
    "switchboard_bus_in_flight",
    "Deliveries handed out and not yet acked, in this process.",
    ["backend", "group"],
)
GROUP_LAG = Gauge(
    "switchboard_bus_group_lag",
    "Events retained that the group has not acked yet.",
    ["backend", "group"],
)

REASON_DEADLINE = "deadline"
REASON_NACK = "nack"
REASON_CONSUMER_GONE = "consumer_gone"
EVENTS_REPUBLISHED = Counter(
    "switchboard_bus_events_republished",
    "Events the outbox relay published again because the bus lost what it held (Redis "
    "restarted without its data, failed over, or was flushed) before every group acked them.",
    ["backend"],
)
