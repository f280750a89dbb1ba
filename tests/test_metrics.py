"""Metric conventions the dashboards and alert rules rely on."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, generate_latest

from gateway.observability.metrics import GRPC_CODE_NAMES, WorkerGauge


def test_grpc_codes_are_labelled_as_go_prints_them() -> None:
    # The values of grpc-prometheus (Go's codes.Code.String()), which dashboards filter on.
    assert GRPC_CODE_NAMES[grpc.StatusCode.OK] == "OK"
    assert GRPC_CODE_NAMES[grpc.StatusCode.CANCELLED] == "Canceled"
    assert GRPC_CODE_NAMES[grpc.StatusCode.INVALID_ARGUMENT] == "InvalidArgument"
    assert GRPC_CODE_NAMES[grpc.StatusCode.DEADLINE_EXCEEDED] == "DeadlineExceeded"
    assert GRPC_CODE_NAMES[grpc.StatusCode.DATA_LOSS] == "DataLoss"
    assert len(set(GRPC_CODE_NAMES.values())) == len(grpc.StatusCode) == 17


def test_a_worker_gauge_is_absent_until_its_worker_sets_it() -> None:
    """A process that never runs the worker must not report 0 (an alert reads it)."""
    registry = CollectorRegistry()
    gauge = WorkerGauge("switchboard_test_depth", "A depth.", registry=registry)
    assert b"switchboard_test_depth" not in generate_latest(registry)
    gauge.set(0)
    assert b"switchboard_test_depth 0.0" in generate_latest(registry)
