"""A batch of outcomes on both stores (one statement on PostgreSQL): echoes that came
first folded in, every attempt recorded, and whether a settled message still has another
of its conversation waiting."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from gateway.domain.errors import AlreadyExists
from gateway.domain.models import DeliveryError, Direction, Message, MessageStatus
from gateway.domain.outbound import DeliveryAttempt
from tests.store.conftest import AnyStore
from tests.store.factories import (
    connection,
    conversation,
    message,
    now,
    outbound,
    participant,
    stored_conversation,
)


async def test_a_batch_folds_echoes_records_attempts_and_sees_who_waits(store: AnyStore) -> None:
    conn = connection()
    t = now()
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        convs = [
            await tx.upsert_conversation(conversation(conn, await tx.upsert_participant(p)))
            for p in (participant(conn), participant(conn))
        ]
        # Conversation 0: a, then b behind it. Conversation 1: c alone.
        a, b = (
            outbound(convs[0], due=t, attempts=0, error=None, created_at=t + timedelta(seconds=i))
            for i in range(2)
        )
        c = outbound(convs[1], due=t, attempts=0, error=None, created_at=t)
        stored = await tx.enqueue_outbound_in_order([a, b, c], t + timedelta(seconds=60), behind=[])
        assert [inserted for _, inserted in stored] == [True, True, True]
        # Meta's echo of a, stored before its answer.
        echo = message(
            convs[0],
            direction=Direction.OUTBOUND,
            status=MessageStatus.SENT,
            external_id="mid.a",
            created_at=t + timedelta(milliseconds=5),
        )
        await tx.insert_message(echo)

    def sent(m: Message, mid: str) -> tuple[Message, DeliveryAttempt]:
        m.status, m.external_id, m.sent_at, m.attempts = MessageStatus.SENT, mid, t, 1
        return m, DeliveryAttempt(1, t, t)

    failure = DeliveryError("CHANNEL_TRANSIENT", "try again", channel_code=2, retryable=True)
    c.status, c.error, c.attempts = MessageStatus.RETRYING, failure, 1
    c.next_attempt_at = t + timedelta(seconds=5)
    async with store.transaction() as tx:
        recorded, waiting = await tx.record_outbound_and_peek(
            [sent(a, "mid.a"), (c, DeliveryAttempt(1, t, t, failure))], lease_until=None
        )
        gone = await tx.get_message(echo.id)
        got_a, got_c = await tx.get_message(a.id), await tx.get_message(c.id)
        tries_a, tries_c = await tx.list_attempts(a.id), await tx.list_attempts(c.id)
    assert waiting  # a settled and b still waits behind it
    assert [m.id for m in recorded] == [a.id, c.id]
    assert gone is None
    assert got_a is not None
    assert got_a.status is MessageStatus.SENT
    assert got_a.external_id == "mid.a"
    assert got_a.confirmed_at == recorded[0].confirmed_at == echo.created_at
    assert got_c is not None
    assert got_c.status is MessageStatus.RETRYING
    assert got_c.error == failure
    assert got_c.confirmed_at is None
    assert [x.number for x in tries_a] == [1]
    assert [(x.number, x.error) for x in tries_c] == [(1, failure)]

    async with store.transaction() as tx:
        _, waiting = await tx.record_outbound_and_peek([sent(b, "mid.b")], lease_until=None)
    assert not waiting  # b was the last of its conversation


async def test_a_deferred_outcome_is_seen_by_the_lookups_sent_after_it(store: AnyStore) -> None:
    """The outcomes of a send-path batch go out unanswered and come back with its lookups
    (one round trip on PostgreSQL): the lookups still run after them and see their effect."""
    conn = connection()
    t = now()
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        customer = await tx.upsert_participant(participant(conn))
        conv = await tx.upsert_conversation(conversation(conn, customer))
        a = outbound(conv, due=t, attempts=0, error=None, created_at=t)
        await tx.enqueue_outbound_in_order([a], t + timedelta(seconds=60), behind=[])
    async with store.transaction() as tx:
        before = await tx.find_send_batch([conv.id], [conn.id], [])
    assert before.targets[conv.id].pending_at == a.created_at

    a.status, a.external_id, a.sent_at, a.attempts = MessageStatus.SENT, "mid.a", t, 1
    # Pipelined, as the send path's commits are: only there do the outcomes go out unanswered.
    async with store.transaction(pipelined=True) as tx:
        recorded = await tx.record_outbound_deferred(
            [(a, DeliveryAttempt(1, t, t))], lease_until=None
        )
        batch = await tx.find_send_batch(
            [conv.id], [conn.id], [(conn.id, customer.channel_user_id)]
        )
        stored, waiting = await recorded()
    assert [m.id for m in stored] == [a.id]
    assert not waiting
    assert batch.targets[conv.id].pending_at is None
    assert batch.recipients[(conn.id, customer.channel_user_id)].conversation.id == conv.id
    assert batch.connections[conn.id].id == conn.id
    async with store.transaction() as tx:
        got = await tx.get_message(a.id)
    assert got is not None
    assert got.status is MessageStatus.SENT


async def test_an_outcome_that_fails_with_the_commit_leaves_nothing_behind(
    store: AnyStore,
) -> None:
    """A statement sent unanswered travels with the COMMIT (PostgreSQL's pipeline): when it
    fails there, the transaction raises the statement's error and commits nothing."""
    conn = connection()
    t = now()
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        conv = await stored_conversation(tx, conn)
        a, b = (outbound(conv, due=t, attempts=0, error=None) for _ in range(2))
        await tx.enqueue_outbound_in_order([a, b], t + timedelta(seconds=60), behind=[])
    a.status, a.external_id, a.sent_at, a.attempts = MessageStatus.SENT, "mid.1", t, 1
    async with store.transaction() as tx:
        await tx.record_outbound_and_peek([(a, DeliveryAttempt(1, t, t))], lease_until=None)
    # b claims a's channel id: not an echo (a was sent), so the unique index refuses it.
    b.status, b.external_id, b.sent_at, b.attempts = MessageStatus.SENT, "mid.1", t, 1
    bystander = connection()

    async def record_unanswered() -> None:
        async with store.transaction(pipelined=True) as tx:
            await tx.save_connection(bystander)
            await tx.record_outbound_deferred([(b, DeliveryAttempt(1, t, t))], lease_until=None)

    with pytest.raises(AlreadyExists):
        await record_unanswered()
    async with store.transaction() as tx:
        assert await tx.get_connection(bystander.id) is None
        kept = await tx.get_message(b.id)
        assert await tx.list_attempts(b.id) == []
    assert kept is not None
    assert kept.status is MessageStatus.QUEUED
    assert kept.external_id == ""


@pytest.mark.parametrize("deferred", [False, True], ids=["record", "deferred"])
async def test_a_late_outcome_never_overwrites_a_message_another_attempt_settled(
    store: AnyStore, deferred: bool
) -> None:
    """Attempt A's lease lapsed while it ran (its process stalled); worker B took the
    message over, sent it and recorded SENT. A's outcome, a transient failure, comes last:
    recorded, it would have the message RETRYING and sent a third time. It is dropped,
    and A is answered with the message as stored. Both attempts are number 1 (neither
    knew of the other): the one recorded is B's."""
    conn = connection()
    t = now()
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        conv = await tx.upsert_conversation(
            conversation(conn, await tx.upsert_participant(participant(conn)))
        )
        m = outbound(conv, due=t, attempts=0, error=None, created_at=t)
        await tx.enqueue_outbound_in_order([m], t + timedelta(seconds=60), behind=[])
        ours = await tx.get_message(m.id)
    assert ours is not None
    other = replace(ours)
    other.status, other.external_id, other.sent_at, other.attempts = (
        MessageStatus.SENT, "mid.b", t, 1,
    )  # fmt: skip
    async with store.transaction() as tx:
        await tx.record_outbound_and_peek([(other, DeliveryAttempt(1, t, t))], lease_until=None)
    failure = DeliveryError("CHANNEL_TRANSIENT", "timed out", channel_code=2, retryable=True)
    ours.status, ours.error, ours.attempts = MessageStatus.RETRYING, failure, 1
    ours.next_attempt_at = t + timedelta(seconds=5)
    late = (ours, DeliveryAttempt(1, t, t + timedelta(seconds=1), failure))
    async with store.transaction() as tx:
        if deferred:
            read = await tx.record_outbound_deferred([late], lease_until=None)
            (answered,), waiting = await read()
        else:
            (answered,), waiting = await tx.record_outbound_and_peek([late], lease_until=None)
        stored = await tx.get_message(m.id)
        tries = await tx.list_attempts(m.id)
    assert stored is not None
    assert stored.status is MessageStatus.SENT
    assert stored.external_id == "mid.b"
    assert answered is not ours
    assert (answered.status, answered.external_id) == (MessageStatus.SENT, "mid.b")
    assert not waiting
    assert [(x.number, x.error) for x in tries] == [(1, None)]
