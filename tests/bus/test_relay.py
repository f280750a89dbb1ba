"""The outbox relay: what a transaction commits is published, even across a crash."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.domain.bus import Bus, Subscription
from gateway.domain.errors import BusUnavailable
from gateway.domain.events import EventKind
from gateway.domain.store import OutboxEntry
from gateway.services.connection_status import mark_needs_reauth
from gateway.services.outbox import OutboxWriter
from gateway.services.relay import OutboxRelay
from gateway.store import SqliteStore
from tests.bus.conftest import Harness, make_event
from tests.bus.test_contract import drain
from tests.store.factories import connection


async def test_committed_events_are_published_by_the_sweep_after_a_crash(
    harness: Harness,
) -> None:
    store = harness.store
    assert store is not None
    events = [make_event("conv1", n) for n in range(3)]
    async with store.transaction() as tx:
        await tx.add_events(events)
    # The process died after the commit: nothing was published, nobody was notified.
    bus = await harness.reopen()
    assert harness.relay is not None
    async with harness.relay, bus.subscribe(Subscription("g", "c")) as c:
        got = await drain(c, 3, timeout=3.0)
    assert [d.event.event_id for d in got] == [e.event_id for e in events]


async def test_a_claim_that_was_never_marked_published_is_published_again(
    harness: Harness,
) -> None:
    store = harness.store
    assert store is not None
    events = [make_event("conv1", n) for n in range(2)]
    async with store.transaction() as tx:
        await tx.add_events(events)
    # A relay claimed the entries and died before publishing: its lease lapses.
    now = datetime.now(UTC)
    claimed = await store.claim_outbox(now=now, lease_until=now + timedelta(seconds=0.3), limit=10)
    assert len(claimed) == 2
    relay = OutboxRelay(store, harness.bus, sweep_interval_s=0.05)
    assert await relay.run_once() == 0  # still leased
    async with relay, harness.bus.subscribe(Subscription("g", "c")) as c:
        got = await drain(c, 2, timeout=3.0)
    assert [d.event.event_id for d in got] == [e.event_id for e in events]
    assert await relay.run_once() == 0  # marked published: not again


async def test_notify_publishes_without_waiting_for_the_sweep(harness: Harness) -> None:
    store = harness.store
    assert store is not None
    relay = OutboxRelay(store, harness.bus, sweep_interval_s=60.0)
    async with relay, harness.bus.subscribe(Subscription("g", "c")) as c:
        await asyncio.sleep(0.05)  # the relay's first sweep found nothing
        event = make_event("conv1")
        async with store.transaction() as tx:
            await tx.add_events([event])
        relay.notify()
        got = await drain(c, 1, timeout=2.0)
    assert [d.event.event_id for d in got] == [event.event_id]


async def test_a_status_change_is_published_without_waiting_for_the_sweep(
    harness: Harness,
) -> None:
    store = harness.store
    assert store is not None
    conn = connection()
    async with store.transaction() as tx:
        await tx.save_connection(conn)
    relay = OutboxRelay(store, harness.bus, sweep_interval_s=60.0)
    async with relay, harness.bus.subscribe(Subscription("g", "c")) as c:
        await asyncio.sleep(0.05)  # the relay's first sweep found nothing
        changed = await mark_needs_reauth(store, conn.id, "token revoked", notify=relay.notify)
        got = await drain(c, 1, timeout=2.0)
    assert changed is not None
    assert [(d.event.kind, d.event.connection_id) for d in got] == [
        (EventKind.CONNECTION_CHANGED, conn.id)
    ]
    assert got[0].event.payload["reason"] == "token revoked"


async def test_published_entries_are_kept_for_the_retention_only_when_the_outbox_is_the_log(
    harness: Harness,
) -> None:
    store = harness.store
    assert store is not None
    events = [make_event("conv1", n) for n in range(3)]
    await harness.publish(events[:2])
    # Handed over after the commit, as the gateway's producers do.
    relay = OutboxRelay(store, harness.bus, retention_s=0.0, sweep_interval_s=60.0)
    writer = OutboxWriter(relay)
    async with relay:
        async with store.transaction() as tx:
            handed = await writer.add(tx, events[2:])
        writer.committed(handed)
        async with asyncio.timeout(5):
            while relay.published < 1:  # noqa: ASYNC110 - the relay's own task publishes
                await asyncio.sleep(0.01)
    # Closing the relay settles what it published.
    since = datetime.now(UTC) - timedelta(minutes=5)
    kept = (await store.bus_load(since=since)).entries
    now = datetime.now(UTC)
    assert await store.claim_outbox(now=now, lease_until=now, limit=10) == []
    if harness.backend == "memory":
        # The in-process bus rebuilds its log from the outbox: every entry stays, marked.
        assert [e.event.event_id for e in kept] == [e.event_id for e in events]
        assert await relay.purge() == 3
    else:
        # Redis streams keep the events: the outbox deleted them once published.
        assert kept == []
        assert await relay.purge() == 0


async def test_entries_that_alone_stop_a_repeat_are_kept_whatever_the_bus(
    harness: Harness,
) -> None:
    # A message is deduped by its row, a reaction only by its outbox entry: Meta may resend
    # it long after it was published, and the entry must still be there to refuse it.
    store = harness.store
    assert store is not None
    swept = [make_event("conv1", 0), make_event("conv1", 1, kind=EventKind.REACTION_CHANGED)]
    handed = [make_event("conv2", 0), make_event("conv2", 1, kind=EventKind.MESSAGES_READ)]
    async with store.transaction() as tx:
        await tx.add_events(swept)
    relay = OutboxRelay(store, harness.bus, sweep_interval_s=60.0)
    writer = OutboxWriter(relay)
    async with relay:
        assert await relay.run_once() == 2
        async with store.transaction() as tx:
            taken = await writer.add(tx, handed)
        writer.committed(taken)
        async with asyncio.timeout(5):
            while relay.published < 4:  # noqa: ASYNC110 - the relay's own task publishes
                await asyncio.sleep(0.01)
    assert relay.settled == 4
    kept = (await store.bus_load(since=datetime.now(UTC) - timedelta(minutes=5))).entries
    if harness.backend == "memory":
        assert [e.event.event_id for e in kept] == [e.event_id for e in swept + handed]
    else:
        assert [e.event.event_id for e in kept] == [swept[1].event_id, handed[1].event_id]
    # The repeats: nothing is added, so nothing is published again.
    async with store.transaction() as tx:
        repeats = [swept[1], handed[1]]
        assert await tx.add_claimed_events(repeats, datetime.now(UTC)) == []


class _FailsOnce:
    """The bus, except that its first publish fails (Redis blinked)."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bus, name)

    async def publish_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        if not self.failed:
            self.failed = True
            raise BusUnavailable("redis: ConnectionError")
        await self._bus.publish_outbox(entries)


