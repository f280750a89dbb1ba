"""Messaging.Subscribe through a whole gateway (auth and error interceptors included), on
the embedded default and on postgres+redis: consumer groups under filters, and errors
carrying google.rpc.ErrorInfo like every other RPC."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio
from google.protobuf import duration_pb2, json_format
from prometheus_client import REGISTRY
from switchboard.v1 import messaging_pb2, messaging_pb2_grpc

from gateway.api import subscribe as subscribe_module
from gateway.api.subscribe import (
    _observe_latency,
    _response,
    bus_group,
    max_batch_from_start,
    subscription_from_start,
)
from gateway.domain.bus import Delivery
from gateway.domain.codec import decode_event, encode_event
from gateway.domain.events import Event, EventKind
from gateway.domain.models import ApiToken, Scope
from gateway.security.tokens import create_token
from tests.api.test_proto_dict import all_events, reference_event_to_proto
from tests.bus.conftest import make_event
from tests.gateway_harness import RunningGateway, gateway_environ, run_gateway
from tests.helpers import bearer, error_info


@pytest.fixture
async def running(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[RunningGateway]:
    extra: dict[str, str] = {}
    if database.startswith("postgresql"):
        prefix = str(request.getfixturevalue("redis_prefix"))
        extra["SWITCHBOARD_REDIS_URL"] = str(request.getfixturevalue("redis_url"))
        extra["SWITCHBOARD_REDIS_KEY_PREFIX"] = f"{prefix}{secrets.token_hex(3)}:"
    async with run_gateway(gateway_environ(database, str(tmp_path), **extra)) as gateway:
        yield gateway


@pytest.fixture
async def stub(running: RunningGateway) -> AsyncIterator[messaging_pb2_grpc.MessagingStub]:
    async with grpc.aio.insecure_channel(running.grpc_target) as channel:
        yield messaging_pb2_grpc.MessagingStub(channel)


async def publish(running: RunningGateway, events: Sequence[Event]) -> None:
    """Commits the events to the outbox, as ingestion does, and wakes the gateway's relay."""
    async with running.gateway.store.transaction() as tx:
        await tx.add_events(events)
    assert running.gateway.relay is not None
    running.gateway.relay.notify()


def start(group: str, consumer: str, **kwargs: Any) -> messaging_pb2.SubscribeRequest:
    return messaging_pb2.SubscribeRequest(
        start=messaging_pb2.SubscribeStart(
            group=group, consumer=consumer, max_in_flight=100, max_batch=50, **kwargs
        )
    )


def ack(*delivery_ids: str) -> messaging_pb2.SubscribeRequest:
    return messaging_pb2.SubscribeRequest(ack=messaging_pb2.Ack(delivery_ids=delivery_ids))


