from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from gateway.domain.events import EventKind
from gateway.domain.models import Connection
from gateway.domain.store import OutboxEntry
from tests.store.conftest import AnyStore
from tests.store.factories import connection, event, now


async def with_connection(store: AnyStore) -> Connection:
    conn = connection()
    async with store.transaction() as tx:
        await tx.save_connection(conn)
    return conn


async def claimed(store: AnyStore, count: int) -> list[int]:
    """The seqs of ``count`` new entries, claimed (their lease lapses at once)."""
    conn = await with_connection(store)
    async with store.transaction() as tx:
        await tx.add_events([event(conn) for _ in range(count)])
    t = now()
    return [e.seq for e in await store.claim_outbox(now=t, lease_until=t, limit=count)]


async def test_events_added_in_a_transaction_reach_the_outbox_whole(store: AnyStore) -> None:
    conn = await with_connection(store)
    events = [event(conn, "cnv_1", text="héllo"), event(conn)]
    async with store.transaction() as tx:
        await tx.add_events(events)
        await tx.add_events([events[0]])  # the same event again is not a second entry
        await tx.add_events([])
    t = now()
    claimed = await store.claim_outbox(now=t, lease_until=t + timedelta(seconds=30), limit=10)
    assert [e.event for e in claimed] == events
    assert [e.attempts for e in claimed] == [1, 1]


async def test_events_of_a_rolled_back_transaction_never_reach_the_outbox(
    store: AnyStore,
) -> None:
    conn = await with_connection(store)
    try:
        async with store.transaction() as tx:
            await tx.add_events([event(conn)])
            raise LookupError
    except LookupError:
        pass
    t = now()
    assert await store.claim_outbox(now=t, lease_until=t, limit=10) == []


async def test_an_unpublished_entry_is_claimed_again_after_its_lease_with_one_more_attempt(
    store: AnyStore,
) -> None:
    conn = await with_connection(store)
    async with store.transaction() as tx:
        await tx.add_events([event(conn)])
    t = now()
    lease = t + timedelta(seconds=30)
    first = await store.claim_outbox(now=t, lease_until=lease, limit=10)
    assert await store.claim_outbox(now=t, lease_until=lease, limit=10) == []
    again = await store.claim_outbox(now=lease, lease_until=lease + timedelta(seconds=30), limit=10)
    assert [e.seq for e in again] == [e.seq for e in first]
    assert again[0].attempts == 2
    await store.mark_published([again[0].seq], lease)
    later = lease + timedelta(minutes=5)
    assert await store.claim_outbox(now=later, lease_until=later, limit=10) == []


async def test_deleting_published_entries_removes_those_and_no_other(store: AnyStore) -> None:
    seqs = await claimed(store, 4)
    t = now()
    await store.mark_published(seqs[:1], t)
    await store.delete_published([seqs[1], seqs[2], seqs[2]])
    await store.delete_published([])

    # The one marked published is kept; the deleted ones are gone, published or not.
    loaded = (await store.bus_load(since=t - timedelta(minutes=1))).entries
    assert [e.seq for e in loaded] == [seqs[0]]
    waiting = await store.claim_outbox(now=t, lease_until=t, limit=10)
    assert [e.seq for e in waiting] == [seqs[3]]


async def test_purging_removes_published_entries_older_than_retention_with_acks_and_attempts(
    store: AnyStore,
) -> None:
    seqs = await claimed(store, 4)
    t = now()
    await store.mark_published(seqs[:2], t - timedelta(days=2))
    await store.mark_published(seqs[2:3], t)
    await store.bus_add_group("ai", t)
    await store.bus_ack("ai", seqs[:1])
    await store.bus_record_attempts("ai", {seqs[1]: 2, seqs[2]: 1})

    assert await store.purge_published(t - timedelta(days=1)) == 2
    state = await store.bus_load(since=t - timedelta(days=30))
    assert [e.seq for e in state.entries] == [seqs[2]]
    assert state.acked == {"ai": set()}
    assert state.attempts == {"ai": {seqs[2]: 1}}
    assert await rows_of(store, "bus_attempts") == 1
    # The unpublished entry is still waiting for the relay.
    waiting = await store.claim_outbox(now=t, lease_until=t, limit=10)
    assert [e.seq for e in waiting] == [seqs[3]]


async def test_purging_also_removes_acks_that_came_after_their_entry_was_purged(
    store: AnyStore,
) -> None:
    seqs = await claimed(store, 2)
    t = now()
    await store.mark_published(seqs, t - timedelta(days=2))
    await store.bus_add_group("ai", t)
    await store.bus_ack("ai", seqs[:1])
    assert await store.purge_published(t - timedelta(days=1)) == 2
    await store.bus_ack("ai", seqs)  # late: their entries are gone
    await store.bus_record_attempts("ai", {seqs[1]: 1})
    assert await rows_of(store, "bus_acks") == 2
    assert await store.purge_published(t - timedelta(days=1)) == 0
    assert await rows_of(store, "bus_acks") == 0
    assert await rows_of(store, "bus_attempts") == 0


async def rows_of(store: AnyStore, table: str) -> int:
    async with store._session() as ex:
        (row,) = await ex.fetch(f"SELECT COUNT(*) AS n FROM {table}")  # noqa: S608 - ours
    return int(row["n"])