async def test_a_failed_hand_over_is_published_again_before_what_came_after(
    harness: Harness,
) -> None:
    store = harness.store
    assert store is not None
    bus = _FailsOnce(harness.bus)
    relay = OutboxRelay(store, bus, sweep_interval_s=60.0)
    writer = OutboxWriter(relay)
    first, second = make_event("conv1", 0), make_event("conv1", 1)
    async with relay, harness.bus.subscribe(Subscription("g", "c")) as c:
        await asyncio.sleep(0.05)  # the relay's first sweep found nothing
        for event in (first, second):
            async with store.transaction() as tx:
                handed = await writer.add(tx, [event])
            writer.committed(handed)
            await asyncio.sleep(0.01)
        # Well before the 30 s lease of the failed entry lapses.
        got = await drain(c, 2, timeout=3.0)
    assert bus.failed
    assert [d.event.event_id for d in got] == [first.event_id, second.event_id]


async def test_a_failed_sweep_is_published_again_before_what_came_after(
    harness: Harness,
) -> None:
    # The same for entries the relay claimed itself (notify, sweep): claimed under its
    # 30 s lease, they must not wait for it to lapse while later events go out first.
    store = harness.store
    assert store is not None
    bus = _FailsOnce(harness.bus)
    relay = OutboxRelay(store, bus, sweep_interval_s=60.0)
    writer = OutboxWriter(relay)
    first, second = make_event("conv1", 0), make_event("conv1", 1)
    async with relay, harness.bus.subscribe(Subscription("g", "c")) as c:
        await asyncio.sleep(0.05)  # the relay's first sweep found nothing
        async with store.transaction() as tx:
            await tx.add_events([first])
        relay.notify()
        async with asyncio.timeout(5):
            while not bus.failed:  # noqa: ASYNC110 - the relay's own task publishes
                await asyncio.sleep(0.01)
        async with store.transaction() as tx:
            handed = await writer.add(tx, [second])
        writer.committed(handed)
        got = await drain(c, 2, timeout=3.0)
    assert [d.event.event_id for d in got] == [first.event_id, second.event_id]


