"""What only the in-process bus has: acks written to the store behind the consumers' backs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from psycopg import errors as pg_errors

from gateway.bus import MemoryBus
from gateway.domain.bus import Subscription
from gateway.services.relay import OutboxRelay
from gateway.store import SqliteStore
from tests.bus.conftest import make_event
from tests.bus.test_contract import drain


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """A store with two events of two conversations in its outbox, not yet published."""
    store = SqliteStore(str(tmp_path / "bus.db"))
    await store.open()
    try:
        await store.migrate()
        async with store.transaction() as tx:
            await tx.add_events([make_event("conv1", 0), make_event("conv2", 0)])
        yield store
    finally:
        await store.aclose()


class _FirstAckWriteHangs:
    """The store, except that the first write of acks hangs until it is cancelled (a disk
    that stalls just as the process shuts down)."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.hanging = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def bus_ack(self, group: str, seqs: Sequence[int]) -> None:
        if not self.hanging.is_set():
            self.hanging.set()
            await asyncio.Event().wait()
        await self._store.bus_ack(group, seqs)


async def test_acks_being_written_when_the_bus_closes_are_written_before_it_closes(
    store: SqliteStore,
) -> None:
    slow = _FirstAckWriteHangs(store)
    bus = MemoryBus(slow, ack_flush_interval_s=0.01)  # type: ignore[arg-type]
    await bus.start()
    try:
        assert await OutboxRelay(store, bus).run_once() == 2
        async with bus.subscribe(Subscription("g", "c")) as c:
            got = await drain(c, 2)
            async with asyncio.timeout(5):
                await slow.hanging.wait()
    finally:
        # A graceful stop: the write in progress is cut short, its acks must still go.
        await bus.aclose()
    assert len(got) == 2
    acks = (await store.bus_load(since=datetime.now(UTC) - timedelta(minutes=5))).acked
    assert len(acks["g"]) == 2


class _FirstAckWriteRefused:
    """The store, except that its first write of acks fails with an error that says
    nothing of availability: PostgreSQL's answer once a failover turned it read-only."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.refused = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def bus_ack(self, group: str, seqs: Sequence[int]) -> None:
        if not self.refused.is_set():
            self.refused.set()
            raise pg_errors.ReadOnlySqlTransaction(
                "cannot execute INSERT in a read-only transaction"
            )
        await self._store.bus_ack(group, seqs)


async def test_acks_are_still_written_after_a_write_failed_unexpectedly(
    store: SqliteStore,
) -> None:
    refusing = _FirstAckWriteRefused(store)
    bus = MemoryBus(refusing, ack_flush_interval_s=0.01)  # type: ignore[arg-type]
    async with bus:
        assert await OutboxRelay(store, bus).run_once() == 2
        async with bus.subscribe(Subscription("g", "c")) as c:
            got = await drain(c, 2, ack=False)
            await c.ack([got[0].delivery_id])
            async with asyncio.timeout(5):
                await refusing.refused.wait()
            await c.ack([got[1].delivery_id])
            # Both written while the bus runs: a crash now would deliver neither again.
            since = datetime.now(UTC) - timedelta(minutes=5)
            acked: set[int] = set()
            async with asyncio.timeout(5):
                while len(acked) < 2:
                    await asyncio.sleep(0.01)
                    acks = (await store.bus_load(since=since)).acked
                    acked = acks["g"]


async def test_the_attempt_of_a_delivery_left_unacked_is_written_while_the_bus_runs(
    store: SqliteStore,
) -> None:
    since = datetime.now(UTC) - timedelta(minutes=5)
    bus = MemoryBus(store, ack_flush_interval_s=0.2)
    async with bus:
        assert await OutboxRelay(store, bus).run_once() == 2
        seq_of = {e.event.event_id: e.seq for e in (await store.bus_load(since=since)).entries}
        async with bus.subscribe(Subscription("g", "c")) as c:
            done, left = await drain(c, 2, ack=False)
            # Acked before the next write: no count of it is ever written.
            await c.ack([done.delivery_id])
            state = await store.bus_load(since=since)
            async with asyncio.timeout(5):
                while not state.attempts:
                    await asyncio.sleep(0.01)
                    state = await store.bus_load(since=since)
            assert state.attempts == {"g": {seq_of[left.event.event_id]: 1}}
            assert state.acked == {"g": {seq_of[done.event.event_id]}}
            # The process dies here: the bus that starts next knows the delivery was made.
            async with MemoryBus(store) as after, after.subscribe(Subscription("g", "c")) as c2:
                again = await drain(c2, 1)
                assert await c2.receive(10, 0.2) == []
    assert [(d.event.event_id, d.attempt) for d in again] == [(left.event.event_id, 2)]
