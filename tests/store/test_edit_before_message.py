"""An edit Meta delivers before the message it changes (Tx.ingest_inbound and the early
edits it keeps), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from gateway.bus.memory import MemoryBus
from gateway.domain.events import EventKind
from gateway.domain.inbound import InboundItem, RoutedItem
from gateway.domain.models import Connection, Message
from gateway.services.relay import OutboxRelay
from gateway.store import ingest as ingest_module
from gateway.store.ingest import InboundWriter
from tests.store import factories as f
from tests.store.conftest import AnyStore
from tests.store.test_ingest import T0, item, saved_connection, text
from tests.store.test_unsend_before_message import LATER, ingest, purge_all, unsend


def edit(customer: str, mid: str, body: str, count: int) -> InboundItem:
    # Each edit at its own time, as Meta stamps them: distinct dedupe keys.
    return item(
        EventKind.MESSAGE_EDITED,
        customer,
        mid,
        LATER + timedelta(seconds=count),
        text=body,
        edit_count=count,
    )


async def stored(store: AnyStore, conn: Connection, mid: str) -> Message:
    async with store.transaction() as tx:
        found = await tx.find_message_by_external_id(conn.id, mid)
    assert found is not None
    return found


@pytest.mark.parametrize("kind", [EventKind.MESSAGE_RECEIVED, EventKind.MESSAGE_ECHOED])
async def test_a_message_edited_before_it_arrived_is_stored_and_announced_edited(
    store: AnyStore, kind: EventKind
) -> None:
    conn = await saved_connection(store)
    (early,), (edited,) = await ingest(store, conn, edit("111", "m1", "fixed", 1))
    assert early.message_id == ""
    assert edited.kind == EventKind.MESSAGE_EDITED
    assert edited.payload == {"external_id": "m1", "text": "fixed", "edit_count": 1}

    (late,), events = await ingest(store, conn, item(kind, "111", "m1", text="fxed"))
    assert not late.duplicate
    assert not late.deleted_before_arrival
    assert [e.kind for e in events] == [kind]
    announced = events[0].payload["message"]
    assert (announced["text"], announced["edit_count"]) == ("fixed", 1)
    assert announced["id"] == late.message_id
    message = await stored(store, conn, "m1")
    assert message.id == late.message_id
    assert (message.text, message.edit_count) == ("fixed", 1)
    assert not message.deleted

    # Meta's retry of the late message is a plain duplicate; the early edit stays until the
    # purge (nothing reads it again: the message is stored now).
    (again,), events = await ingest(store, conn, item(kind, "111", "m1", text="fxed"))
    assert again.duplicate
    assert events == []
    assert await purge_all(store) == 1


@pytest.mark.parametrize("counts", [(1, 2), (2, 1)], ids=["in-order", "reordered"])
@pytest.mark.parametrize("together", [False, True], ids=["two-batches", "one-batch"])
async def test_of_two_early_edits_the_highest_edit_count_wins(
    store: AnyStore, counts: tuple[int, int], together: bool
) -> None:
    conn = await saved_connection(store)
    edits = [edit("111", "m1", f"take {n}", n) for n in counts]
    if together:
        await ingest(store, conn, *edits)
    else:
        for e in edits:
            await ingest(store, conn, e)

    (late,), (received,) = await ingest(store, conn, text("111", "m1", body="take 0"))
    assert late.message is not None
    assert (late.message.text, late.message.edit_count) == ("take 2", 2)
    assert received.payload["message"]["text"] == "take 2"
    assert received.payload["message"]["edit_count"] == 2
    message = await stored(store, conn, "m1")
    assert (message.text, message.edit_count) == ("take 2", 2)
    assert await purge_all(store) == 1  # one early edit per message


async def test_an_older_edit_arriving_after_the_late_message_does_not_overwrite_it(
    store: AnyStore,
) -> None:
    conn = await saved_connection(store)
    await ingest(store, conn, edit("111", "m1", "take 2", 2))
    await ingest(store, conn, text("111", "m1", body="take 0"))
    (older,), _ = await ingest(store, conn, edit("111", "m1", "take 1", 1))
    assert older.message_id != ""
    message = await stored(store, conn, "m1")
    assert (message.text, message.edit_count) == ("take 2", 2)


async def test_an_edit_earlier_in_the_same_batch_applies_to_its_message(
    store: AnyStore,
) -> None:
    conn = await saved_connection(store)
    (early, late), events = await ingest(
        store, conn, edit("111", "m1", "fixed", 1), text("111", "m1", body="fxed")
    )
    assert early.message_id == late.message_id != ""
    # Its MessageEdited goes out first: the message must not then undo it.
    assert [e.kind for e in events] == [EventKind.MESSAGE_EDITED, EventKind.MESSAGE_RECEIVED]
    assert events[1].payload["message"]["text"] == "fixed"
    assert events[1].payload["message"]["edit_count"] == 1
    message = await stored(store, conn, "m1")
    assert (message.text, message.edit_count) == ("fixed", 1)
    assert await purge_all(store) == 0  # the message was there: no early edit needed


async def test_an_edit_later_in_the_same_batch_is_announced_after_the_original(
    store: AnyStore,
) -> None:
    conn = await saved_connection(store)
    _, events = await ingest(
        store, conn, text("111", "m1", body="fxed"), edit("111", "m1", "fixed", 1)
    )
    assert [e.kind for e in events] == [EventKind.MESSAGE_RECEIVED, EventKind.MESSAGE_EDITED]
    assert events[0].payload["message"]["text"] == "fxed"
    assert events[1].payload["text"] == "fixed"
    message = await stored(store, conn, "m1")
    assert (message.text, message.edit_count) == ("fixed", 1)


@pytest.mark.parametrize("edit_first", [True, False], ids=["edit-first", "unsend-first"])
@pytest.mark.parametrize("together", [False, True], ids=["two-batches", "one-batch"])
async def test_an_early_edit_and_an_early_unsend_leave_the_message_deleted_and_unannounced(
    store: AnyStore, edit_first: bool, together: bool
) -> None:
    conn = await saved_connection(store)
    changes = [edit("111", "m1", "fixed", 1), unsend("111", "m1")]
    if not edit_first:
        changes.reverse()
    if together:
        await ingest(store, conn, *changes)
    else:
        for change in changes:
            await ingest(store, conn, change)

    (late,), events = await ingest(store, conn, text("111", "m1", body="fxed"))
    assert events == []
    assert late.deleted_before_arrival
    message = await stored(store, conn, "m1")
    assert message.id == late.message_id
    assert message.deleted
    assert await purge_all(store) == 2  # a tombstone and an early edit


async def test_early_edits_belong_to_their_connection(store: AnyStore) -> None:
    conn = await saved_connection(store)
    other = f.connection()
    async with store.transaction() as tx:
        await tx.save_connection(other)
    await ingest(store, conn, edit("111", "m1", "fixed", 1))
    (_,), (received,) = await ingest(store, other, text("111", "m1", body="fxed"))
    assert received.payload["message"]["text"] == "fxed"
    assert "edit_count" not in received.payload["message"]
    message = await stored(store, other, "m1")
    assert (message.text, message.edit_count) == ("fxed", 0)
    # The connection's own message still gets its edit.
    (_,), (received,) = await ingest(store, conn, text("111", "m1", body="fxed"))
    assert received.payload["message"]["text"] == "fixed"


async def test_a_message_of_an_unmarked_conversation_is_taken_as_it_comes(
    store: AnyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = await saved_connection(store)
    await ingest(store, conn, edit("111", "m1", "fixed", 1))
    looked_up: list[list[str]] = []
    apply = InboundWriter._apply_early_changes

    async def spy(writer: InboundWriter, messages: Sequence[Message]) -> None:
        looked_up.append([m.external_id for m in messages])
        await apply(writer, messages)

    monkeypatch.setattr(InboundWriter, "_apply_early_changes", spy)
    # Another customer's conversation was never marked: no lookup, the text as sent.
    (_,), (received,) = await ingest(store, conn, text("222", "m1", body="fxed"))
    assert looked_up == []
    assert received.payload["message"]["text"] == "fxed"
    # A batch with a marked conversation looks up only that conversation's messages.
    await ingest(store, conn, text("222", "m2"), text("111", "m3"))
    assert looked_up == [["m3"]]


async def test_the_mark_lapses_with_the_retention(
    store: AnyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = await saved_connection(store)
    await ingest(store, conn, edit("111", "m1", "fixed", 1))
    monkeypatch.setattr(ingest_module, "TOMBSTONE_RETENTION", timedelta(0))
    (_,), (received,) = await ingest(store, conn, text("111", "m1", body="fxed"))
    assert received.payload["message"]["text"] == "fxed"
    assert (await stored(store, conn, "m1")).text == "fxed"


async def test_the_purge_drops_early_edits_past_their_retention(store: AnyStore) -> None:
    conn = await saved_connection(store)
    await ingest(store, conn, edit("111", "m1", "fixed", 1), edit("111", "m2", "fixed", 1))
    assert await store.purge_tombstones(datetime.now(UTC) - timedelta(minutes=1)) == 0
    await OutboxRelay(store, MemoryBus(store)).purge()
    (_,), (received,) = await ingest(store, conn, text("111", "m1", body="fxed"))
    assert received.payload["message"]["text"] == "fixed"  # kept within the retention

    await OutboxRelay(store, MemoryBus(store), tombstone_retention_s=0.0).purge()
    (_,), (received,) = await ingest(store, conn, text("111", "m2", body="fxed"))
    assert received.payload["message"]["text"] == "fxed"
    assert (await stored(store, conn, "m2")).edit_count == 0
    assert await purge_all(store) == 0


async def test_an_edit_committing_while_its_message_is_stored_is_not_missed(
    store: AnyStore, store_factory: Callable[[], Awaitable[AnyStore]]
) -> None:
    """Two replicas: the message's transaction starts while the edit's is still open."""
    conn = await saved_connection(store)
    await ingest(store, conn, text("111", "m0"))  # the conversation exists already
    other = await store_factory()
    async with store.transaction() as tx:
        await tx.ingest_inbound([RoutedItem(conn, edit("111", "m1", "fixed", 1), T0)])
        message = asyncio.create_task(ingest(other, conn, text("111", "m1", body="fxed")))
        await asyncio.sleep(0.3)
        assert not message.done()
    (_,), (received,) = await asyncio.wait_for(message, 10)
    assert received.payload["message"]["text"] == "fixed"
    assert (await stored(store, conn, "m1")).text == "fixed"
