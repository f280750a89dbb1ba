"""Meta's usage headers on a successful send: an account at its limit, with a time to regain
access, is paused until then (its queued messages held, fail_fast refused), and no other
account is. At 100 % of the app's limit without an estimate, it waits a default minute."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from switchboard.v1 import common_pb2

from channels.instagram.usage import DEFAULT_THROTTLE
from gateway.domain.errors import Unavailable
from tests.gateway_harness import store_connection
from tests.helpers import error_info
from tests.outbound.conftest import Out, customer_writes

AT_THE_LIMIT = {"call_count": 100, "total_time": 100, "total_cputime": 100}


async def test_a_successful_send_at_the_limit_pauses_only_that_account(out: Out) -> None:
    other_account = await out.control.create_account(username="other")
    other = await store_connection(out.gateway, out.control, other_account, tenant=out.tenant)
    other_customer, _, _ = await customer_writes(out.gateway, out.control, other)
    await out.control.set_usage(
        out.ig_id,
        business_use_case={**AT_THE_LIMIT, "estimated_time_to_regain_access": 2},
        app=AT_THE_LIMIT,
        count=1,
    )

    first = await out.send(text="one")
    # Meta accepted it: the usage only concerns what comes next.
    assert first.message.status == common_pb2.MESSAGE_STATUS_SENT
    second = await out.send(text="two")
    assert second.message.status == common_pb2.MESSAGE_STATUS_QUEUED
    assert not second.message.HasField("error")
    assert [b["message"]["text"] for b in await out.bodies()] == ["one"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await out.send(text="now or never", fail_fast=True)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == "RATE_LIMITED"
    assert "retry_at" in error_info(caught.value).metadata

    # The other account sends at once.
    elsewhere = await out.send(
        text="elsewhere", connection_id=other.id, recipient_id=other_customer
    )
    assert elsewhere.message.status == common_pb2.MESSAGE_STATUS_SENT
    assert [
        r["body"]["message"]["text"] for r in await out.control.sent(other_account["ig_id"])
    ] == ["elsewhere"]

    out.advance(60)  # one minute: still inside the two minutes Meta gave
    await out.wait_status(second.message.id, "MESSAGE_STATUS_QUEUED")
    assert len(await out.bodies()) == 1
    out.advance(70)
    held = await out.wait_status(second.message.id, "MESSAGE_STATUS_SENT")
    assert [a.number for a in held.attempts] == [1]
    assert [b["message"]["text"] for b in await out.bodies()] == ["one", "two"]


async def test_usage_below_the_limit_does_not_pause(out: Out) -> None:
    await out.control.set_usage(
        out.ig_id,
        business_use_case={"call_count": 28, "total_time": 25, "total_cputime": 25},
        app={"call_count": 28, "total_time": 25, "total_cputime": 25},
    )
    for text in ("one", "two"):
        reply = await out.send(text=text)
        assert reply.message.status == common_pb2.MESSAGE_STATUS_SENT
    reply = await out.send(text="three", fail_fast=True)
    assert reply.message.status == common_pb2.MESSAGE_STATUS_SENT
    assert len(await out.bodies()) == 3


def usage_header_pauses() -> float:
    return (
        REGISTRY.get_sample_value(
            "switchboard_outbound_account_pauses_total",
            {"channel": "instagram", "source": "usage_header"},
        )
        or 0.0
    )


async def test_app_usage_at_100_percent_pauses_the_account_for_the_default(out: Out) -> None:
    # x-app-usage only: the business header keeps the sandbox's own count and no estimate.
    await out.control.set_usage(out.ig_id, app={"call_count": 100}, count=1)
    pauses = usage_header_pauses()

    first = await out.send(text="one")
    assert first.message.status == common_pb2.MESSAGE_STATUS_SENT
    [record] = await out.control.sent(out.ig_id)
    assert record["status"] == 200
    assert usage_header_pauses() == pauses + 1
    second = await out.send(text="two")
    assert second.message.status == common_pb2.MESSAGE_STATUS_QUEUED
    assert not second.message.HasField("error")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await out.send(text="now or never", fail_fast=True)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == "RATE_LIMITED"

    half = DEFAULT_THROTTLE.total_seconds() / 2
    out.advance(half)
    await out.wait_status(second.message.id, "MESSAGE_STATUS_QUEUED")
    assert [b["message"]["text"] for b in await out.bodies()] == ["one"]
    out.advance(half + 10)
    held = await out.wait_status(second.message.id, "MESSAGE_STATUS_SENT")
    assert not held.HasField("error")
    assert [a.number for a in held.attempts] == [1]
    assert [b["message"]["text"] for b in await out.bodies()] == ["one", "two"]
    # The rule covered one send: the account's later sends report under 100 % and go at once.
    third = await out.send(text="three", fail_fast=True)
    assert third.message.status == common_pb2.MESSAGE_STATUS_SENT
    assert usage_header_pauses() == pauses + 1


async def test_app_usage_at_99_percent_does_not_pause(out: Out) -> None:
    await out.control.set_usage(
        out.ig_id, app={"call_count": 99, "total_time": 99, "total_cputime": 99}
    )
    pauses = usage_header_pauses()
    for text in ("one", "two"):
        reply = await out.send(text=text, fail_fast=True)
        assert reply.message.status == common_pb2.MESSAGE_STATUS_SENT
    assert [b["message"]["text"] for b in await out.bodies()] == ["one", "two"]
    assert usage_header_pauses() == pauses


class _PauseFails:
    """The account's limiter, except that pausing cannot reach it (Redis down just then)."""

    def __init__(self, limiter: Any) -> None:
        self._limiter = limiter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._limiter, name)

    async def pause(self, account: str, until: datetime) -> None:
        raise Unavailable("the limiter is unreachable")


async def test_a_send_is_recorded_even_when_the_pause_it_asks_for_fails(out: Out) -> None:
    service = out.gateway.gateway.outbound
    worker = out.gateway.gateway.outbound_worker
    assert service is not None
    assert worker is not None
    deliverer = service.deliverer
    await out.control.set_usage(
        out.ig_id,
        business_use_case={**AT_THE_LIMIT, "estimated_time_to_regain_access": 2},
        count=1,
    )
    limiter = deliverer.limiter
    deliverer.limiter = _PauseFails(limiter)
    try:
        reply = await out.send(text="once")
    finally:
        deliverer.limiter = limiter
    assert reply.message.status == common_pb2.MESSAGE_STATUS_SENT
    # Past the lease the first attempt held: nothing is left for the worker to send again.
    out.advance(120)
    worker.notify()
    await asyncio.sleep(0.5)
    stored = await out.get(reply.message.id)
    assert stored.status == common_pb2.MESSAGE_STATUS_SENT
    assert [a.number for a in stored.attempts] == [1]
    assert [b["message"]["text"] for b in await out.bodies()] == ["once"]
