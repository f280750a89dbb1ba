"""Messaging.Subscribe: one bus consumer per stream, acks and nacks from the client.

The first client message is a ``start`` (group, consumer, filters, limits); deliveries
then flow to the client while its acks and nacks are read concurrently. When the client
cancels or the connection breaks, the consumer closes and its unacked deliveries are
delivered again to the group.

A stream outlives neither its token nor its server: the token is authenticated again every
``RECHECK_S`` (a revoked one ends the stream UNAUTHENTICATED), and a server that is
stopping ends its streams at once with UNAVAILABLE, closing their consumers first, so that
the group's other consumers take their conversations over without waiting for leases to
lapse and the client reconnects to another replica.

Consumer groups and filters: the bus acks an event outside a consumer's filters for the
consumer's whole bus group, so consumers with different filters must never share one.
The bus group a stream joins is therefore the group name *and* the effective filters
(including the tenants a restricted token imposes): an unfiltered subscription joins the
plain name (so existing deployments keep their positions), a filtered one joins
``<name>~<digest of the filters>`` (:func:`bus_group`). Consumers with identical filters
still share the load; a token limited to some tenants can never join, and ack away the
events of, a group that sees other tenants. The derived name is what the bus, its metrics
and its storage show.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, Collection
from datetime import UTC, datetime
from typing import Any

import grpc
from switchboard.v1 import messaging_pb2

from gateway.api.convert_events import (
    CONSTRUCTOR_ERRORS,
    event_fields,
    event_to_proto,
    kinds_from_proto,
)
from gateway.api.errors import to_status
from gateway.api.interceptors import recheck_caller
from gateway.domain.bus import Bus, Consumer, Delivery, Subscription
from gateway.domain.errors import (
    InvalidArgument,
    PermissionDenied,
    ShuttingDown,
    SwitchboardError,
    Unavailable,
)
from gateway.domain.events import EventKind
from gateway.domain.models import ApiToken
from gateway.observability.inbound_metrics import EVENT_DELIVERY_SECONDS

# SubscribeStart's comments in messaging.proto state these to client authors: change both.
DEFAULT_MAX_IN_FLIGHT, MAX_IN_FLIGHT = 64, 1000
DEFAULT_ACK_DEADLINE_S, MIN_ACK_DEADLINE_S, MAX_ACK_DEADLINE_S = 30.0, 1.0, 600.0
DEFAULT_MAX_BATCH, MAX_BATCH = 1, 500
# How long one receive waits before checking whether the client went away.
_POLL_S = 0.5
# How often a stream's token is authenticated again (the token cache holds 10 s more).
RECHECK_S = 5.0
# 64 bits: a tenant's token must not find, by brute force, filters of its own whose digest
# names another tenant's filtered group (48 bits would take a GPU hours, this takes years).
_FILTER_DIGEST_HEX = 16


def _observe_latency(deliveries: list[Delivery]) -> None:
    """Receipt-to-delivery time of first attempts (redeliveries would measure deadlines)."""
    now = datetime.now(UTC)
    # One label lookup per channel and batch, not per event: it costs more than observe.
    observers: dict[str, Callable[[float], None]] = {}
    for d in deliveries:
        if d.attempt == 1:
            event = d.event
            observe = observers.get(event.channel)
            if observe is None:
                observe = observers[event.channel] = EVENT_DELIVERY_SECONDS.labels(
                    event.channel
                ).observe
            observe(max(0.0, (now - event.received_at).total_seconds()))


def _response(deliveries: list[Delivery]) -> messaging_pb2.SubscribeResponse:
    """One message for the batch, built by one constructor call from nested dicts: the
    cheapest way to build protobuf messages from Python (no message is built twice, as
    an Event built on its own and then copied into its Delivery would be)."""
    now_ns = time.time_ns()
    sent_at = {"seconds": now_ns // 1_000_000_000, "nanos": now_ns % 1_000_000_000}
    items: list[dict[str, Any]] = []
    for d in deliveries:
        fields = event_fields(d.event)
        items.append(
            {
                "delivery_id": d.delivery_id,
                "attempt": d.attempt,
                "event": event_to_proto(d.event) if fields is None else fields,
            }
        )
    try:
        return messaging_pb2.SubscribeResponse(deliveries=items, sent_at=sent_at)
    except CONSTRUCTOR_ERRORS:
        # An event the constructor refuses (an int out of range...): one by one, so that
        # each takes event_to_proto's slow path, which raises ParseDict's error if any.
        return messaging_pb2.SubscribeResponse(
            deliveries=[
                messaging_pb2.Delivery(
                    delivery_id=d.delivery_id, attempt=d.attempt, event=event_to_proto(d.event)
                )
                for d in deliveries
            ],
            sent_at=sent_at,
        )


def _count(field: str, value: int, default: int, high: int) -> int:
    """A count bound of the start: 0 (unset in proto3) means the default. A value out of
    range is refused rather than clamped, so that a client never runs with limits other
    than the ones it believes it asked for."""
    if value == 0:
        return default
    if not 1 <= value <= high:
        raise InvalidArgument(
            field, f"must be between 1 and {high} (0 or unset means the default, {default})"
        )
    return value


def _ack_deadline_s(start: messaging_pb2.SubscribeStart) -> float:
    """``start.ack_deadline`` in seconds; unset or zero means the default."""
    if not start.HasField("ack_deadline"):
        return DEFAULT_ACK_DEADLINE_S
    seconds = start.ack_deadline.ToTimedelta().total_seconds()
    if seconds == 0:
        return DEFAULT_ACK_DEADLINE_S
    if not MIN_ACK_DEADLINE_S <= seconds <= MAX_ACK_DEADLINE_S:
        raise InvalidArgument(
            "start.ack_deadline",
            f"must be between {MIN_ACK_DEADLINE_S:g} s and {MAX_ACK_DEADLINE_S:g} s"
            f" (0 or unset means the default, {DEFAULT_ACK_DEADLINE_S:g} s)",
        )
    return seconds


def max_batch_from_start(start: messaging_pb2.SubscribeStart) -> int:
    return _count("start.max_batch", start.max_batch, DEFAULT_MAX_BATCH, MAX_BATCH)


def bus_group(
    name: str,
    *,
    tenant_ids: Collection[str] = (),
    channels: Collection[str] = (),
    kinds: Collection[EventKind] = (),
) -> str:
    """The bus-level group of a subscription named ``name`` with these effective filters."""
    if not (tenant_ids or channels or kinds):
        return name
    canonical = json.dumps(
        {
            "channels": sorted(set(channels)),
            "kinds": sorted({kind.value for kind in kinds}),
            "tenant_ids": sorted(set(tenant_ids)),
        },
        separators=(",", ":"),
        sort_keys=True,
    )
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:_FILTER_DIGEST_HEX]
    return f"{name}~{digest}"


def subscription_from_start(start: messaging_pb2.SubscribeStart, token: ApiToken) -> Subscription:
    if not start.group:
        raise InvalidArgument("start.group", "required")
    if not start.consumer:
        raise InvalidArgument("start.consumer", "required")
    tenants = frozenset(start.tenant_ids)
    outside = sorted(t for t in tenants if not token.allows_tenant(t))
    if outside:
        raise PermissionDenied(
            f"start.tenant_ids: not allowed for this token: {', '.join(outside)}",
            reason="TENANT_NOT_ALLOWED",
            metadata={"tenant_ids": ",".join(outside)},
        )
    if not tenants and not token.all_tenants:
        tenants = frozenset(token.tenants)
    channels = frozenset(start.channels)
    kinds = kinds_from_proto(list(start.kinds))
    max_in_flight = _count(
        "start.max_in_flight", start.max_in_flight, DEFAULT_MAX_IN_FLIGHT, MAX_IN_FLIGHT
    )
    ack_deadline_s = _ack_deadline_s(start)
    return Subscription(
        group=bus_group(start.group, tenant_ids=tenants, channels=channels, kinds=kinds),
        consumer=start.consumer,
        tenant_ids=tenants,
        channels=channels,
        kinds=kinds,
        max_in_flight=max_in_flight,
        ack_deadline_s=ack_deadline_s,
    )


async def _read_requests(
    requests: AsyncIterator[messaging_pb2.SubscribeRequest], consumer: Consumer
) -> None:
    async for request in requests:
        kind = request.WhichOneof("kind")
        if kind == "ack":
            if request.ack.delivery_ids:
                await consumer.ack(list(request.ack.delivery_ids))
        elif kind == "nack":
            delay = request.nack.delay.ToTimedelta().total_seconds()
            await consumer.nack(request.nack.delivery_id, max(delay, 0.0))
        elif kind == "start":
            raise InvalidArgument("start", "sent twice on one stream")


async def run_subscribe(
    bus: Bus,
    requests: AsyncIterator[messaging_pb2.SubscribeRequest],
    context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    token: ApiToken,
    *,
    stopping: asyncio.Event | None = None,
) -> AsyncIterator[messaging_pb2.SubscribeResponse]:
    stopping = stopping or asyncio.Event()
    stream = aiter(requests)
    try:
        first = await anext(stream, None)
        if first is None or first.WhichOneof("kind") != "start":
            raise InvalidArgument("start", "the first message must be a start")
        subscription = subscription_from_start(first.start, token)
        max_batch = max_batch_from_start(first.start)
        async with bus.subscribe(subscription) as consumer:
            # Headers now tell the client its subscription is live (await initial_metadata()),
            # before any event: a client can order its own work after that point.
            await context.send_initial_metadata((("x-subscription", "started"),))
            reader = asyncio.create_task(_read_requests(stream, consumer))
            recheck_at = time.monotonic() + RECHECK_S
            try:
                while not reader.done() and not stopping.is_set():
                    if time.monotonic() >= recheck_at:
                        await _recheck()
                        recheck_at = time.monotonic() + RECHECK_S
                    deliveries = await consumer.receive(max_batch, _POLL_S)
                    if not deliveries:
                        continue
                    response = _response(deliveries)
                    _observe_latency(deliveries)
                    yield response
                if stopping.is_set():
                    # Left after the consumer closed (below), so its leases are released.
                    raise ShuttingDown("the server is shutting down: subscribe again")
                # The client half-closed (no more acks can come) or sent something wrong.
                reader.result()
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
    except SwitchboardError as exc:
        # The same rich status (ErrorInfo, request id) as every unary RPC gets from the
        # error interceptor, which this stream's own handling would otherwise bypass.
        await context.abort_with_status(to_status(exc))


async def _recheck() -> None:
    """Unauthenticated ends the stream; a store that cannot say now does not: the stream
    goes on and the next check asks again."""
    with contextlib.suppress(Unavailable):
        await recheck_caller()
