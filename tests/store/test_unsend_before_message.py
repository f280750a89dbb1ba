"""An unsend Meta delivers before the message it takes back (Tx.ingest_inbound and the
tombstones it keeps), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from gateway.bus.memory import MemoryBus
from gateway.domain.events import Event, EventKind
from gateway.domain.inbound import InboundItem, IngestResult, RoutedItem
from gateway.domain.models import Connection
from gateway.services.inbound_events import build_events
from gateway.services.relay import OutboxRelay
from gateway.store import ingest as ingest_module
from tests.store import factories as f
from tests.store.conftest import AnyStore
from tests.store.test_ingest import T0, item, saved_connection, text

LATER = T0 + timedelta(seconds=5)


def unsend(customer: str, mid: str) -> InboundItem:
    return item(EventKind.MESSAGE_DELETED, customer, mid, LATER)


async def ingest(
    store: AnyStore, conn: Connection, *items: InboundItem
) -> tuple[list[IngestResult], list[Event]]:
    """What the inbound service does with a batch: the results and the events published."""
    routed = [RoutedItem(conn, i, T0) for i in items]
    async with store.transaction() as tx:
        results = await tx.ingest_inbound(routed)
    return results, build_events(routed, results)


async def purge_all(store: AnyStore) -> int:
    return await store.purge_tombstones(datetime.now(UTC) + timedelta(hours=1))


@pytest.mark.parametrize("kind", [EventKind.MESSAGE_RECEIVED, EventKind.MESSAGE_ECHOED])
async def test_a_message_unsent_before_it_arrived_is_stored_deleted_and_not_announced(
    store: AnyStore, kind: EventKind
) -> None:
    conn = await saved_connection(store)
    (gone,), (deleted,) = await ingest(store, conn, unsend("111", "m1"))
    assert gone.message_id == ""
    assert deleted.kind == EventKind.MESSAGE_DELETED
    assert deleted.payload == {"external_id": "m1"}
    assert gone.conversation is not None
    assert deleted.conversation_id == gone.conversation.id

    (late,), events = await ingest(store, conn, item(kind, "111", "m1", text="oops"))
    assert events == []
    assert late.deleted_before_arrival
    assert not late.duplicate
    assert late.message is not None
    assert late.message.deleted
    assert late.conversation is not None
    assert late.conversation.id == gone.conversation.id
    async with store.transaction() as tx:
        stored = await tx.find_message_by_external_id(conn.id, "m1")
    assert stored is not None
    assert stored.id == late.message_id
    assert stored.deleted
    assert stored.text == "oops"

    # Meta's retry of the late message is a plain duplicate; the tombstone stays until the
    # purge (nothing reads it again: the message is stored now).
    (again,), events = await ingest(store, conn, item(kind, "111", "m1", text="oops"))
    assert again.duplicate
    assert events == []
    assert await purge_all(store) == 1


async def test_an_unsend_earlier_in_the_same_batch_hides_its_message(store: AnyStore) -> None:
    conn = await saved_connection(store)
    (gone, late), events = await ingest(store, conn, unsend("111", "m1"), text("111", "m1"))
    assert late.deleted_before_arrival
    assert gone.message_id == late.message_id != ""
    assert [e.kind for e in events] == [EventKind.MESSAGE_DELETED]
    assert events[0].payload == {"message_id": late.message_id, "external_id": "m1"}
    async with store.transaction() as tx:
        stored = await tx.get_message(late.message_id)
    assert stored is not None
    assert stored.deleted
    assert await purge_all(store) == 0  # the message was there: no tombstone needed


async def test_a_message_and_then_its_unsend_are_both_announced(store: AnyStore) -> None:
    conn = await saved_connection(store)
    (sent, _), events = await ingest(store, conn, text("111", "m1"), unsend("111", "m1"))
    assert not sent.deleted_before_arrival
    assert [e.kind for e in events] == [EventKind.MESSAGE_RECEIVED, EventKind.MESSAGE_DELETED]
    (kept,), _ = await ingest(store, conn, text("111", "m2"))
    (_,), events = await ingest(store, conn, unsend("111", "m2"))
    assert events[0].payload == {"message_id": kept.message_id, "external_id": "m2"}
    assert await purge_all(store) == 0  # unsends of stored messages leave no tombstone


async def test_only_the_unsent_message_of_a_marked_conversation_is_hidden(
    store: AnyStore,
) -> None:
    conn = await saved_connection(store)
    await ingest(store, conn, unsend("111", "m1"))
    (other, late), events = await ingest(store, conn, text("111", "m2"), text("111", "m1"))
    assert not other.deleted_before_arrival
    assert late.deleted_before_arrival
    assert [e.payload["message"]["external_id"] for e in events] == ["m2"]


async def test_the_mark_of_a_conversation_lapses_with_the_retention(
    store: AnyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = await saved_connection(store)
    await ingest(store, conn, unsend("111", "m1"))
    # Past the retention the tombstones are purged or due to be: not looked up any more.
    monkeypatch.setattr(ingest_module, "TOMBSTONE_RETENTION", timedelta(0))
    (late,), events = await ingest(store, conn, text("111", "m1"))
    assert not late.deleted_before_arrival
    assert [e.kind for e in events] == [EventKind.MESSAGE_RECEIVED]


async def test_an_unsend_naming_no_customer_leaves_no_tombstone(store: AnyStore) -> None:
    conn = await saved_connection(store)
    (gone,), events = await ingest(store, conn, unsend("", "m1"))
    assert gone.conversation is None
    assert [e.kind for e in events] == [EventKind.MESSAGE_DELETED]
    assert await purge_all(store) == 0


async def test_tombstones_belong_to_their_connection(store: AnyStore) -> None:
    conn = await saved_connection(store)
    other = f.connection()
    async with store.transaction() as tx:
        await tx.save_connection(other)
    await ingest(store, conn, unsend("111", "m1"))
    (live,), events = await ingest(store, other, text("111", "m1"))
    assert not live.deleted_before_arrival
    assert [e.kind for e in events] == [EventKind.MESSAGE_RECEIVED]


async def test_a_retried_unsend_keeps_one_tombstone_and_the_purge_bounds_them(
    store: AnyStore,
) -> None:
    conn = await saved_connection(store)
    await ingest(store, conn, unsend("111", "m1"), unsend("111", "m1"))
    await ingest(store, conn, unsend("111", "m1"), unsend("111", "m2"))
    assert await store.purge_tombstones(datetime.now(UTC) - timedelta(minutes=1)) == 0
    assert await purge_all(store) == 2
    # Past retention the message is taken as it comes.
    (late,), events = await ingest(store, conn, text("111", "m1"))
    assert not late.deleted_before_arrival
    assert [e.kind for e in events] == [EventKind.MESSAGE_RECEIVED]


@pytest.mark.parametrize("customer", ["known", "new"])
async def test_an_unsend_committing_while_its_message_is_stored_is_not_missed(
    store: AnyStore, store_factory: Callable[[], Awaitable[AnyStore]], customer: str
) -> None:
    """Two replicas: the message's transaction starts while the unsend's is still open."""
    conn = await saved_connection(store)
    if customer == "known":
        await ingest(store, conn, text("111", "m0"))  # the conversation exists already
    other = await store_factory()
    async with store.transaction() as tx:
        await tx.ingest_inbound([RoutedItem(conn, unsend("111", "m1"), T0)])
        message = asyncio.create_task(ingest(other, conn, text("111", "m1")))
        await asyncio.sleep(0.3)
        # Waiting on the conversation or participant row (PostgreSQL), or on the write
        # lock (SQLite).
        assert not message.done()
    (late,), events = await asyncio.wait_for(message, 10)
    assert late.deleted_before_arrival
    assert events == []


async def test_a_message_committing_while_its_unsend_is_stored_is_not_missed(
    store: AnyStore, store_factory: Callable[[], Awaitable[AnyStore]]
) -> None:
    conn = await saved_connection(store)
    await ingest(store, conn, text("111", "m0"))
    other = await store_factory()
    async with store.transaction() as tx:
        (sent,) = await tx.ingest_inbound([RoutedItem(conn, text("111", "m1"), T0)])
        gone = asyncio.create_task(ingest(other, conn, unsend("111", "m1")))
        await asyncio.sleep(0.3)
        assert not gone.done()
    (result,), events = await asyncio.wait_for(gone, 10)
    assert result.message_id == sent.message_id
    assert events[0].payload == {"message_id": sent.message_id, "external_id": "m1"}
    async with store.transaction() as tx:
        stored = await tx.get_message(sent.message_id)
    assert stored is not None
    assert stored.deleted
    assert await purge_all(store) == 0


async def test_the_relays_periodic_purge_drops_tombstones_past_their_retention(
    store: AnyStore,
) -> None:
    conn = await saved_connection(store)
    await ingest(store, conn, unsend("111", "m1"))
    keeping = OutboxRelay(store, MemoryBus(store))
    await keeping.purge()
    (late,), _ = await ingest(store, conn, text("111", "m1"))
    assert late.deleted_before_arrival

    await ingest(store, conn, unsend("111", "m2"))
    await OutboxRelay(store, MemoryBus(store), tombstone_retention_s=0.0).purge()
    (late,), events = await ingest(store, conn, text("111", "m2"))
    assert not late.deleted_before_arrival
    assert [e.kind for e in events] == [EventKind.MESSAGE_RECEIVED]
