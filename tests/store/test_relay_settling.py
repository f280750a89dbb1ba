"""The outbox relay settles what it published before it claims again, and keeps the
claims of what it holds (published or not) while the bus is down: nothing published twice
by one healthy process after an outage of the bus or the store."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from gateway.domain.errors import BusUnavailable
from gateway.domain.store import OutboxEntry
from gateway.services.outbox import OutboxWriter
from gateway.services.relay import OutboxRelay
from gateway.store import SqliteStore
from tests.bus.conftest import make_event
from tests.store.test_relay_outages import _FlakySettle, _until


class _RecordingBus:
    """A bus that only counts what it is handed; publishes fail while ``down``."""

    keeps_events = True

    def __init__(self) -> None:
        self.down = False
        self.failures = 0
        self.published: Counter[str] = Counter()

    async def publish_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        if self.down:
            self.failures += 1
            raise BusUnavailable("redis: ConnectionError")
        for e in entries:
            self.published[e.event.event_id] += 1


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(str(tmp_path / "relay.db")) as opened:
        await opened.migrate()
        yield opened


async def test_relay_does_not_republish_a_handed_over_entry_left_unsettled_by_a_bus_outage(
    sqlite_store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A is handed over and published; before the round that would settle it, Redis goes
    down (B's publish fails) for longer than the lease, and a producer notifies meanwhile.
    The claims of both the held B and the published, unsettled A are extended on every
    failed round, and A is settled before any claim: once Redis is back, each is published
    once."""
    # The production ratio of the failure back-off to the lease (5 s to 30 s).
    monkeypatch.setattr("gateway.services.rounds.MAX_PAUSE_S", 0.5)
    bus = _RecordingBus()
    relay = OutboxRelay(sqlite_store, bus, lease_s=3.0, sweep_interval_s=0.1)  # type: ignore[arg-type]
    writer = OutboxWriter(relay)
    a, b, c = make_event("conv1", 0), make_event("conv2", 0), make_event("conv3", 0)
    async with relay:
        await asyncio.sleep(0.15)  # a first sweep found nothing
        async with sqlite_store.transaction() as tx:
            handed = await writer.add(tx, [a])
        writer.committed(handed)
        await _until(lambda: bus.published[a.event_id] == 1)
        bus.down = True
        async with sqlite_store.transaction() as tx:
            handed = await writer.add(tx, [b])
        writer.committed(handed)
        await _until(lambda: bus.failures >= 1)
        await asyncio.sleep(3.3)  # the outage outlasts A's lease
        async with sqlite_store.transaction() as tx:
            await tx.add_events([c])
        relay.notify()  # a producer committed during the outage
        await _until(lambda: bus.failures >= 2 and len(relay._work) >= 2)
        bus.down = False
        await _until(lambda: bus.published[c.event_id] >= 1, timeout=10)
        await asyncio.sleep(0.3)
    twice = {k: v for k, v in bus.published.items() if v > 1}
    assert not twice, f"published more than once: {twice} (a={a.event_id}, b={b.event_id})"


async def test_relay_settles_before_a_notified_claim_after_a_long_store_blink(
    sqlite_store: SqliteStore,
) -> None:
    """Settling fails for longer than the lease; the first round once the store is back is
    a notify: its claim comes after the relay settled what it published, so the published
    entry is not claimed and published again."""
    flaky = _FlakySettle(sqlite_store)
    bus = _RecordingBus()
    relay = OutboxRelay(flaky, bus, lease_s=0.5, sweep_interval_s=60.0)  # type: ignore[arg-type]
    a, c = make_event("conv1", 0), make_event("conv3", 0)
    async with relay:
        await asyncio.sleep(0.05)
        async with sqlite_store.transaction() as tx:
            await tx.add_events([a])
        flaky.down = True
        relay.notify()
        await _until(lambda: flaky.failures >= 1)
        await asyncio.sleep(0.8)  # the store stays down past the lease
        flaky.down = False
        async with sqlite_store.transaction() as tx:
            await tx.add_events([c])
        relay.notify()
        await _until(lambda: bus.published[c.event_id] >= 1)
        await asyncio.sleep(0.3)
    assert bus.published[a.event_id] == 1, dict(bus.published)
