"""The send path's writes that come together share one transaction: the outcomes of the
attempts that ended and the work of whoever shares the Deliverer's commits (SendMessage's
enqueues), outcomes first, with one outbox insert for the events of both."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Any

from gateway.domain.events import EventKind
from gateway.domain.models import DeliveryError, Message, MessageStatus
from gateway.domain.store import Tx
from gateway.services.delivery_events import delivery_update
from gateway.services.outbound_delivery import Written
from tests.outbound.conftest import channelless_deliverer
from tests.store.conftest import AnyStore
from tests.store.factories import connection, conversation, now, outbound, participant


class CountingStore:
    """The real store, counting the transactions it starts."""

    def __init__(self, store: AnyStore) -> None:
        self._store = store
        self.transactions = 0

    def transaction(self, *, pipelined: bool = False) -> AbstractAsyncContextManager[Tx]:
        self.transactions += 1
        return self._store.transaction(pipelined=pipelined)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def queued(store: AnyStore) -> Message:
    conn = connection()
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        part = await tx.upsert_participant(participant(conn))
        conv = await tx.upsert_conversation(conversation(conn, part))
        draft = outbound(conv, due=now(), attempts=0, error=None)
        message, _ = await tx.enqueue_outbound(draft, now() + timedelta(seconds=60))
    return message


async def test_outcomes_and_shared_work_that_come_together_commit_once(store: AnyStore) -> None:
    message = await queued(store)
    counting = CountingStore(store)
    deliverer = channelless_deliverer(counting)
    seen: list[MessageStatus] = []

    async def write(tx: Tx, jobs: Sequence[int]) -> Written[int]:
        # Outcomes are written first: the failure recorded with these is visible here.
        stored = await tx.get_message(message.id)
        assert stored is not None
        seen.append(stored.status)
        events = [delivery_update(stored, now(), confirmed=True)]
        return Written([2 * j for j in jobs], events, wake=False)

    submit = deliverer.share_commits(write)
    try:
        failed, doubled, tripled = await asyncio.gather(
            deliverer.record_failure(message, DeliveryError("GONE", "the connection is gone")),
            submit(1),
            submit(3),
        )
    finally:
        await deliverer.aclose()
    assert counting.transactions == 1
    assert (doubled, tripled) == (2, 6)
    assert failed.status is MessageStatus.FAILED
    assert seen == [MessageStatus.FAILED]
    entries = await store.claim_outbox(
        now=now(), lease_until=now() + timedelta(seconds=30), limit=10_000
    )
    updates = [
        e.event
        for e in entries
        if e.event.kind is EventKind.DELIVERY_UPDATE
        and e.event.payload.get("message_id") == message.id
    ]
    # The outcome's FAILED and the share's own event, added in that one transaction.
    expected = {delivery_update(failed, now(), confirmed=c).event_id for c in (False, True)}
    assert sorted(u.event_id for u in updates) == sorted(expected)
