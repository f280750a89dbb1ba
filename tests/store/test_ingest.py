"""Contract of Tx.ingest_inbound and the quarantine, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from gateway.domain.events import EventKind
from gateway.domain.inbound import InboundItem, QuarantinedDelivery, RoutedItem
from gateway.domain.models import Connection, Direction, MessageStatus
from tests.store import factories as f
from tests.store.conftest import AnyStore

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def item(
    kind: EventKind, customer: str, mid: str, at: datetime = T0, **fields: object
) -> InboundItem:
    return InboundItem(
        kind=kind,
        account_ids=("ig",),
        customer_id=customer,
        occurred_at=at,
        dedupe_key=f"{kind}:{mid}:{at.timestamp()}",
        external_id=mid,
        **fields,  # type: ignore[arg-type]
    )


def text(customer: str, mid: str, at: datetime = T0, body: str = "hi") -> InboundItem:
    return item(EventKind.MESSAGE_RECEIVED, customer, mid, at, text=body)


async def saved_connection(store: AnyStore) -> Connection:
    conn = f.connection()
    async with store.transaction() as tx:
        await tx.save_connection(conn)
    return conn


async def ingest(store: AnyStore, conn: Connection, *items: InboundItem) -> list:  # type: ignore[type-arg]
    async with store.transaction() as tx:
        return await tx.ingest_inbound([RoutedItem(conn, i, T0) for i in items])


async def test_a_new_message_creates_participant_conversation_and_message(
    store: AnyStore,
) -> None:
    conn = await saved_connection(store)
    (result,) = await ingest(store, conn, text("111", "m1", body="héllo ✨"))
    assert not result.duplicate
    conv = result.conversation
    assert conv is not None
    assert conv.participant.channel_user_id == "111"
    assert conv.tenant_id == conn.tenant_id
    assert conv.last_inbound_at == T0
    assert conv.last_message_at == T0
    assert conv.window_expires_at == T0 + timedelta(hours=24)
    assert result.message is not None
    async with store.transaction() as tx:
        stored = await tx.find_message_by_external_id(conn.id, "m1")
    assert stored is not None
    assert stored.id == result.message_id
    assert stored.text == "héllo ✨"
    assert stored.direction == Direction.INBOUND
    assert stored.status == MessageStatus.RECEIVED
    assert stored.sender_id == "111"
    assert stored.created_at == T0


async def test_duplicates_in_one_batch_and_across_batches_are_stored_once(
    store: AnyStore,
) -> None:
    conn = await saved_connection(store)
    first, again = await ingest(store, conn, text("111", "m1"), text("111", "m1"))
    assert not first.duplicate
    assert again.duplicate
    (later,) = await ingest(store, conn, text("111", "m1"))
    assert later.duplicate
    assert later.message_id == first.message_id
    async with store.transaction() as tx:
        page = await tx.list_messages(first.conversation.id, page_size=10)
    assert len(page.items) == 1


async def test_one_conversation_per_customer_and_times_only_move_forward(
    store: AnyStore,
) -> None:
    conn = await saved_connection(store)
    late = T0 + timedelta(minutes=5)
    a, b, c = await ingest(
        store, conn, text("111", "m2", late), text("111", "m1", T0), text("222", "m3")
    )
    assert a.conversation.id == b.conversation.id
    assert c.conversation.id != a.conversation.id
    assert a.conversation.last_inbound_at == late
    (old,) = await ingest(store, conn, text("111", "m0", T0 - timedelta(hours=1)))
    assert old.conversation.last_inbound_at == late
    assert old.conversation.window_expires_at == late + timedelta(hours=24)


async def test_echoes_are_outbound_and_do_not_open_the_window(store: AnyStore) -> None:
    conn = await saved_connection(store)
    (echo,) = await ingest(store, conn, item(EventKind.MESSAGE_ECHOED, "111", "e1", text="ok"))
    assert echo.message.direction == Direction.OUTBOUND
    assert echo.message.sender_id == conn.account.external_id
    assert echo.conversation.last_inbound_at is None
    assert echo.conversation.window_expires_at is None


async def test_an_echo_of_our_sent_message_confirms_it_and_moves_its_conversation(
    store: AnyStore,
) -> None:
    conn = await saved_connection(store)
    (hello,) = await ingest(store, conn, text("111", "m1"))
    conv = hello.conversation
    sent_at = T0 + timedelta(seconds=5)
    ours = f.outbound(conv, due=T0, status=MessageStatus.SENT, external_id="e1", sent_at=sent_at)
    async with store.transaction() as tx:
        await tx.insert_message(ours)
    echoed_at = T0 + timedelta(seconds=6)
    echo = item(EventKind.MESSAGE_ECHOED, "111", "e1", echoed_at, text="hi back")
    other = item(EventKind.MESSAGE_ECHOED, "111", "e2", T0 + timedelta(seconds=7), text="agent")
    first, repeat, foreign = await ingest(store, conn, echo, echo, other)
    # Ours: confirmed once, not stored again; another app's echo is stored as before.
    assert (first.duplicate, first.message_id) == (True, ours.id)
    assert first.confirmed is not None
    assert first.confirmed.confirmed_at == echoed_at
    assert (repeat.duplicate, repeat.confirmed, repeat.message_id) == (True, None, ours.id)
    assert not foreign.duplicate
    assert foreign.message is not None
    assert foreign.message.direction == Direction.OUTBOUND
    (later,) = await ingest(store, conn, echo)  # Meta's retry of the delivery
    assert (later.duplicate, later.confirmed, later.message_id) == (True, None, ours.id)
    async with store.transaction() as tx:
        page = await tx.list_messages(conv.id, page_size=10)
        moved = await tx.get_conversation(conv.id)
    assert sorted(m.external_id for m in page.items) == ["e1", "e2", "m1"]
    assert moved is not None
    assert moved.last_message_at == T0 + timedelta(seconds=7)
    assert moved.last_inbound_at == T0
    # A confirmation never moves the conversation's last message time back.
    older = f.outbound(conv, due=T0, status=MessageStatus.SENT, external_id="e0", sent_at=T0)
    async with store.transaction() as tx:
        await tx.insert_message(older)
    (late_echo,) = await ingest(store, conn, item(EventKind.MESSAGE_ECHOED, "111", "e0", T0))
    assert late_echo.confirmed is not None
    async with store.transaction() as tx:
        kept = await tx.get_conversation(conv.id)
    assert kept is not None
    assert kept.last_message_at == T0 + timedelta(seconds=7)
    # A batch of nothing but a confirming echo moves it forward.
    ahead = f.outbound(conv, due=T0, status=MessageStatus.SENT, external_id="e4", sent_at=T0)
    async with store.transaction() as tx:
        await tx.insert_message(ahead)
    ahead_at = T0 + timedelta(seconds=8)
    (alone,) = await ingest(store, conn, item(EventKind.MESSAGE_ECHOED, "111", "e4", ahead_at))
    assert alone.confirmed is not None
    async with store.transaction() as tx:
        moved_alone = await tx.get_conversation(conv.id)
    assert moved_alone is not None
    assert moved_alone.last_message_at == ahead_at
    # With another customer's message in the batch, it moves all the same.
    newest = f.outbound(conv, due=T0, status=MessageStatus.SENT, external_id="e3", sent_at=T0)
    async with store.transaction() as tx:
        await tx.insert_message(newest)
    at = T0 + timedelta(seconds=9)
    echo3 = item(EventKind.MESSAGE_ECHOED, "111", "e3", at, text="more")
    mine, theirs = await ingest(store, conn, echo3, text("222", "m9", at))
    assert mine.confirmed is not None
    assert theirs.conversation is not None
    async with store.transaction() as tx:
        both = [await tx.get_conversation(c.id) for c in (conv, theirs.conversation)]
    assert [c.last_message_at for c in both if c is not None] == [at, at]


async def test_edits_and_unsends_update_known_messages(store: AnyStore) -> None:
    conn = await saved_connection(store)
    (sent,) = await ingest(store, conn, text("111", "m1", body="helo"))
    edit2 = item(EventKind.MESSAGE_EDITED, "111", "m1", text="hello!", edit_count=2)
    edit1 = item(EventKind.MESSAGE_EDITED, "111", "m1", text="hello", edit_count=1)
    results = await ingest(store, conn, edit2, edit1)
    assert [r.message_id for r in results] == [sent.message_id] * 2
    async with store.transaction() as tx:
        stored = await tx.get_message(sent.message_id)
    assert stored is not None
    assert (stored.text, stored.edit_count) == ("hello!", 2)
    await ingest(store, conn, item(EventKind.MESSAGE_DELETED, "111", "m1"))
    async with store.transaction() as tx:
        stored = await tx.get_message(sent.message_id)
    assert stored is not None
    assert stored.deleted


async def test_an_edit_in_the_same_batch_as_its_message_applies(store: AnyStore) -> None:
    conn = await saved_connection(store)
    edit = item(EventKind.MESSAGE_EDITED, "111", "m1", text="fixed", edit_count=1)
    sent, edited = await ingest(store, conn, text("111", "m1", body="fxed"), edit)
    assert edited.message_id == sent.message_id
    async with store.transaction() as tx:
        stored = await tx.get_message(sent.message_id)
    assert stored is not None
    assert stored.text == "fixed"


async def test_changes_to_unknown_messages_are_reported_without_a_message_id(
    store: AnyStore,
) -> None:
    conn = await saved_connection(store)
    (r,) = await ingest(store, conn, item(EventKind.MESSAGE_DELETED, "111", "nope"))
    assert r.message_id == ""
    assert r.conversation is not None


async def test_a_read_without_sender_belongs_to_its_message_conversation(
    store: AnyStore,
) -> None:
    conn = await saved_connection(store)
    (sent,) = await ingest(store, conn, text("111", "m1"))
    (read,) = await ingest(store, conn, item(EventKind.MESSAGES_READ, "", "m1"))
    assert read.conversation is not None
    assert read.conversation.id == sent.conversation.id
    (lost,) = await ingest(store, conn, item(EventKind.MESSAGES_READ, "", "unknown"))
    assert lost.conversation is None


async def test_replies_name_the_replied_message(store: AnyStore) -> None:
    conn = await saved_connection(store)
    (first,) = await ingest(store, conn, text("111", "m1"))
    reply = item(EventKind.MESSAGE_RECEIVED, "111", "m2", text="yes", reply_to_external_id="m1")
    (r,) = await ingest(store, conn, reply)
    assert r.reply_to_message_id == first.message_id


async def test_one_batch_of_received_echoed_and_early_changed_messages_stores_each(
    store: AnyStore,
) -> None:
    """On PostgreSQL a batch's received messages share one statement with its participants
    and conversations, while an echo and a message whose unsend came first are written after
    it: all of them in one batch still come out as they would one by one."""
    conn = await saved_connection(store)
    await ingest(store, conn, item(EventKind.MESSAGE_DELETED, "222", "gone"))
    results = await ingest(
        store,
        conn,
        text("111", "m1", body="first"),
        item(EventKind.MESSAGE_ECHOED, "111", "e1", text="reply"),
        text("222", "gone", body="unsent"),
        text("222", "kept", body="other"),
        text("333", "m2", body="new customer"),
        text("111", "m1", body="first"),
    )
    received, echo, unsent, kept, fresh, repeat = results
    assert [r.duplicate for r in results] == [False] * 5 + [True]
    assert repeat.message_id == received.message_id
    assert echo.message.direction == Direction.OUTBOUND
    assert unsent.deleted_before_arrival
    assert not kept.deleted_before_arrival
    assert received.conversation.id == echo.conversation.id
    assert unsent.conversation.id == kept.conversation.id
    assert len({received.conversation.id, unsent.conversation.id, fresh.conversation.id}) == 3
    async with store.transaction() as tx:
        for result in (received, echo, unsent, kept, fresh):
            stored = await tx.get_message(result.message_id)
            assert stored is not None
            assert stored.conversation_id == result.conversation.id
            assert stored.text == result.message.text
            assert stored.deleted == (result is unsent)


async def test_a_large_batch_spans_several_statements(store: AnyStore) -> None:
    conn = await saved_connection(store)
    items = [text(str(1000 + n % 300), f"m{n}", T0 + timedelta(seconds=n)) for n in range(900)]
    results = await ingest(store, conn, *items)
    assert not any(r.duplicate for r in results)
    assert len({r.conversation.id for r in results}) == 300


async def test_a_new_customer_another_transaction_adds_meanwhile_is_found(
    store: AnyStore, store_factory: Callable[[], Awaitable[AnyStore]]
) -> None:
    """Two replicas take the first messages of one new customer at once: the second waits
    for the first's participant, finds it once committed, and shares its conversation."""
    conn = await saved_connection(store)
    other = await store_factory()
    async with store.transaction() as tx:
        (first,) = await tx.ingest_inbound([RoutedItem(conn, text("999", "m1"), T0)])
        second = asyncio.create_task(ingest(other, conn, text("999", "m2")))
        await asyncio.sleep(0.3)
        assert not second.done()  # waiting for this transaction's participant
    (late,) = await second
    assert late.conversation is not None
    assert late.conversation.id == first.conversation.id
    assert late.conversation.participant.id == first.conversation.participant.id
    assert not late.duplicate
    async with store.transaction() as tx:
        page = await tx.list_messages(first.conversation.id, page_size=10)
    assert sorted(m.external_id for m in page.items) == ["m1", "m2"]


