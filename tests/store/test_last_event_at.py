from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from gateway.domain.models import Connection
from tests.store.conftest import AnyStore
from tests.store.factories import connection, now


async def save(store: AnyStore, *conns: Connection) -> None:
    async with store.transaction() as tx:
        for conn in conns:
            await tx.save_connection(conn)


async def stored(store: AnyStore, conn: Connection) -> Connection:
    async with store.transaction() as tx:
        found = await tx.get_connection(conn.id)
    assert found is not None
    return found


async def advance(store: AnyStore, conn: Connection, at: datetime) -> None:
    async with store.transaction() as tx:
        await tx.advance_last_event_at({conn.id: at})


async def saved_then_advanced(store: AnyStore) -> tuple[Connection, datetime]:
    """A connection saved with no last_event_at, then advanced to now; both."""
    conn = connection()
    conn.last_event_at = None
    await save(store, conn)
    t = now()
    await advance(store, conn, t)
    return conn, t


async def test_last_event_at_moves_forward_only(store: AnyStore) -> None:
    conn, t = await saved_then_advanced(store)
    assert (await stored(store, conn)).last_event_at == t

    await advance(store, conn, t - timedelta(seconds=5))
    assert (await stored(store, conn)).last_event_at == t

    later = t + timedelta(milliseconds=1)
    await advance(store, conn, later)
    found = await stored(store, conn)
    assert found.last_event_at == later
    # Nothing else of the connection changes: it is activity, not configuration.
    assert dataclasses.replace(found, last_event_at=None) == dataclasses.replace(
        conn, last_event_at=None
    )


async def test_several_connections_in_one_call_and_unknown_ids_are_ignored(
    store: AnyStore,
) -> None:
    t = now()
    never, behind, ahead = connection(), connection(), connection()
    never.last_event_at = None
    behind.last_event_at = t - timedelta(hours=1)
    ahead.last_event_at = t + timedelta(hours=1)
    untouched = connection()
    await save(store, never, behind, ahead, untouched)

    async with store.transaction() as tx:
        await tx.advance_last_event_at({never.id: t, behind.id: t, ahead.id: t, "conn_missing": t})
        await tx.advance_last_event_at({})
        assert await tx.get_connection("conn_missing") is None

    assert (await stored(store, never)).last_event_at == t
    assert (await stored(store, behind)).last_event_at == t
    assert (await stored(store, ahead)).last_event_at == ahead.last_event_at
    assert (await stored(store, untouched)).last_event_at == untouched.last_event_at


async def test_saving_a_stale_copy_does_not_move_last_event_at_back(store: AnyStore) -> None:
    # A worker read the connection before the activity flush, and saves it after.
    conn, t = await saved_then_advanced(store)
    conn.last_error = "code 190"
    await save(store, conn)
    found = await stored(store, conn)
    assert found.last_error == "code 190"
    assert found.last_event_at == t
