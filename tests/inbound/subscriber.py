"""What the AI backend sees: events taken from ``Messaging.Subscribe`` over gRPC.

Until ``gateway.api.subscribe`` exists (the bus engineer's part), events are taken from the
gateway's bus directly, converted through the same protobuf messages so the tests assert
on one shape: ``payload`` is the oneof case as a dict with the .proto field names.
"""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc.aio
from google.protobuf import json_format
from switchboard.v1 import events_pb2, messaging_pb2, messaging_pb2_grpc

from gateway.domain.bus import Consumer, Subscription
from gateway.domain.codec import event_to_dict
from gateway.domain.events import Event, EventKind
from tests.gateway_harness import RunningGateway
from tests.helpers import bearer

GRPC_SUBSCRIBE = importlib.util.find_spec("gateway.api.subscribe") is not None


@dataclass
class Got:
    event_id: str
    kind: str
    tenant_id: str
    connection_id: str
    conversation_id: str
    payload: dict[str, Any]
    attempt: int = 1


def _from_proto(event: events_pb2.Event, attempt: int) -> Got:
    kind = event.WhichOneof("payload") or ""
    data = json_format.MessageToDict(event, preserving_proto_field_name=True)
    return Got(
        event_id=event.event_id,
        kind=kind,
        tenant_id=event.tenant_id,
        connection_id=event.connection_id,
        conversation_id=event.conversation_id,
        payload=data.get(kind, {}),
        attempt=attempt,
    )


def _to_proto(event: Event) -> events_pb2.Event:
    data = event_to_dict(event)
    proto = events_pb2.Event()
    json_format.ParseDict(
        {
            "event_id": data["event_id"],
            "tenant_id": data["tenant_id"],
            "connection_id": data["connection_id"],
            "channel": data["channel"],
            "conversation_id": data["conversation_id"],
            "occurred_at": data["occurred_at"],
            "received_at": data["received_at"],
            event.kind.value: data["payload"],
        },
        proto,
    )
    return proto


class Subscriber:
    def __init__(self, running: RunningGateway, group: str) -> None:
        self._running = running
        self._group = group
        self._stack = AsyncExitStack()
        self._consumer: Consumer | None = None
        self._responses: Any = None
        self._requests: asyncio.Queue[messaging_pb2.SubscribeRequest | None] = asyncio.Queue()
        self._buffer: list[Got] = []

    async def __aenter__(self) -> Subscriber:
        name = f"c-{secrets.token_hex(3)}"
        if GRPC_SUBSCRIBE:
            channel = await self._stack.enter_async_context(
                grpc.aio.insecure_channel(self._running.grpc_target)
            )
            stub = messaging_pb2_grpc.MessagingStub(channel)
            self._requests.put_nowait(
                messaging_pb2.SubscribeRequest(
                    start=messaging_pb2.SubscribeStart(
                        group=self._group, consumer=name, max_in_flight=1000, max_batch=50
                    )
                )
            )
            self._responses = stub.Subscribe(
                self._request_stream(), metadata=bearer(self._running.token)
            )
            # Live only once the server says so: a test that then stops the store must not
            # race the stream's own start (authentication reads the store).
            await self._responses.initial_metadata()
        else:
            bus = self._running.gateway.bus
            assert bus is not None
            self._consumer = await self._stack.enter_async_context(
                bus.subscribe(Subscription(group=self._group, consumer=name, max_in_flight=1000))
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._requests.put_nowait(None)
        if self._responses is not None:
            self._responses.cancel()
        await self._stack.aclose()

    async def _request_stream(self) -> Any:
        while (request := await self._requests.get()) is not None:
            yield request

    async def _receive(self, timeout_s: float) -> list[Got]:
        if self._consumer is not None:
            deliveries = await self._consumer.receive(100, timeout_s)
            await self._consumer.ack([d.delivery_id for d in deliveries])
            return [_from_proto(_to_proto(d.event), d.attempt) for d in deliveries]
        try:
            response = await asyncio.wait_for(self._responses.read(), timeout_s)
        except TimeoutError:
            return []
        if response is grpc.aio.EOF:
            raise AssertionError("the Subscribe stream ended")
        got = [_from_proto(d.event, d.attempt) for d in response.deliveries]
        self._requests.put_nowait(
            messaging_pb2.SubscribeRequest(
                ack=messaging_pb2.Ack(delivery_ids=[d.delivery_id for d in response.deliveries])
            )
        )
        return got

    async def take(self, count: int, *, timeout_s: float = 15.0) -> list[Got]:
        """Exactly the next ``count`` events (acked), failing after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while len(self._buffer) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"expected {count} events, got {len(self._buffer)}: "
                    f"{[g.kind for g in self._buffer]}"
                )
            self._buffer.extend(await self._receive(min(remaining, 1.0)))
        taken, self._buffer = self._buffer[:count], self._buffer[count:]
        return taken

    async def nothing_more(self, within_s: float = 1.0) -> None:
        extra = list(self._buffer)
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            extra.extend(await self._receive(max(0.05, deadline - time.monotonic())))
        assert not extra, f"unexpected events: {[(g.kind, g.payload) for g in extra]}"


def kinds(events: list[Got]) -> list[str]:
    return [e.kind for e in events]


__all__ = ["GRPC_SUBSCRIBE", "EventKind", "Got", "Subscriber", "kinds"]
