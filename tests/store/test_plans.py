"""PostgreSQL keeps a prepared statement's generic plan until the table's statistics change.
Made while the tables were nearly empty (a new install), that plan scans them whole; without
autovacuum's ANALYZE (off on some servers, or not run yet) it would go on scanning them
however large they grow, one scan per send. The send path's statements on growing tables
must find their rows through the indexes whatever plans were made before."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import psycopg
import pytest

from gateway.domain.ids import new_id
from gateway.domain.models import Conversation, MessageStatus
from gateway.store import PostgresStore
from tests.store.factories import conversation, message, now, outbound, participant
from tests.store.test_outbound import seeded

pytestmark = pytest.mark.parametrize(
    "backend", [pytest.param("postgres", marks=pytest.mark.postgres)]
)

# Enough calls for psycopg to prepare a statement (its 5th) and for PostgreSQL to settle on
# its generic plan (after 5 custom ones).
ROUNDS = 15
# Rows added afterwards, customers and messages: plenty for an index to beat a scan.
GROWN = 1000


@pytest.fixture
async def single(blank_database: str) -> AsyncIterator[PostgresStore]:
    """A store on a database of its own and one connection, so that every call runs on the
    one session whose prepared statements are under test."""
    async with PostgresStore(blank_database, min_size=1, max_size=1) as store:
        await store.migrate()
        yield store


async def send_one(store: PostgresStore, conv: Conversation) -> None:
    """One message as the send path handles it: looked up, enqueued, recorded as SENT."""
    t = now()
    queued = outbound(conv, due=t, attempts=0, error=None)
    async with store.transaction() as tx:
        await tx.find_send_targets_for_recipients([(conv.connection_id, "5551")])
        await tx.find_messages_by_idempotency_keys([(conv.tenant_id, queued.idempotency_key)])
        await tx.enqueue_outbound(queued, t + timedelta(seconds=30))
    queued.status = MessageStatus.SENT
    queued.external_id = new_id("mid")
    queued.sent_at = now()
    queued.attempts = 1
    async with store.transaction() as tx:
        await tx.record_outbound_and_peek([(queued, None)], lease_until=None)


async def scans(database: str) -> dict[str, int]:
    """Sequential scans per table so far, as the statistics collector has them."""
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        cur = await conn.execute(
            "SELECT relname, seq_scan FROM pg_stat_user_tables"
            " WHERE relname IN ('messages', 'participants', 'conversations')"
        )
        return {name: int(count) for name, count in await cur.fetchall()}


async def flush_stats(store: PostgresStore) -> None:
    """The store's session reports its counts now rather than within the next second."""
    async with store.transaction() as tx:
        await tx._ex.fetch("SELECT pg_stat_force_next_flush()")  # type: ignore[attr-defined]


async def test_sends_use_the_indexes_after_the_tables_grew(
    single: PostgresStore, blank_database: str
) -> None:
    conn, conv = await seeded(single)
    for _ in range(ROUNDS):
        await send_one(single, conv)
    async with single.transaction() as tx:
        for _ in range(GROWN):
            await tx.insert_message(message(conv))
            part = await tx.upsert_participant(participant(conn))
            await tx.upsert_conversation(conversation(conn, part))
    await flush_stats(single)
    before = await scans(blank_database)
    # The counts are seen: the first sends, on tiny tables, were planned as scans.
    assert before["messages"] > 0

    await send_one(single, conv)
    await flush_stats(single)
    after = await scans(blank_database)

    assert after == before
