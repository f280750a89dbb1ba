"""One harness per bus backend, so that one contract suite runs against each: in-process,
one Redis, and a Redis Cluster of three primaries started for the session.

Events are published the production way: written to the outbox of a real SQLite store
in a transaction, then published by the relay. Each Redis harness has its own key prefix.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.bus import MemoryBus, RedisBus
from gateway.domain.bus import Bus, Consumer, Delivery
from gateway.domain.events import Event, EventKind, new_event
from gateway.services.relay import OutboxRelay
from gateway.store import SqliteStore, open_store

# Short enough for fast tests, long enough not to expire under a loaded CI machine.
LEASE_TTL_S = 0.4

_counter = itertools.count()


def make_event(
    conversation: str,
    n: int = 0,
    *,
    tenant: str = "t1",
    channel: str = "instagram",
    kind: EventKind = EventKind.MESSAGE_RECEIVED,
) -> Event:
    now = datetime.now(UTC)
    return new_event(
        tenant_id=tenant,
        connection_id="conn_1",
        channel=channel,
        kind=kind,
        occurred_at=now,
        received_at=now,
        conversation_id=conversation,
        payload={"message": {"id": f"msg_{next(_counter)}", "text": f"{conversation}#{n}"}},
    )


async def cut_reader(consumer: Any, client: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Kills the Redis connection the consumer's reader is reading on (with ``client``) and
    waits until the consumer says it is retrying the read."""
    assert consumer._read_link is not None
    async with asyncio.timeout(5):
        while consumer._read_link._conn is None:  # noqa: ASYNC110 - the reader is reading
            await asyncio.sleep(0.01)
    reading = consumer._read_link._conn
    host, port = reading._writer.get_extra_info("sockname")[:2]
    await client.client_kill(f"{host}:{port}")  # the reader's own connection
    async with asyncio.timeout(5):
        while not any(  # noqa: ASYNC110
            r.getMessage() == "bus read failed, retrying" for r in caplog.records
        ):
            await asyncio.sleep(0.02)


def seq_of(event: Event) -> int:
    return int(event.payload["message"]["text"].rsplit("#", 1)[1])


class OrderCheck:
    """Consumes ``total`` events from several consumers, acking random parts of what is out
    in random order, and records any breach of order per conversation: a second delivery
    of a conversation while one is unacked, or one out of sequence."""

    def __init__(self, total: int, seed: int) -> None:
        self.total = total
        self.rng = random.Random(seed)
        self.in_flight: dict[str, Delivery] = {}
        self.next_expected: dict[str, int] = defaultdict(int)
        self.violations: list[str] = []
        self.received: dict[str, list[Delivery]] = defaultdict(list)
        self.acked = 0

    async def run(self, name: str, consumer: Consumer) -> None:
        mine: list[Delivery] = []
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 20
        while self.acked < self.total and loop.time() < give_up:
            for d in await consumer.receive(self.rng.randint(1, 16), 0.05):
                conv = d.event.conversation_id
                if conv in self.in_flight:
                    self.violations.append(f"two in flight for {conv}")
                if seq_of(d.event) != self.next_expected[conv]:
                    self.violations.append(
                        f"{conv}: got {seq_of(d.event)}, want {self.next_expected[conv]}"
                    )
                self.in_flight[conv] = d
                self.received[name].append(d)
                mine.append(d)
            self.rng.shuffle(mine)
            k = self.rng.randint(0, len(mine))
            done, mine = mine[:k], mine[k:]
            for d in done:
                del self.in_flight[d.event.conversation_id]
                self.next_expected[d.event.conversation_id] += 1
            if done:
                await consumer.ack([d.delivery_id for d in done])
                self.acked += len(done)
            await asyncio.sleep(0)


class Harness:
    def __init__(self, backend: str, db_path: Path, redis_url: str, prefix: str) -> None:
        self.backend = backend
        self._db_path = db_path
        self._redis_url = redis_url
        self._prefix = prefix
        self._retention_s = 3600.0
        self.store: SqliteStore | None = None
        self.bus: Any = None
        self.relay: OutboxRelay | None = None

    async def open(self, *, retention_s: float | None = None) -> Bus:
        if retention_s is not None:
            self._retention_s = retention_s
        store = open_store(f"sqlite:///{self._db_path}")
        assert isinstance(store, SqliteStore)
        await store.open()
        await store.migrate()
        self.store = store
        bus: MemoryBus | RedisBus
        if self.backend == "memory":
            bus = MemoryBus(store, retention_s=self._retention_s, ack_flush_interval_s=0.01)
        else:
            bus = RedisBus(
                self._redis_url,
                key_prefix=self._prefix,
                shards=8,
                retention_s=self._retention_s,
                lease_ttl_s=LEASE_TTL_S,
                block_ms=100,
            )
        await bus.start()
        self.bus = bus
        self.relay = OutboxRelay(store, bus, sweep_interval_s=0.05)
        return bus

    async def close(self) -> None:
        if self.relay is not None:
            await self.relay.aclose()
        if self.bus is not None:
            await self.bus.aclose()
        if self.store is not None:
            await self.store.aclose()
        self.relay = self.bus = self.store = None

    async def reopen(self) -> Bus:
        await self.close()
        return await self.open()

    async def publish(self, events: Sequence[Event]) -> None:
        """Commits the events to the outbox and lets the relay publish them."""
        assert self.store is not None
        assert self.relay is not None
        async with self.store.transaction() as tx:
            await tx.add_events(events)
        await self.relay.run_once()

    async def settle(self) -> None:
        """Lets Redis consumers that just joined or left rebalance their shards."""
        if self.backend != "memory":
            await asyncio.sleep(LEASE_TTL_S * 1.5)


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def harness(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, redis_prefix: str
) -> AsyncIterator[Harness]:
    prefix = f"{redis_prefix}{secrets.token_hex(4)}:"
    url = redis_url
    if request.param == "redis-cluster":
        url = str(request.getfixturevalue("redis_cluster_url"))
    h = Harness(request.param, tmp_path / "bus.db", url, prefix)
    await h.open()
    try:
        yield h
    finally:
        await h.close()