class Inbox:
    """Deliveries received by one or more streams, and a way to wait for them."""

    def __init__(self) -> None:
        self.got: list[messaging_pb2.Delivery] = []
        self._arrived = asyncio.Event()

    def add(self, deliveries: Sequence[messaging_pb2.Delivery]) -> None:
        self.got.extend(deliveries)
        self._arrived.set()

    async def wait(self, count: int, timeout_s: float = 20.0) -> list[messaging_pb2.Delivery]:
        """What was received once ``count`` deliveries are in, or after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while len(self.got) < count and loop.time() < give_up:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), give_up - loop.time())
            self._arrived.clear()
        return self.got


class Client:
    """One Subscribe stream that acks whatever it receives and puts it in an inbox.

    A background task reads: cancelling a pending ``read`` (a timeout) cancels the call.
    """

    def __init__(
        self, stub: messaging_pb2_grpc.MessagingStub, token: str, inbox: Inbox | None = None
    ) -> None:
        self._stub = stub
        self._token = token
        self._requests: asyncio.Queue[messaging_pb2.SubscribeRequest | None] = asyncio.Queue()
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.inbox = inbox or Inbox()

    @property
    def reader(self) -> asyncio.Task[None] | None:
        """The task reading the stream: it ends with what ended the call."""
        return self._reader

    async def _stream(self) -> AsyncIterator[messaging_pb2.SubscribeRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def _read(self) -> None:
        while (response := await self._call.read()) is not grpc.aio.EOF:
            self.inbox.add(response.deliveries)
            self._requests.put_nowait(ack(*(d.delivery_id for d in response.deliveries)))

    async def open(self, group: str, consumer: str, **kwargs: Any) -> Client:
        self._requests.put_nowait(start(group, consumer, **kwargs))
        subscribe: Any = self._stub.Subscribe  # typed for sync iterators only
        self._call = subscribe(self._stream(), metadata=bearer(self._token))
        await asyncio.wait_for(self._call.initial_metadata(), 10.0)
        self._reader = asyncio.create_task(self._read())
        return self

    async def close(self) -> None:
        """Ends the stream; raises what ended it earlier, if anything did."""
        self._requests.put_nowait(None)
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


async def test_a_tenant_token_in_the_same_group_takes_nothing_from_an_unfiltered_consumer(
    running: RunningGateway, stub: messaging_pb2_grpc.MessagingStub
) -> None:
    """A token limited to t1 subscribes under the group name of the AI backend (whose
    token sees every tenant) while the backend restarts: it gets its own tenant's events,
    and the backend still gets every event of every tenant."""
    store = running.gateway.store
    tenant_token, _ = await create_token(store, name="t1", tenants=["t1"], scopes=["subscribe"])
    backend = await Client(stub, running.token).open("ai", "backend-1")
    await backend.close()  # the group exists and now waits for its consumer to come back

    intruder = await Client(stub, tenant_token).open("ai", "intruder")
    others = [make_event(f"t2-conv{i}", tenant="t2") for i in range(5)]
    mine = [make_event(f"t1-conv{i}") for i in range(5)]
    await publish(running, [*others, *mine])
    taken = await intruder.inbox.wait(len(mine))
    assert sorted(d.event.event_id for d in taken) == sorted(e.event_id for e in mine)
    await asyncio.sleep(1.0)  # what the intruder read is acked, and would be lost by now
    await intruder.close()

    back = await Client(stub, running.token).open("ai", "backend-2")
    got = await back.inbox.wait(len(others) + len(mine))
    await back.close()
    # A set: on Redis the first backend session may still have read some before it left,
    # and those come back as redeliveries, which at-least-once allows.
    assert {d.event.event_id for d in got} == {e.event_id for e in [*others, *mine]}


async def test_consumers_with_the_same_filters_share_one_group(
    running: RunningGateway, stub: messaging_pb2_grpc.MessagingStub
) -> None:
    store = running.gateway.store
    tenant_token, _ = await create_token(store, name="t1", tenants=["t1"], scopes=["subscribe"])
    # The same effective filters, one imposed by the token, one asked for explicitly.
    inbox = Inbox()
    first = await Client(stub, tenant_token, inbox).open("ai", "c1")
    second = await Client(stub, running.token, inbox).open("ai", "c2", tenant_ids=["t1"])
    events = [make_event(f"conv{i}") for i in range(20)]
    await publish(running, [*events, make_event("elsewhere", tenant="t2")])
    await inbox.wait(len(events))
    # Anything more would be a second first delivery: a group of its own per consumer.
    await inbox.wait(len(events) + 1, timeout_s=1.0)
    await first.close()
    await second.close()

    got = inbox.got
    assert sorted(d.event.event_id for d in got) == sorted(e.event_id for e in events)
    assert all(d.attempt == 1 for d in got)


TOKEN_T1 = ApiToken(id="tok_1", name="t1", tenants=("t1",), scopes=frozenset({Scope.SUBSCRIBE}))
TOKEN_ALL = ApiToken(id="tok_2", name="all", tenants=("*",), scopes=frozenset({Scope.SUBSCRIBE}))


def test_an_unfiltered_subscription_keeps_the_plain_group_name() -> None:
    assert subscription_from_start(start("ai", "c").start, TOKEN_ALL).group == "ai"
    assert bus_group("ai") == "ai"


def test_the_bus_group_follows_the_effective_filters() -> None:
    scoped = subscription_from_start(start("ai", "c").start, TOKEN_T1).group
    explicit = subscription_from_start(start("ai", "c", tenant_ids=["t1"]).start, TOKEN_ALL)
    assert scoped == explicit.group == bus_group("ai", tenant_ids={"t1"})
    assert scoped.startswith("ai~")
    assert bus_group("ai", channels=["b", "a"]) == bus_group("ai", channels=["a", "b"])
    distinct = {
        bus_group("ai", tenant_ids={"t1"}),
        bus_group("ai", tenant_ids={"t2"}),
        bus_group("ai", tenant_ids={"t1", "t2"}),
        bus_group("ai", channels={"t1"}),
        bus_group("ai", kinds={EventKind.MESSAGE_RECEIVED}),
        bus_group("bot", tenant_ids={"t1"}),
    }
    assert len(distinct) == 6


# ---- the start's bounds: the ranges messaging.proto documents ----


def bounds(**fields: Any) -> tuple[int, float, int]:
    start = messaging_pb2.SubscribeStart(group="ai", consumer="c", **fields)
    sub = subscription_from_start(start, TOKEN_ALL)
    return sub.max_in_flight, sub.ack_deadline_s, max_batch_from_start(start)


def test_unset_or_zero_bounds_take_the_documented_defaults() -> None:
    assert bounds() == (64, 30.0, 1)
    assert bounds(max_in_flight=0, ack_deadline=duration_pb2.Duration(), max_batch=0) == (
        64,
        30.0,
        1,
    )


def test_bounds_at_the_documented_limits_are_kept_as_asked() -> None:
    low = bounds(max_in_flight=1, ack_deadline=duration_pb2.Duration(seconds=1), max_batch=1)
    assert low == (1, 1.0, 1)
    high = bounds(
        max_in_flight=1000, ack_deadline=duration_pb2.Duration(seconds=600), max_batch=500
    )
    assert high == (1000, 600.0, 500)
    # The repo's own heaviest consumer (bench/inbound.py) asks for these.
    assert bounds(max_in_flight=1000, max_batch=100) == (1000, 30.0, 100)


IN_FLIGHT = "start.max_in_flight: must be between 1 and 1000 (0 or unset means the default, 64)"
DEADLINE = "start.ack_deadline: must be between 1 s and 600 s (0 or unset means the default, 30 s)"
BATCH = "start.max_batch: must be between 1 and 500 (0 or unset means the default, 1)"
OUT_OF_RANGE: list[tuple[dict[str, Any], str, str]] = [
    ({"max_in_flight": 1001}, "start.max_in_flight", IN_FLIGHT),
    ({"max_in_flight": -1}, "start.max_in_flight", IN_FLIGHT),
    ({"ack_deadline": duration_pb2.Duration(seconds=3600)}, "start.ack_deadline", DEADLINE),
    ({"ack_deadline": duration_pb2.Duration(nanos=500_000_000)}, "start.ack_deadline", DEADLINE),
    ({"ack_deadline": duration_pb2.Duration(seconds=-5)}, "start.ack_deadline", DEADLINE),
    ({"max_batch": 501}, "start.max_batch", BATCH),
    ({"max_batch": -3}, "start.max_batch", BATCH),
]


async def test_bounds_out_of_range_are_refused_naming_the_field_and_range(
    running: RunningGateway, stub: messaging_pb2_grpc.MessagingStub
) -> None:
    """Never clamped: a client must not run with limits other than the ones it asked for."""
    for fields, field, message in OUT_OF_RANGE:
        request = messaging_pb2.SubscribeRequest(
            start=messaging_pb2.SubscribeStart(group="ai", consumer="c1", **fields)
        )
        error = await refused(stub, running.token, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert error_info(error).metadata["field"] == field
        assert error.details() == message


# ---- a response's deliveries and the delivery latency ----


def as_deliveries(events: Sequence[Event]) -> list[Delivery]:
    return [
        Delivery(delivery_id=f"{i % 3}/{i}-0/{1 + i % 2}", attempt=1 + i % 2, event=event)
        for i, event in enumerate(events)
    ]


def test_a_response_carries_each_event_as_parse_dict_would_build_it() -> None:
    events = [decode_event(encode_event(event)) for event in all_events()]
    received = next(e for e in events if e.kind is EventKind.MESSAGE_RECEIVED)
    # A field under both its names: a payload only the slow path takes, in the same batch.
    both_names = {**received.payload, "windowExpiresAt": "2026-11-27T10:00:00Z"}
    events.append(replace(received, payload=both_names))
    batch = as_deliveries(events)
    response = _response(batch)
    assert response.HasField("sent_at")
    assert list(response.deliveries) == [
        messaging_pb2.Delivery(
            delivery_id=d.delivery_id, attempt=d.attempt, event=reference_event_to_proto(d.event)
        )
        for d in batch
    ]


def test_a_payload_parse_dict_refuses_fails_the_batch_with_its_error() -> None:
    edited = make_event("conv2", kind=EventKind.MESSAGE_EDITED)
    refused = replace(edited, payload={"edit_count": 2**31})
    with pytest.raises(json_format.ParseError) as expected:
        reference_event_to_proto(refused)
    with pytest.raises(json_format.ParseError) as raised:
        _response(as_deliveries([make_event("conv1"), refused]))
    assert str(raised.value) == str(expected.value)


def test_delivery_latency_is_observed_once_per_first_attempt_by_channel() -> None:
    def count(channel: str) -> float:
        labels = {"channel": channel}
        return REGISTRY.get_sample_value("switchboard_event_delivery_seconds_count", labels) or 0

    before = {channel: count(channel) for channel in ("instagram", "messenger")}
    first, second, third = (
        make_event("conv1", channel="instagram"),
        make_event("conv2", channel="messenger"),
        make_event("conv3", channel="instagram"),
    )
    _observe_latency(
        [
            Delivery(delivery_id="0/1-0/1", attempt=1, event=first),
            Delivery(delivery_id="0/2-0/1", attempt=1, event=second),
            # A redelivery would measure its deadline, not the delivery.
            Delivery(delivery_id="0/3-0/2", attempt=2, event=third),
        ]
    )
    assert count("instagram") == before["instagram"] + 1
    assert count("messenger") == before["messenger"] + 1


# ---- errors ----


async def refused(
    stub: messaging_pb2_grpc.MessagingStub, token: str, *requests: messaging_pb2.SubscribeRequest
) -> grpc.aio.AioRpcError:
    call: Any = stub.Subscribe(metadata=bearer(token))  # type: ignore[call-arg]
    for request in requests:
        await call.write(request)

    async def read_to_the_end() -> None:
        while await call.read() is not grpc.aio.EOF:
            pass

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(read_to_the_end(), 10.0)
    return caught.value


async def test_a_first_message_other_than_start_is_invalid_with_error_info(
    running: RunningGateway, stub: messaging_pb2_grpc.MessagingStub
) -> None:
    error = await refused(stub, running.token, ack("x"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(error)
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "switchboard.dev")
    assert info.metadata["field"] == "start"
    assert "x-request-id" in dict(error.trailing_metadata() or ())


async def test_a_tenant_outside_the_token_is_denied_with_error_info(
    running: RunningGateway, stub: messaging_pb2_grpc.MessagingStub
) -> None:
    token, _ = await create_token(
        running.gateway.store, name="t1", tenants=["t1"], scopes=["subscribe"]
    )
    error = await refused(stub, token, start("ai", "c1", tenant_ids=["t1", "t2"]))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(error)
    assert info.reason == "TENANT_NOT_ALLOWED"
    assert info.metadata["tenant_ids"] == "t2"


async def test_bad_requests_on_a_live_stream_name_the_field(
    running: RunningGateway, stub: messaging_pb2_grpc.MessagingStub
) -> None:
    missing = await refused(stub, running.token, start("", "c1"))
    assert error_info(missing).metadata["field"] == "start.group"
    twice = await refused(stub, running.token, start("ai", "c1"), start("ai", "c1"))
    assert twice.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(twice).metadata["field"] == "start"
    bad_ack = await refused(stub, running.token, start("ai", "c1"), ack("not-an-id"))
    assert bad_ack.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(bad_ack).metadata["field"] == "delivery_id"


async def test_a_stream_ends_once_its_token_is_revoked(
    running: RunningGateway,
    stub: messaging_pb2_grpc.MessagingStub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """New calls stop within the token cache's lifetime; an open stream must too, or a
    revoked backend would go on reading every tenant's messages."""
    monkeypatch.setattr(subscribe_module, "RECHECK_S", 0.2)
    store = running.gateway.store
    token, record = await create_token(store, name="leaving", tenants=["*"], scopes=["subscribe"])
    client = await Client(stub, token).open("ai", "soon-revoked")
    await publish(running, [make_event("before")])
    assert len(await client.inbox.wait(1)) == 1
    async with store.transaction() as tx:
        assert await tx.revoke_api_token(record.id, datetime.now(UTC)) == 1
    assert running.gateway.authority is not None
    running.gateway.authority.forget()  # as the cache's 10 s would
    assert client.reader is not None
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(client.reader, 10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_stopping_server_ends_its_streams_at_once_and_releases_their_conversations(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Held open through the grace period, a stream kept its conversations from the group's
    other consumers until its leases lapsed, and took new deliveries meanwhile."""
    extra = {"SWITCHBOARD_SHUTDOWN_GRACE_SECONDS": "30"}
    redis_url = prefix = ""
    if database.startswith("postgresql"):
        redis_url = str(request.getfixturevalue("redis_url"))
        prefix = f"{request.getfixturevalue('redis_prefix')}{secrets.token_hex(3)}:"
        extra |= {"SWITCHBOARD_REDIS_URL": redis_url, "SWITCHBOARD_REDIS_KEY_PREFIX": prefix}
    loop = asyncio.get_running_loop()
    async with run_gateway(gateway_environ(database, str(tmp_path), **extra)) as running:
        channel = grpc.aio.insecure_channel(running.grpc_target)
        client = await Client(messaging_pb2_grpc.MessagingStub(channel), running.token).open(
            "ai", "on-a-stopping-server"
        )
        await publish(running, [make_event(f"conv{i}") for i in range(3)])
        await client.inbox.wait(3)
        stopping_at = loop.time()
    # Leaving run_gateway stopped the server: within the 30 s grace, but not after it.
    assert loop.time() - stopping_at < 15
    assert client.reader is not None
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(client.reader, 5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "SHUTTING_DOWN"
    await channel.close()
    if redis_url:
        # The consumer left its group and released its leases: the other consumers take
        # its conversations at their next heartbeat, not when the leases lapse.
        r = redis.asyncio.Redis.from_url(redis_url)
        try:
            leases = [key async for key in r.scan_iter(match=f"*{prefix}*:lease:*")]
            members = [key async for key in r.scan_iter(match=f"*{prefix}*:members")]
            assert leases == []
            assert all([await r.zcard(key) == 0 for key in members])
        finally:
            await r.aclose()
