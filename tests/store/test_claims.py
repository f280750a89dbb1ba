"""Claiming: concurrent workers (on one store and on several, as several replicas
would be) never get the same row twice, and a lapsed lease frees a row again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import TypeVar

from gateway.domain.models import ConnectionStatus, Conversation, Direction, MessageStatus
from tests.store.conftest import AnyStore
from tests.store.factories import (
    connection,
    event,
    message,
    now,
    outbound,
    stored_conversation,
)

T = TypeVar("T")
WORKERS = 8


async def claim_all(
    stores: Sequence[AnyStore], claim: Callable[[AnyStore], Awaitable[list[T]]]
) -> list[list[T]]:
    """Runs WORKERS loops, spread over the stores, until every one gets nothing."""

    async def worker(store: AnyStore) -> list[T]:
        mine: list[T] = []
        while batch := await claim(store):
            mine.extend(batch)
            await asyncio.sleep(0)
        return mine

    return await asyncio.gather(*(worker(stores[i % len(stores)]) for i in range(WORKERS)))


async def stores_for(
    store: AnyStore, store_factory: Callable[[], Awaitable[AnyStore]]
) -> list[AnyStore]:
    return [store, await store_factory(), await store_factory()]


async def test_concurrent_workers_claim_each_due_message_exactly_once(
    store: AnyStore, store_factory: Callable[[], Awaitable[AnyStore]]
) -> None:
    t = now()
    conn = connection()
    async with store.transaction() as tx:
        await tx.save_connection(conn)

        async def fresh() -> Conversation:
            # One conversation per message: within one, only the oldest pending is claimable.
            return await stored_conversation(tx, conn)

        due = [outbound(await fresh(), due=t - timedelta(seconds=i % 7)) for i in range(200)]
        for msg in due:
            await tx.insert_message(msg)
        # None of these is due for sending.
        await tx.insert_message(outbound(await fresh(), due=t + timedelta(minutes=5)))
        await tx.insert_message(outbound(await fresh(), due=t, status=MessageStatus.SENT))
        await tx.insert_message(outbound(await fresh(), due=None))  # type: ignore[arg-type]
        await tx.insert_message(message(await fresh(), next_attempt_at=t))
        retrying = outbound(await fresh(), due=t, status=MessageStatus.RETRYING)
        await tx.insert_message(retrying)

    async def claim(s: AnyStore) -> list[str]:
        async with s.transaction() as tx:
            batch = await tx.claim_next_messages(
                now=t, lease_until=t + timedelta(minutes=1), limit=7
            )
        assert all(m.direction is Direction.OUTBOUND for m in batch)
        return [m.id for m in batch]

    claimed = await claim_all(await stores_for(store, store_factory), claim)
    flat = [mid for per_worker in claimed for mid in per_worker]
    assert len(flat) == len(set(flat)) == 201
    assert set(flat) == {m.id for m in due} | {retrying.id}


async def test_a_lapsed_message_lease_lets_another_worker_claim_it(store: AnyStore) -> None:
    t = now()
    conn = connection()
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        conv = await stored_conversation(tx, conn)
        msg = outbound(conv, due=t)
        await tx.insert_message(msg)
    lease = t + timedelta(seconds=30)
    async with store.transaction() as tx:
        first = await tx.claim_next_messages(now=t, lease_until=lease, limit=10)
        assert [m.id for m in first] == [msg.id]
        assert first[0] == msg
    async with store.transaction() as tx:
        assert await tx.claim_next_messages(now=t, lease_until=lease, limit=10) == []
        # update_message keeps the lease of the worker that holds the message.
        await tx.update_message(msg)
        assert (
            await tx.claim_next_messages(
                now=lease - timedelta(seconds=1), lease_until=lease, limit=10
            )
            == []
        )
        again = await tx.claim_next_messages(
            now=lease, lease_until=lease + timedelta(seconds=30), limit=10
        )
    assert [m.id for m in again] == [msg.id]


async def test_concurrent_workers_claim_each_connection_due_for_refresh_exactly_once(
    store: AnyStore, store_factory: Callable[[], Awaitable[AnyStore]]
) -> None:
    t = now()
    due = [connection(token_expires_at=t + timedelta(hours=i % 5)) for i in range(60)]
    async with store.transaction() as tx:
        for conn in due:
            await tx.save_connection(conn)
        await tx.save_connection(connection(token_expires_at=t + timedelta(days=30)))
        await tx.save_connection(
            connection(token_expires_at=t, status=ConnectionStatus.NEEDS_REAUTH)
        )

    async def claim(s: AnyStore) -> list[str]:
        async with s.transaction() as tx:
            batch = await tx.claim_connections_due(
                due_before=t + timedelta(days=1),
                now=t,
                lease_until=t + timedelta(minutes=5),
                limit=4,
            )
        expiries: list[datetime] = [c.token_expires_at for c in batch]  # type: ignore[misc]
        assert expiries == sorted(expiries)
        return [c.id for c in batch]

    claimed = await claim_all(await stores_for(store, store_factory), claim)
    flat = [cid for per_worker in claimed for cid in per_worker]
    assert len(flat) == len(set(flat)) == 60
    assert set(flat) == {c.id for c in due}

    async with store.transaction() as tx:
        later = t + timedelta(minutes=5)
        again = await tx.claim_connections_due(
            due_before=t + timedelta(days=1), now=later, lease_until=later, limit=100
        )
    assert {c.id for c in again} == set(flat)


async def test_concurrent_relays_claim_each_outbox_entry_exactly_once(
    store: AnyStore, store_factory: Callable[[], Awaitable[AnyStore]]
) -> None:
    conn = connection()
    events = [event(conn, f"cnv_{i % 9}", n=i) for i in range(200)]
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        await tx.add_events(events[:150])
    async with store.transaction() as tx:
        await tx.add_events(events[150:])
    t = now()

    async def claim(s: AnyStore) -> list[tuple[int, str]]:
        batch = await s.claim_outbox(now=t, lease_until=t + timedelta(minutes=1), limit=9)
        seqs = [e.seq for e in batch]
        assert seqs == sorted(seqs)
        assert all(e.attempts == 1 for e in batch)
        await s.mark_published(seqs, t)
        return [(e.seq, e.event.event_id) for e in batch]

    claimed = await claim_all(await stores_for(store, store_factory), claim)
    flat = [entry for per_worker in claimed for entry in per_worker]
    assert len(flat) == len({seq for seq, _ in flat}) == 200
    # seq follows commit order.
    assert [eid for _, eid in sorted(flat)] == [e.event_id for e in events]