@pytest.mark.parametrize("backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_storing_messages_does_not_lock_their_connection(
    store: AnyStore, store_factory: Callable[[], Awaitable[AnyStore]]
) -> None:
    """A busy account's connection stays claimable (token refresh claims with FOR UPDATE
    SKIP LOCKED) while a batch of its known customers' messages is being stored."""
    soon = datetime.now(UTC) + timedelta(hours=1)
    conn = f.connection(token_expires_at=soon)
    async with store.transaction() as tx:
        await tx.save_connection(conn)
    await ingest(store, conn, text("111", "m0"))
    other = await store_factory()
    now = datetime.now(UTC)
    async with store.transaction() as tx:
        await tx.ingest_inbound([RoutedItem(conn, text("111", "m1"), T0)])
        async with other.transaction() as claim:
            claimed = await claim.claim_connections_due(
                due_before=soon + timedelta(minutes=1), now=now, lease_until=now, limit=10
            )
    assert [c.id for c in claimed] == [conn.id]


async def test_deleting_a_connection_deletes_its_messages(store: AnyStore) -> None:
    conn = await saved_connection(store)
    (result,) = await ingest(store, conn, text("111", "m1"))
    async with store.transaction() as tx:
        await tx._ex.execute("DELETE FROM connections WHERE id = :id", {"id": conn.id})  # type: ignore[attr-defined]
    async with store.transaction() as tx:
        assert await tx.find_message_by_external_id(conn.id, "m1") is None
        assert await tx.get_message(result.message_id) is None