class _HeldPublish:
    """The bus, except that its first publish waits until let go (a slow round)."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self.held = asyncio.Event()
        self.go = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bus, name)

    async def publish_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        if not self.held.is_set():
            self.held.set()
            await self.go.wait()
        await self._bus.publish_outbox(entries)


async def test_a_relay_stopped_in_the_middle_of_a_round_still_settles_what_it_holds(
    harness: Harness,
) -> None:
    # Left unsettled, what it published would be published again by the next process's
    # sweep once the lease lapsed: after newer events, and to groups that had acked it.
    store = harness.store
    assert store is not None
    bus = _HeldPublish(harness.bus)
    relay = OutboxRelay(store, bus, sweep_interval_s=60.0)
    writer = OutboxWriter(relay)
    first, second = make_event("conv1", 0), make_event("conv1", 1)
    await relay.start()
    async with store.transaction() as tx:
        handed = await writer.add(tx, [first])
    writer.committed(handed)
    async with asyncio.timeout(5):
        await bus.held.wait()
    async with store.transaction() as tx:
        handed = await writer.add(tx, [second])
    writer.committed(handed)
    stopping = asyncio.create_task(relay.aclose())
    await asyncio.sleep(0)  # the stop is asked for while the round is in hand
    bus.go.set()
    await stopping
    assert relay.published == relay.settled == 2
    later = datetime.now(UTC) + timedelta(minutes=5)  # every lease lapsed
    assert await store.claim_outbox(now=later, lease_until=later, limit=10) == []


class _SteadyStream:
    """The bus, and a producer that commits one more event during each publish: a steady
    stream of hand-overs, never all published when a publish returns."""

    def __init__(self, bus: Bus, store: SqliteStore) -> None:
        self._bus = bus
        self._store = store
        self.writer: OutboxWriter | None = None
        self.flowing = True
        self._n = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bus, name)

    async def publish_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        if self.flowing and self.writer is not None:
            self._n += 1
            async with self._store.transaction() as tx:
                handed = await self.writer.add(tx, [make_event("conv1", self._n)])
            self.writer.committed(handed)
        await self._bus.publish_outbox(entries)


async def test_a_steady_stream_of_hand_overs_lets_the_relay_settle_and_sweep(
    harness: Harness,
) -> None:
    store = harness.store
    assert store is not None
    stream = _SteadyStream(harness.bus, store)
    relay = OutboxRelay(store, stream, sweep_interval_s=0.05)
    writer = stream.writer = OutboxWriter(relay)
    # Committed by a process that runs no relay: only a sweep publishes it.
    swept = make_event("conv2", 0, tenant="t2")
    only_swept = Subscription("g", "c", tenant_ids=frozenset({"t2"}))
    async with relay, harness.bus.subscribe(only_swept) as c:
        async with store.transaction() as tx:
            handed = await writer.add(tx, [make_event("conv1", 0)])
        writer.committed(handed)
        async with store.transaction() as tx:
            await tx.add_events([swept])
        try:
            got = await drain(c, 1, timeout=3.0)
            # And what was published is settled while the stream goes on.
            async with asyncio.timeout(3):
                while relay.settled == 0:  # noqa: ASYNC110 - the relay's own task settles
                    await asyncio.sleep(0.01)
        finally:
            stream.flowing = False
    assert [d.event.event_id for d in got] == [swept.event_id]
