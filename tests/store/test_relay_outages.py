"""The outbox relay through outages: an event is published once when the bus is down for
longer than the claims that hold its entries, or when the store blinks after publishing."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.bus import RedisBus
from gateway.domain.bus import Bus, Subscription
from gateway.domain.errors import BusUnavailable, StoreUnavailable
from gateway.domain.store import OutboxEntry
from gateway.services.outbox import OutboxWriter
from gateway.services.relay import OutboxRelay
from tests.bus.conftest import make_event
from tests.bus.test_contract import drain
from tests.store.conftest import AnyStore


class _FlakyBus:
    """The bus, except that its publishes fail while ``down`` (Redis is restarting); counts
    how often each event was handed to the bus."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self.down = False
        self.failures = 0
        self.published: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bus, name)

    async def publish_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        if self.down:
            self.failures += 1
            raise BusUnavailable("redis: ConnectionError")
        await self._bus.publish_outbox(entries)
        for e in entries:
            self.published[e.event.event_id] += 1


class _FlakySettle:
    """The store, except that settling (mark/delete published) fails while ``down``."""

    def __init__(self, store: AnyStore) -> None:
        self._store = store
        self.down = False
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def delete_published(self, seqs: Sequence[int]) -> None:
        if self.down:
            self.failures += 1
            raise StoreUnavailable("PostgreSQL is unavailable (AdminShutdown)")
        await self._store.delete_published(seqs)

    async def mark_published(self, seqs: Sequence[int], now: Any) -> None:
        if self.down:
            self.failures += 1
            raise StoreUnavailable("PostgreSQL is unavailable (AdminShutdown)")
        await self._store.mark_published(seqs, now)


@pytest.fixture
async def redis_bus(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisBus]:
    bus = RedisBus(
        redis_url,
        key_prefix=f"{redis_prefix}{secrets.token_hex(4)}:",
        shards=4,
        lease_ttl_s=0.4,
        block_ms=100,
    )
    await bus.start()
    try:
        yield bus
    finally:
        await bus.aclose()


async def _until(check: Any, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_events_handed_over_during_a_bus_outage_longer_than_the_lease_are_published_once(
    store: AnyStore, redis_bus: RedisBus
) -> None:
    # Redis is down for longer than the hand-over lease (30 s in production; 0.5 s here).
    # The relay keeps the failed batch at the head of its queue, its claim extended, and
    # publishes it when Redis is back: that is the one publish. Its own sweep settles what
    # it published before claiming, so the entry is not published a second time.
    bus = _FlakyBus(redis_bus)
    bus.down = True
    relay = OutboxRelay(store, bus, lease_s=1.5, sweep_interval_s=0.05)
    writer = OutboxWriter(relay)
    event = make_event("conv1", 0)
    async with relay, redis_bus.subscribe(Subscription("g", "c")) as consumer:
        async with store.transaction() as tx:
            handed = await writer.add(tx, [event])
        writer.committed(handed)
        await _until(lambda: bus.failures >= 1)
        await asyncio.sleep(0.8)  # the outage outlasts the lease of the handed-over entry
        bus.down = False
        await _until(lambda: bus.published[event.event_id] >= 1)
        await asyncio.sleep(0.5)  # a few more rounds of the relay
        got = await drain(consumer, 2, timeout=1.0)
    assert [(d.event.event_id, d.attempt) for d in got] == [(event.event_id, 1)]
    assert bus.published[event.event_id] == 1, bus.published


async def test_events_swept_and_published_are_not_published_again_after_a_failed_settle(
    store: AnyStore, redis_bus: RedisBus
) -> None:
    # A notified commit (ConnectionChanged, say) is claimed and published by the relay, then
    # PostgreSQL blinks while the relay deletes/marks the entry: the relay keeps the entry
    # and settles it on a later round, as it does a handed-over one, rather than leaving it
    # to a sweep once its lease lapsed (a second publish with no crash).
    flaky = _FlakySettle(store)
    bus = _FlakyBus(redis_bus)
    relay = OutboxRelay(flaky, bus, lease_s=0.5, sweep_interval_s=0.05)  # type: ignore[arg-type]
    event = make_event("conv1", 0)
    async with relay, redis_bus.subscribe(Subscription("g", "c")) as consumer:
        await asyncio.sleep(0.1)  # the first sweep found nothing
        async with store.transaction() as tx:
            await tx.add_events([event])
        flaky.down = True
        relay.notify()
        await _until(lambda: flaky.failures >= 1)
        flaky.down = False  # PostgreSQL is back at once
        await asyncio.sleep(1.5)  # well past the lease
        got = await drain(consumer, 2, timeout=1.0)
    assert [(d.event.event_id, d.attempt) for d in got] == [(event.event_id, 1)]
    assert bus.published[event.event_id] == 1, bus.published


async def test_claims_are_extended_only_while_still_held(store: AnyStore) -> None:
    """A claim that lapsed may be another relay's by now: only live claims are extended,
    and never an entry already published."""
    now = datetime.now(UTC)
    async with store.transaction() as tx:
        await tx.add_events([make_event("conv1", n) for n in range(3)])
    live, lapsed, published = await store.claim_outbox(
        now=now, lease_until=now + timedelta(seconds=30), limit=10
    )
    await store.extend_outbox_claims(
        [lapsed.seq], now=now + timedelta(seconds=31), lease_until=now + timedelta(hours=1)
    )
    await store.mark_published([published.seq], now)
    await store.extend_outbox_claims(
        [live.seq, published.seq], now=now, lease_until=now + timedelta(hours=1)
    )
    # Past the first lease: the lapsed one (never extended) is claimable, the live one
    # (extended) is not, the published one never is.
    again = await store.claim_outbox(
        now=now + timedelta(seconds=31), lease_until=now + timedelta(hours=2), limit=10
    )
    assert [e.seq for e in again] == [lapsed.seq]