async def test_deleting_a_conversation_deletes_its_messages_only(store: AnyStore) -> None:
    conn = await saved_connection(store)
    (gone,) = await ingest(store, conn, text("111", "m1"))
    (kept,) = await ingest(store, conn, text("222", "m2"))
    assert gone.conversation is not None
    async with store.transaction() as tx:
        await tx._ex.execute(  # type: ignore[attr-defined]
            "DELETE FROM conversations WHERE id = :id", {"id": gone.conversation.id}
        )
    async with store.transaction() as tx:
        assert await tx.get_message(gone.message_id) is None
        assert await tx.get_message(kept.message_id) is not None


async def test_nothing_stays_when_the_transaction_fails(store: AnyStore) -> None:
    conn = await saved_connection(store)

    class Boom(Exception):
        pass

    async def fail_after_writing() -> None:
        async with store.transaction() as tx:
            await tx.ingest_inbound([RoutedItem(conn, text("111", "m1"), T0)])
            await tx.add_events([f.event(conn)])
            raise Boom

    with pytest.raises(Boom):
        await fail_after_writing()
    async with store.transaction() as tx:
        assert await tx.find_message_by_external_id(conn.id, "m1") is None
    assert await store.claim_outbox(now=T0, lease_until=T0, limit=10) == []


async def test_quarantine_keeps_only_the_most_recent(store: AnyStore) -> None:
    channel = f"test-{id(store)}"
    async with store.transaction() as tx:
        for n in range(5):
            await tx.quarantine(
                [QuarantinedDelivery(channel, "MALFORMED", f"body{n}".encode(), T0, "acc")],
                keep=3,
            )
        kept = await tx.list_quarantine(channel=channel)
    assert [q.body for q in kept] == [b"body4", b"body3", b"body2"]
    assert kept[0].reason == "MALFORMED"
    assert kept[0].account_id == "acc"
    assert kept[0].body_size == 5
