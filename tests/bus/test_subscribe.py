"""Messaging.Subscribe end to end: a real grpc.aio server on port 0, real stubs, real buses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2
from switchboard.v1 import events_pb2, messaging_pb2, messaging_pb2_grpc

from gateway.api.convert_events import event_to_proto
from gateway.api.subscribe import bus_group, run_subscribe
from gateway.domain.bus import Bus
from gateway.domain.events import EventKind
from gateway.domain.models import ApiToken, Scope
from tests.bus.conftest import Harness, make_event

TOKEN = ApiToken(id="tok_1", name="ai", tenants=("t1",), scopes=frozenset({Scope.SUBSCRIBE}))


class _Messaging(messaging_pb2_grpc.MessagingServicer):
    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def Subscribe(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[messaging_pb2.SubscribeResponse]:
        # As the real servicer does: grpc.aio streams what an async generator yields.
        async for response in run_subscribe(self._bus, request_iterator, context, TOKEN):
            yield response


@pytest.fixture
async def stub(harness: Harness) -> AsyncIterator[messaging_pb2_grpc.MessagingStub]:
    server = grpc.aio.server()
    messaging_pb2_grpc.add_MessagingServicer_to_server(_Messaging(harness.bus), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield messaging_pb2_grpc.MessagingStub(channel)
    finally:
        await server.stop(grace=None)


def start(group: str = "g", **kwargs: Any) -> messaging_pb2.SubscribeRequest:
    return messaging_pb2.SubscribeRequest(
        start=messaging_pb2.SubscribeStart(group=group, consumer="c1", **kwargs)
    )


def ack(*delivery_ids: str) -> messaging_pb2.SubscribeRequest:
    return messaging_pb2.SubscribeRequest(ack=messaging_pb2.Ack(delivery_ids=delivery_ids))


async def test_the_first_message_must_be_start(stub: messaging_pb2_grpc.MessagingStub) -> None:
    call = stub.Subscribe()
    await call.write(ack("x"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start" in (err.value.details() or "")


async def test_tenants_outside_the_token_are_denied(
    stub: messaging_pb2_grpc.MessagingStub,
) -> None:
    call = stub.Subscribe()
    await call.write(start(tenant_ids=["t2"]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "t2" in (err.value.details() or "")


async def test_headers_arrive_once_the_subscription_is_live(
    harness: Harness, stub: messaging_pb2_grpc.MessagingStub
) -> None:
    call = stub.Subscribe()
    await call.write(start(group="live"))
    headers = dict(await asyncio.wait_for(call.initial_metadata(), 5.0))
    assert headers["x-subscription"] == "started"
    # The group exists from that moment: an event published now reaches it.
    await harness.publish([make_event("after-start", 0)])
    response = await asyncio.wait_for(call.read(), 5.0)
    assert response.deliveries[0].event.message_received.message.text.startswith("after-start")
    call.cancel()


async def test_deliveries_flow_in_batches_and_acks_are_honoured(
    harness: Harness, stub: messaging_pb2_grpc.MessagingStub
) -> None:
    mine = [make_event(f"conv{i}", 0) for i in range(6)]
    # Another tenant's event: the token is limited to t1, so it is never delivered.
    await harness.publish([make_event("other", 0, tenant="t2"), *mine])
    call = stub.Subscribe()
    await call.write(start(max_batch=4))
    got: list[messaging_pb2.Delivery] = []
    while len(got) < 6:
        response = await asyncio.wait_for(call.read(), 5.0)
        assert 1 <= len(response.deliveries) <= 4
        got.extend(response.deliveries)
        await call.write(ack(*(d.delivery_id for d in response.deliveries)))
    assert sorted(d.event.event_id for d in got) == sorted(e.event_id for e in mine)
    assert all(d.attempt == 1 for d in got)
    assert got[0].event.WhichOneof("payload") == "message_received"
    assert got[0].event.message_received.message.text.startswith("conv")
    await asyncio.sleep(0.1)  # the acks reach the bus
    assert await harness.bus.group_lag(bus_group("g", tenant_ids={"t1"})) == 0
    call.cancel()


async def test_a_nack_with_delay_redelivers(
    harness: Harness, stub: messaging_pb2_grpc.MessagingStub
) -> None:
    await harness.publish([make_event("conv1", 0)])
    call = stub.Subscribe()
    await call.write(start())
    first = (await asyncio.wait_for(call.read(), 5.0)).deliveries[0]
    nack = messaging_pb2.Nack(
        delivery_id=first.delivery_id, delay=duration_pb2.Duration(nanos=100_000_000)
    )
    await call.write(messaging_pb2.SubscribeRequest(nack=nack))
    again = (await asyncio.wait_for(call.read(), 5.0)).deliveries[0]
    assert (again.event.event_id, again.attempt) == (first.event.event_id, 2)
    call.cancel()


async def test_a_disconnected_subscribers_deliveries_are_redelivered(
    harness: Harness, stub: messaging_pb2_grpc.MessagingStub
) -> None:
    events = [make_event(f"conv{i}", 0) for i in range(3)]
    await harness.publish(events)
    first = stub.Subscribe()
    await first.write(start(max_batch=10))
    taken: list[messaging_pb2.Delivery] = []
    while len(taken) < 3:
        taken.extend((await asyncio.wait_for(first.read(), 5.0)).deliveries)
    first.cancel()  # the client goes away without acking
    second = stub.Subscribe()
    await second.write(start(max_batch=10))
    again: list[messaging_pb2.Delivery] = []
    while len(again) < 3:
        again.extend((await asyncio.wait_for(second.read(), 5.0)).deliveries)
    assert sorted(d.event.event_id for d in again) == sorted(e.event_id for e in events)
    assert all(d.attempt == 2 for d in again)
    second.cancel()


def test_every_event_kind_converts_to_its_oneof_case() -> None:
    for kind in EventKind:
        event = make_event("conv1", kind=kind)
        payload = {"kind": "x", "json": "{}"} if kind is EventKind.RAW else {}
        proto = event_to_proto(
            type(event)(**{**{f: getattr(event, f) for f in event.__slots__}, "payload": payload})  # type: ignore[attr-defined]
        )
        assert proto.WhichOneof("payload") == kind.value
        assert proto.occurred_at.ToDatetime().year == event.occurred_at.year
    assert events_pb2.EventKind.Name(1) == "EVENT_KIND_MESSAGE_RECEIVED"
