"""Meta's echo of a message may be committed by a webhook while the message's outcome is
being recorded: too late for the outcome statement's snapshot, in time to hold the
external id it is about to write. The outcome must still be recorded (an unrecorded send
is sent again once its lease lapses), with the echo folded in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from gateway.domain.models import Direction, MessageStatus
from gateway.domain.outbound import DeliveryAttempt
from gateway.store import PostgresStore
from tests.outbound.conftest import channelless_deliverer
from tests.store.factories import (
    connection,
    message,
    now,
    outbound,
    stored_conversation,
)

pytestmark = pytest.mark.postgres


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    async with PostgresStore(postgres_url) as opened:
        await opened.migrate()
        yield opened


async def test_an_echo_committed_while_its_outcome_is_written_is_folded_in(
    store: PostgresStore, postgres_url: str
) -> None:
    conn = connection()
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        conv = await stored_conversation(tx, conn)
        queued, _ = await tx.enqueue_outbound(
            outbound(conv, due=now(), attempts=0, error=None), now() + timedelta(seconds=60)
        )
    deliverer = channelless_deliverer(store)
    echo = message(
        conv,
        direction=Direction.OUTBOUND,
        status=MessageStatus.SENT,
        external_id="mid.race",
        created_at=now(),
    )
    sent_at = now()
    queued.status, queued.external_id, queued.sent_at, queued.attempts = (
        MessageStatus.SENT,
        "mid.race",
        sent_at,
        1,
    )
    webhook = PostgresStore(postgres_url)
    await webhook.open()
    try:
        async with webhook.transaction() as tx:
            await tx.insert_message(echo)
            recording = asyncio.create_task(
                deliverer._record(queued, DeliveryAttempt(1, sent_at, sent_at))
            )
            await asyncio.sleep(0.5)
            # The outcome statement has begun and waits on the echo's external id.
            assert not recording.done()
        recorded = await asyncio.wait_for(recording, 10)
    finally:
        await webhook.aclose()
        await deliverer.aclose()
    assert recorded.status is MessageStatus.SENT
    async with store.transaction() as tx:
        got = await tx.get_message(queued.id)
        folded = await tx.get_message(echo.id)
    assert folded is None
    assert got is not None
    assert got.status is MessageStatus.SENT
    assert got.external_id == "mid.race"
    assert got.confirmed_at is not None
