"""Prometheus metrics shared by the gRPC server and the HTTP sidecar, and their endpoint.

The gRPC metric names, labels and code values are those of the Go grpc-prometheus
middleware (``grpc_code="InvalidArgument"``, as Go's codes print), so that existing
dashboards and alerts work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

# grpc_code values as Go's codes.Code prints them (grpc-prometheus), not Python's enum names.
GRPC_CODE_NAMES: dict[grpc.StatusCode, str] = {
    code: "".join(part.capitalize() for part in code.name.split("_")) for code in grpc.StatusCode
}
# Go spells it with one l.
GRPC_CODE_NAMES[grpc.StatusCode.CANCELLED] = "Canceled"
GRPC_CODE_NAMES[grpc.StatusCode.OK] = "OK"


class WorkerGauge(Gauge):
    """A gauge that one background worker sets, in the process that runs it: exposed only
    once set, so that the pod's other processes, which never update it, do not report a
    misleading 0 that dashboards and alerts would read as a value."""

    _was_set = False

    def set(self, value: float) -> None:
        self._was_set = True
        super().set(value)

    def collect(self) -> Iterable[Metric]:
        return super().collect() if self._was_set else []


GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

grpc_server_started_total = Counter(
    "grpc_server_started_total", "RPCs started on the server.", GRPC_LABELS
)
grpc_server_handled_total = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    (*GRPC_LABELS, "grpc_code"),
)
grpc_server_handling_seconds = Histogram(
    "grpc_server_handling_seconds",
    "Response latency of RPCs handled by the server (seconds).",
    GRPC_LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
grpc_server_msg_received_total = Counter(
    "grpc_server_msg_received_total", "Stream messages received by the server.", GRPC_LABELS
)
grpc_server_msg_sent_total = Counter(
    "grpc_server_msg_sent_total", "Stream messages sent by the server.", GRPC_LABELS
)

http_requests_total = Counter(
    "switchboard_http_requests_total",
    "HTTP requests answered by the sidecar.",
    ("route", "method", "status"),
)
http_request_seconds = Histogram(
    "switchboard_http_request_duration_seconds",
    "Time from request to response in the sidecar.",
    ("route", "method"),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

# Group commits (gateway.services.ingest_batcher), by batcher: inbound-commit,
# send-commits, rate-limit. A commit time that grows points at the database; a queue wait
# that grows while commits stay short points at this process (its CPU, its workers).
group_commit_seconds = Histogram(
    "switchboard_group_commit_seconds",
    "Time of one group-commit flush: its transaction, round trips included.",
    ("batcher",),
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
group_commit_wait_seconds = Histogram(
    "switchboard_group_commit_wait_seconds",
    "Time the oldest job of a batch waited before its flush began (queued, lingering).",
    ("batcher",),
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
group_commit_failures = Counter(
    "switchboard_group_commit_failures_total",
    "Group-commit flushes that failed: their jobs were failed, or retried one by one.",
    ("batcher",),
)


def create_metrics_app(registry: CollectorRegistry = REGISTRY) -> web.Application:
    """``GET /metrics`` in the Prometheus text format (process metrics included)."""

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", metrics)
    return app
