"""``Connection.last_event_at`` over the real stack: a signed webhook moves it for the
connection it names, seen through ChannelConnect over gRPC, and for no other one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import grpc.aio
import psycopg
import pytest
from switchboard.v1 import common_pb2, connect_pb2, connect_pb2_grpc

from tests.helpers import bearer
from tests.inbound.conftest import Stack


class Connections:
    def __init__(self, stack: Stack, stub: connect_pb2_grpc.ChannelConnectStub) -> None:
        self._meta = bearer(stack.gateway.token)
        self._stub = stub

    async def get(self, connection_id: str) -> common_pb2.Connection:
        return await self._stub.GetConnection(
            connect_pb2.GetConnectionRequest(connection_id=connection_id), metadata=self._meta
        )

    async def listed(self, tenant: str) -> dict[str, common_pb2.Connection]:
        reply = await self._stub.ListConnections(
            connect_pb2.ListConnectionsRequest(tenant_id=tenant), metadata=self._meta
        )
        return {c.id: c for c in reply.connections}

    async def last_event_at(self, connection_id: str) -> datetime | None:
        conn = await self.get(connection_id)
        return conn.last_event_at.ToDatetime(UTC) if conn.HasField("last_event_at") else None

    async def eventually(self, connection_id: str) -> datetime:
        deadline = time.monotonic() + 10
        while (at := await self.last_event_at(connection_id)) is None:
            assert time.monotonic() < deadline, "last_event_at was never set"
            await asyncio.sleep(0.05)
        return at


@asynccontextmanager
async def connections(stack: Stack) -> AsyncIterator[Connections]:
    async with grpc.aio.insecure_channel(stack.gateway.grpc_target) as channel:
        yield Connections(stack, connect_pb2_grpc.ChannelConnectStub(channel))


async def test_a_webhook_sets_last_event_at_of_its_connection_and_no_other(stack: Stack) -> None:
    other_account, other = await stack.connect_account(username="other")
    inbound = stack.gateway.gateway.inbound
    assert inbound is not None
    async with connections(stack) as api:
        assert await api.last_event_at(stack.connection.id) is None
        assert await api.last_event_at(other.id) is None

        before = datetime.now(UTC)
        sent = await stack.control.send_dm(stack.ig_id, "anyone there?")
        after = datetime.now(UTC)
        assert sent["status"] == 200
        # Written in the background, without anything prompting it.
        first = await api.eventually(stack.connection.id)
        assert before <= first <= after
        listed = await api.listed("t1")
        assert listed[stack.connection.id].last_event_at.ToDatetime(UTC) == first

        sent = await stack.control.send_dm(str(other_account["ig_id"]), "hello")
        assert sent["status"] == 200
        # Within the flush interval of the first write: flush now rather than wait it out.
        assert await inbound.activity.flush()
        second = await api.eventually(other.id)
        assert second > first
        assert await api.last_event_at(stack.connection.id) == first


@pytest.mark.parametrize(
    "inbound_backend",
    [pytest.param("postgres+redis", marks=pytest.mark.postgres)],
    indirect=True,
)
async def test_ingest_does_not_wait_for_the_connection_row(stack: Stack) -> None:
    # Holds the lock an UPDATE of the connection row would need: were the ingest
    # transaction to write the row, the webhook would wait here until its 503.
    async with await psycopg.AsyncConnection.connect(stack.database) as locker:
        await locker.execute(
            "SELECT id FROM connections WHERE id = %s FOR NO KEY UPDATE",
            (stack.connection.id,),
        )
        async with connections(stack) as api:
            started = time.monotonic()
            sent = await stack.control.send_dm(stack.ig_id, "not blocked")
            assert sent["status"] == 200
            assert time.monotonic() - started < 2
            # The background write waits for the lock instead.
            await asyncio.sleep(0.2)
            assert await api.last_event_at(stack.connection.id) is None
            await locker.rollback()
            assert await api.eventually(stack.connection.id) is not None
