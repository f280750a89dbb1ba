"""An attempt whose lease lapsed while it ran (its process stalled) records its outcome
after another worker took the message over and settled it: the store keeps the settled
message, and the late attempt announces nothing (no DeliveryUpdate contradicting the
one the message settled with)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from gateway.domain.events import EventKind
from gateway.domain.models import DeliveryError, MessageStatus
from gateway.domain.outbound import DeliveryAttempt
from tests.outbound.conftest import channelless_deliverer
from tests.store.conftest import AnyStore
from tests.store.factories import connection, now, outbound, stored_conversation


async def test_a_late_outcome_is_answered_as_stored_and_announces_nothing(
    store: AnyStore,
) -> None:
    conn = connection()
    t = now()
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        conv = await stored_conversation(tx, conn)
        ours, _ = await tx.enqueue_outbound(
            outbound(conv, due=t, attempts=0, error=None), t + timedelta(seconds=60)
        )
    # The worker that took it over sent it and recorded SENT.
    taken = replace(ours, status=MessageStatus.SENT, external_id="mid.b", sent_at=t, attempts=1)
    async with store.transaction() as tx:
        await tx.record_outbound_and_peek([(taken, DeliveryAttempt(1, t, t))], lease_until=None)
    deliverer = channelless_deliverer(store)
    failure = DeliveryError("CHANNEL_TRANSIENT", "timed out", channel_code=2, retryable=True)
    ours.status, ours.error, ours.attempts = MessageStatus.RETRYING, failure, 1
    ours.next_attempt_at = t + timedelta(seconds=5)
    try:
        answered = await deliverer._record(ours, DeliveryAttempt(1, t, now(), failure))
    finally:
        await deliverer.aclose()
    assert (answered.status, answered.external_id) == (MessageStatus.SENT, "mid.b")
    async with store.transaction() as tx:
        stored = await tx.get_message(ours.id)
    assert stored is not None
    assert stored.status is MessageStatus.SENT
    later = now() + timedelta(minutes=1)
    announced = await store.claim_outbox(now=later, lease_until=later, limit=1000)
    # (Other tests' events may share this database's outbox.)
    ours_announced = [
        e.event
        for e in announced
        if e.event.kind is EventKind.DELIVERY_UPDATE and e.event.payload["message_id"] == ours.id
    ]
    assert ours_announced == []