async def test_bus_state_reloads_published_entries_and_each_groups_acks_and_attempts(
    store: AnyStore,
) -> None:
    conn = await with_connection(store)
    events = [event(conn, f"cnv_{i}") for i in range(5)]
    async with store.transaction() as tx:
        await tx.add_events(events)
    t = now()
    entries = await store.claim_outbox(now=t, lease_until=t, limit=10)
    seqs = [e.seq for e in entries]
    await store.mark_published(seqs[:1], t - timedelta(hours=2))
    await store.mark_published(seqs[1:4], t)
    await store.mark_published(
        seqs[1:2], t + timedelta(hours=1)
    )  # publishing twice changes nothing

    await store.bus_add_group("ai", t)
    await store.bus_add_group("ai", t)
    await store.bus_add_group("audit", t)
    await store.bus_ack("ai", [seqs[1], seqs[2], seqs[2]])
    await store.bus_ack("ai", [seqs[1]])
    await store.bus_ack("late", [seqs[3]])
    await store.bus_ack("ai", [])

    # A count lower than the one written changes nothing (a late write of an older one).
    await store.bus_record_attempts("audit", {seqs[3]: 1, seqs[0]: 4})
    await store.bus_record_attempts("audit", {seqs[3]: 3})
    await store.bus_record_attempts("audit", {seqs[3]: 2})
    await store.bus_record_attempts("ai", {})

    state = await store.bus_load(since=t - timedelta(minutes=1))
    # Each with the time it was first published: the bus's retention runs from there.
    assert state.entries == [
        OutboxEntry(seq=s, event=events[i + 1], attempts=1, published_at=t)
        for i, s in enumerate(seqs[1:4])
    ]
    assert state.acked == {"ai": {seqs[1], seqs[2]}, "audit": set(), "late": {seqs[3]}}
    # Only the entries in the window (seqs[0] was published before it).
    assert state.attempts == {"audit": {seqs[3]: 3}}


async def test_claimed_events_sent_deferred_are_answered_after_the_commit(
    store: AnyStore,
) -> None:
    """The insert goes out with the COMMIT (on PostgreSQL, in a pipelined transaction) and
    its entries, read once the transaction ended, are the rows it added, in order."""
    conn = await with_connection(store)
    for pipelined in (True, False):
        plain, first, second = (event(conn, "cnv_1", text=t) for t in ("a", "b", "c"))
        lease = now() + timedelta(seconds=30)
        async with store.transaction(pipelined=pipelined) as tx:
            await tx.add_events([plain])
            read = await tx.add_claimed_events_deferred([plain, first, second, first], lease)
            nothing = await tx.add_claimed_events_deferred([], lease)
        added = await read()
        assert [e.event for e in added] == [first, second]  # plain was there already
        assert [e.attempts for e in added] == [1, 1]
        assert added[0].seq < added[1].seq
        assert await nothing() == []
        # Claimed for this process's relay until the lease; the plain one is anyone's.
        t = now()
        claimed = await store.claim_outbox(now=t, lease_until=t, limit=10)
        assert [e.event for e in claimed] == [plain]
        await store.mark_published([claimed[0].seq], t)
        lapsed = await store.claim_outbox(now=lease, lease_until=lease, limit=10)
        assert [e.seq for e in lapsed] == [e.seq for e in added]
        await store.mark_published([e.seq for e in lapsed], lease)


async def test_a_deferred_insert_rolls_back_with_its_transaction(store: AnyStore) -> None:
    conn = await with_connection(store)
    lease = now() + timedelta(seconds=30)
    try:
        async with store.transaction(pipelined=True) as tx:
            await tx.add_claimed_events_deferred([event(conn)], lease)
            raise LookupError
    except LookupError:
        pass
    # Nothing was committed, and the connection went back to the pool usable.
    kept = event(conn)
    async with store.transaction(pipelined=True) as tx:
        await tx.add_events([kept])
    claimed = await store.claim_outbox(now=lease, lease_until=lease, limit=10)
    assert [e.event for e in claimed] == [kept]


async def _entries(store: AnyStore) -> dict[int, bool]:
    """seq -> whether published, of every entry left (bus_load reads the published)."""
    t = now()
    loaded = (await store.bus_load(since=t - timedelta(days=30))).entries
    waiting = await store.claim_outbox(now=t + timedelta(days=1), lease_until=t, limit=100)
    return {e.seq: True for e in loaded} | {e.seq: False for e in waiting}


async def test_held_entries_are_let_go_once_acked_and_published_again_after_a_loss(
    store: AnyStore,
) -> None:
    conn = await with_connection(store)
    message, reaction = event(conn), replace(event(conn), kind=EventKind.REACTION_CHANGED)
    other, late = event(conn), event(conn)
    async with store.transaction() as tx:
        await tx.add_events([message, reaction, other, late])
    t = now()
    seqs = [e.seq for e in await store.claim_outbox(now=t, lease_until=t, limit=10)]
    await store.hold_published(seqs[:3], t)
    await store.hold_published(seqs[3:], t + timedelta(seconds=5))
    # Held entries are published: no claim takes them.
    assert await store.claim_outbox(now=t, lease_until=t, limit=10) == []

    # Acked before t + 1 s: the message goes, the reaction stays (unheld), the later one waits.
    drop = {EventKind.MESSAGE_RECEIVED.value}
    assert await store.release_held(t + timedelta(seconds=1), drop) == 3
    assert await _entries(store) == {seqs[1]: True, seqs[3]: True}
    assert await store.release_held(t + timedelta(seconds=1), drop) == 0

    # The bus lost what it held: the held entry is claimable again, unpublished; the
    # released reaction is not published again.
    assert await store.reclaim_held(t) == 1
    again = await store.claim_outbox(now=t, lease_until=t, limit=10)
    assert [e.event.event_id for e in again] == [late.event_id]
    assert await store.reclaim_held(t) == 0
    assert await _entries(store) == {seqs[1]: True, seqs[3]: False}
