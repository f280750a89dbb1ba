"""The store methods of the refresh worker: claim holds, scans of every tenant, and the
nearest expiry (contract: both backends)."""

from __future__ import annotations

from datetime import timedelta

from gateway.domain.models import ConnectionStatus
from tests.store.conftest import AnyStore
from tests.store.factories import connection, now


async def test_a_held_connection_is_not_claimed_until_its_hold_ends(store: AnyStore) -> None:
    due = connection(token_expires_at=now() + timedelta(days=1))
    async with store.transaction() as tx:
        await tx.save_connection(due)
        await tx.set_connection_claim(due.id, now() + timedelta(hours=1))
    args = {"due_before": now() + timedelta(days=30), "limit": 10}
    async with store.transaction() as tx:
        assert (
            await tx.claim_connections_due(
                now=now(), lease_until=now() + timedelta(minutes=5), **args
            )
            == []
        )
        later = now() + timedelta(hours=2)
        claimed = await tx.claim_connections_due(
            now=later, lease_until=later + timedelta(minutes=5), **args
        )
    assert [c.id for c in claimed] == [due.id]


async def test_releasing_a_claim_makes_the_connection_claimable_again(store: AnyStore) -> None:
    due = connection(token_expires_at=now() + timedelta(days=1))
    args = {"due_before": now() + timedelta(days=30), "limit": 10}
    async with store.transaction() as tx:
        await tx.save_connection(due)
        first = await tx.claim_connections_due(
            now=now(), lease_until=now() + timedelta(hours=1), **args
        )
        await tx.set_connection_claim(due.id, None)
        again = await tx.claim_connections_due(
            now=now(), lease_until=now() + timedelta(hours=1), **args
        )
    assert [c.id for c in first] == [c.id for c in again] == [due.id]


async def test_scan_pages_through_every_tenant_by_status(store: AnyStore) -> None:
    live = [connection(tenant) for tenant in ("t1", "t2", "t3")]
    gone = connection("t1", status=ConnectionStatus.DISCONNECTED)
    async with store.transaction() as tx:
        for conn in (*live, gone):
            await tx.save_connection(conn)
        first = await tx.scan_connections(
            statuses=(ConnectionStatus.CONNECTED,), after_id="", limit=2
        )
        rest = await tx.scan_connections(
            statuses=(ConnectionStatus.CONNECTED,), after_id=first[-1].id, limit=2
        )
        assert await tx.scan_connections(statuses=(), after_id="", limit=2) == []
    assert [c.id for c in first + rest] == sorted(c.id for c in live)


async def test_nearest_expiry_among_connected_tokens(store: AnyStore) -> None:
    soon, later = now() + timedelta(days=3), now() + timedelta(days=9)
    async with store.transaction() as tx:
        assert await tx.nearest_token_expiry() is None
        await tx.save_connection(connection(token_expires_at=later))
        await tx.save_connection(
            connection(token_expires_at=now(), status=ConnectionStatus.NEEDS_REAUTH)
        )
        await tx.save_connection(connection(token_expires_at=soon))
        nearest = await tx.nearest_token_expiry()
    assert nearest is not None
    assert abs(nearest - soon) < timedelta(milliseconds=1)
