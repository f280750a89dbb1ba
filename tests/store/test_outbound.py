"""The outbound part of the Tx contract, on both backends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

from gateway.domain.models import (
    Connection,
    Conversation,
    DeliveryError,
    Direction,
    MessageStatus,
)
from gateway.domain.outbound import DeliveryAttempt
from tests.store.conftest import AnyStore
from tests.store.factories import connection, conversation, message, now, outbound, participant


async def seeded(store: AnyStore) -> tuple[Connection, Conversation]:
    conn = connection()
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        part = await tx.upsert_participant(participant(conn, "5551"))
        conv = await tx.upsert_conversation(conversation(conn, part))
    return conn, conv


async def test_recipients_are_found_by_connection_and_channel_user_id(store: AnyStore) -> None:
    conn, conv = await seeded(store)
    async with store.transaction() as tx:
        found = await tx.find_conversation_for_recipient(conn.id, "5551")
        missing = await tx.find_conversation_for_recipient(conn.id, "nobody")
    assert found is not None
    assert found.id == conv.id
    assert missing is None


async def test_enqueue_leases_the_message_and_a_repeated_key_returns_the_first(
    store: AnyStore,
) -> None:
    _, conv = await seeded(store)
    t = now()
    first = outbound(conv, due=t, idempotency_key="k1", attempts=0, error=None)
    again = outbound(conv, due=t, idempotency_key="k1", attempts=0, error=None)
    async with store.transaction() as tx:
        stored, inserted = await tx.enqueue_outbound(first, t + timedelta(seconds=60))
    async with store.transaction() as tx:
        existing, inserted_again = await tx.enqueue_outbound(again, t + timedelta(seconds=60))
        lease = t + timedelta(seconds=5)
        claimed = await tx.claim_next_messages(now=t, lease_until=lease, limit=10)
        by_key = await tx.find_message_by_idempotency_key(first.tenant_id, "k1")
        depth = await tx.count_send_queue()
    assert inserted
    assert not inserted_again
    assert existing.id == stored.id == first.id
    assert by_key is not None
    assert by_key.id == first.id
    assert claimed == []  # leased to whoever makes the first attempt
    assert depth == 1


async def test_racing_enqueues_of_one_key_insert_once(
    store: AnyStore, store_factory: Callable[[], Awaitable[AnyStore]]
) -> None:
    _, conv = await seeded(store)
    stores = [store, await store_factory(), await store_factory()]
    t = now()

    async def enqueue(s: AnyStore) -> tuple[str, bool]:
        draft = outbound(conv, due=t, idempotency_key="race", attempts=0, error=None)
        async with s.transaction() as tx:
            m, inserted = await tx.enqueue_outbound(draft, t + timedelta(seconds=60))
        return m.id, inserted

    results = await asyncio.gather(*(enqueue(stores[i % 3]) for i in range(9)))
    assert len({mid for mid, _ in results}) == 1
    assert sum(inserted for _, inserted in results) == 1


async def test_record_writes_status_attempts_and_releases_the_lease(store: AnyStore) -> None:
    _, conv = await seeded(store)
    t = now()
    draft = outbound(conv, due=t, attempts=0, error=None)
    async with store.transaction() as tx:
        await tx.enqueue_outbound(draft, t + timedelta(seconds=60))
    error = DeliveryError("CHANNEL_TRANSIENT", "busy", channel_code=2, retryable=True)
    draft.status, draft.attempts, draft.error = MessageStatus.RETRYING, 1, error
    draft.next_attempt_at = t
    async with store.transaction() as tx:
        await tx.record_outbound(
            draft, DeliveryAttempt(1, t, t + timedelta(milliseconds=5), error), lease_until=None
        )
        lease = t + timedelta(seconds=5)
        claimed = await tx.claim_next_messages(now=t, lease_until=lease, limit=10)
    assert [m.id for m in claimed] == [draft.id]
    draft.status, draft.attempts, draft.error = MessageStatus.SENT, 2, None
    draft.external_id, draft.sent_at, draft.next_attempt_at = "mid.1", t, None
    async with store.transaction() as tx:
        await tx.record_outbound(draft, DeliveryAttempt(2, t, t), lease_until=None)
        got = await tx.get_message(draft.id)
        attempts = await tx.list_attempts(draft.id)
        depth = await tx.count_send_queue()
    assert got is not None
    assert (got.status, got.external_id, got.attempts, got.error) == (
        MessageStatus.SENT,
        "mid.1",
        2,
        None,
    )
    assert [(a.number, a.error) for a in attempts] == [(1, error), (2, None)]
    assert depth == 0


async def test_an_echo_confirms_a_sent_message_once(store: AnyStore) -> None:
    conn, conv = await seeded(store)
    t = now()
    sent = outbound(conv, due=t, status=MessageStatus.SENT, external_id="mid.9", sent_at=t)
    async with store.transaction() as tx:
        await tx.insert_message(sent)
        first = await tx.confirm_outbound([(conn.id, "mid.9", t)])
        repeat = await tx.confirm_outbound([(conn.id, "mid.9", t)])
    assert [m.id for m in first] == [sent.id]
    assert first[0].confirmed_at is not None
    assert repeat == []


async def test_a_batch_of_echoes_confirms_each_sent_message_it_names(store: AnyStore) -> None:
    conn, conv = await seeded(store)
    t = now()
    sent = [
        outbound(conv, due=t, status=MessageStatus.SENT, external_id=f"mid.{n}", sent_at=t)
        for n in range(3)
    ]
    queued = outbound(conv, due=t, external_id="mid.q")
    async with store.transaction() as tx:
        for m in [*sent, queued]:
            await tx.insert_message(m)
        await tx.confirm_outbound([(conn.id, "mid.1", t)])
        confirmed = await tx.confirm_outbound(
            [
                (conn.id, "mid.0", t + timedelta(seconds=1)),
                (conn.id, "mid.1", t + timedelta(seconds=1)),  # confirmed already
                (conn.id, "mid.2", t + timedelta(seconds=2)),
                (conn.id, "mid.q", t),  # not sent: nothing to confirm
                ("conn_other", "mid.0", t),  # another connection's id
                (conn.id, "mid.unknown", t),
            ]
        )
        stored = {m.id: await tx.get_message(m.id) for m in sent}
    assert sorted(m.external_id for m in confirmed) == ["mid.0", "mid.2"]
    assert {m.external_id: m.confirmed_at for m in confirmed} == {
        "mid.0": t + timedelta(seconds=1),
        "mid.2": t + timedelta(seconds=2),
    }
    assert [stored[m.id].confirmed_at for m in sent] == [  # type: ignore[union-attr]
        t + timedelta(seconds=1),
        t,
        t + timedelta(seconds=2),
    ]


async def test_two_batches_of_the_same_echoes_wait_for_each_other_and_confirm_once(
    store: AnyStore, store_factory: Callable[[], Awaitable[AnyStore]]
) -> None:
    conn, conv = await seeded(store)
    t = now()
    sent = [
        outbound(conv, due=t, status=MessageStatus.SENT, external_id=f"mid.{n}", sent_at=t)
        for n in range(3)
    ]
    async with store.transaction() as tx:
        for m in sent:
            await tx.insert_message(m)
    other = await store_factory()
    echoes = [(conn.id, m.external_id, t) for m in sent]

    async def repeat() -> list[str]:
        # Meta's second delivery of the same echoes, in the other order.
        async with other.transaction() as tx:
            return [m.external_id for m in await tx.confirm_outbound(echoes[::-1])]

    async with store.transaction() as tx:
        first = await tx.confirm_outbound(echoes)
        second = asyncio.create_task(repeat())
        await asyncio.sleep(0.3)
        assert not second.done()  # held until the first batch commits
    assert sorted(m.external_id for m in first) == ["mid.0", "mid.1", "mid.2"]
    assert await asyncio.wait_for(second, 10) == []


async def test_an_echo_stored_before_the_answer_is_folded_into_our_message(
    store: AnyStore,
) -> None:
    _, conv = await seeded(store)
    t = now()
    ours = outbound(conv, due=t, attempts=0, error=None)
    echo = message(
        conv,
        direction=Direction.OUTBOUND,
        status=MessageStatus.SENT,
        external_id="mid.early",
        created_at=t - timedelta(milliseconds=3),
    )
    async with store.transaction() as tx:
        await tx.enqueue_outbound(ours, t + timedelta(seconds=60))
        await tx.insert_message(echo)
    ours.status, ours.external_id, ours.sent_at, ours.attempts = (
        MessageStatus.SENT,
        "mid.early",
        t,
        1,
    )
    async with store.transaction() as tx:
        recorded = await tx.record_outbound(ours, DeliveryAttempt(1, t, t), lease_until=None)
        gone = await tx.get_message(echo.id)
        kept = await tx.find_message_by_external_id(ours.connection_id, "mid.early")
    assert gone is None
    assert kept is not None
    assert kept.id == ours.id
    assert recorded.confirmed_at is not None
