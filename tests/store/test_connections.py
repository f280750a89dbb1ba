from __future__ import annotations

import dataclasses
from datetime import UTC, timedelta

import pytest

from gateway.domain.errors import AlreadyExists, InvalidArgument
from gateway.domain.models import Connection, ConnectionStatus, Credential
from tests.store.conftest import AnyStore
from tests.store.factories import connection, now


async def save(store: AnyStore, *conns: Connection) -> None:
    async with store.transaction() as tx:
        for conn in conns:
            await tx.save_connection(conn)


async def test_connection_round_trips_every_field(store: AnyStore) -> None:
    conn = connection(page_id="page-1")
    await save(store, conn)
    async with store.transaction() as tx:
        found = await tx.get_connection(conn.id)
        assert await tx.get_connection("conn_missing") is None
    assert found == conn
    assert found.updated_at is not None
    assert found.updated_at.tzinfo == UTC


async def test_saving_again_updates_the_connection_and_keeps_created_at(store: AnyStore) -> None:
    conn = connection()
    await save(store, conn)
    created_at = conn.created_at
    changed = dataclasses.replace(
        conn, status=ConnectionStatus.NEEDS_REAUTH, last_error="code 190", created_at=None
    )
    await save(store, changed)
    async with store.transaction() as tx:
        found = await tx.get_connection(conn.id)
    assert found is not None
    assert found.status is ConnectionStatus.NEEDS_REAUTH
    assert found.last_error == "code 190"
    assert found.created_at == created_at == changed.created_at


async def test_an_account_connected_by_one_tenant_cannot_be_connected_by_another(
    store: AnyStore,
) -> None:
    first = connection("t1", external_id="ig-1")
    await save(store, first)
    with pytest.raises(AlreadyExists):
        await save(store, connection("t2", external_id="ig-1"))
    # The same account on another channel is another account.
    await save(store, connection("t2", external_id="ig-1", channel="messenger"))


async def test_a_disconnected_account_can_be_connected_again(store: AnyStore) -> None:
    first = connection("t1", external_id="ig-1")
    await save(store, first)
    first.status = ConnectionStatus.DISCONNECTED
    await save(store, first)
    second = connection("t2", external_id="ig-1")
    await save(store, second)
    async with store.transaction() as tx:
        found = await tx.find_connection_by_account("instagram", "ig-1")
    assert found is not None
    assert found.id == second.id


# Both kinds of transaction: each statement waiting for its answer, or pipelined.
both_kinds = pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])


@both_kinds
async def test_a_conflict_leaves_the_transaction_usable(store: AnyStore, pipelined: bool) -> None:
    await save(store, connection("t1", external_id="ig-1"))
    other = connection("t3")
    async with store.transaction(pipelined=pipelined) as tx:
        with pytest.raises(AlreadyExists):
            await tx.save_connection(connection("t2", external_id="ig-1"))
        await tx.save_connection(other)
    async with store.transaction() as tx:
        assert await tx.get_connection(other.id) == other


@both_kinds
async def test_transaction_that_raises_is_rolled_back(store: AnyStore, pipelined: bool) -> None:
    conn = connection()

    async def save_then_fail() -> None:
        async with store.transaction(pipelined=pipelined) as tx:
            await tx.save_connection(conn)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await save_then_fail()
    async with store.transaction() as tx:
        assert await tx.get_connection(conn.id) is None


async def test_webhook_routing_finds_live_connections_by_account_or_page_id(
    store: AnyStore,
) -> None:
    by_account = connection(external_id="ig-1")
    by_page = connection(external_id="ig-2", page_id="page-2")
    gone = connection(external_id="ig-3", status=ConnectionStatus.DISCONNECTED)
    await save(store, by_account, by_page, gone)
    async with store.transaction() as tx:
        found = await tx.find_connections_by_account_ids(
            "instagram", ["ig-1", "page-2", "ig-3", "unknown"]
        )
        assert await tx.find_connections_by_account_ids("instagram", []) == []
        assert await tx.find_connections_by_account_ids("messenger", ["ig-1"]) == []
        assert await tx.find_connection_by_account("instagram", "ig-3") is None
    assert {c.id for c in found} == {by_account.id, by_page.id}


async def test_listing_connections_pages_newest_first_with_filters(store: AnyStore) -> None:
    base = now()
    conns = [
        connection(
            "t1",
            created_at=base + timedelta(seconds=i // 2),  # pairs share a time: id breaks ties
            status=ConnectionStatus.DISCONNECTED if i % 3 == 0 else ConnectionStatus.CONNECTED,
        )
        for i in range(11)
    ]
    await save(store, *conns, connection("t2"), connection("t1", channel="messenger"))
    wanted = [c for c in conns if c.status is ConnectionStatus.CONNECTED]
    wanted.sort(key=lambda c: (c.created_at, c.id), reverse=True)

    seen: list[Connection] = []
    token = ""
    pages = 0
    while True:
        async with store.transaction() as tx:
            page = await tx.list_connections(
                "t1",
                page_size=3,
                page_token=token,
                channel="instagram",
                statuses=[ConnectionStatus.CONNECTED, ConnectionStatus.NEEDS_REAUTH],
            )
        seen.extend(page.items)
        pages += 1
        token = page.next_token
        if not token:
            break
    assert [c.id for c in seen] == [c.id for c in wanted]
    assert pages == 3  # 7 items: 3 + 3 + 1

    async with store.transaction() as tx:
        everything = await tx.list_connections("t1", page_size=100)
    assert len(everything.items) == 12
    assert everything.next_token == ""


@pytest.mark.parametrize("token", ["not base64 !", "eyJ4Ijox", "WyJtZXNzYWdlcyIsIngiLCJ5Il0"])
async def test_malformed_page_token_is_an_invalid_argument(store: AnyStore, token: str) -> None:
    async with store.transaction() as tx:
        with pytest.raises(InvalidArgument) as caught:
            await tx.list_connections("t1", page_size=10, page_token=token)
    assert caught.value.field == "page_token"


async def test_connections_are_counted_by_channel_and_status(store: AnyStore) -> None:
    await save(
        store,
        connection(),
        connection(),
        connection(status=ConnectionStatus.NEEDS_REAUTH),
        connection(channel="messenger"),
    )
    async with store.transaction() as tx:
        counts = await tx.count_connections_by_status()
    assert counts == {
        ("instagram", ConnectionStatus.CONNECTED): 2,
        ("instagram", ConnectionStatus.NEEDS_REAUTH): 1,
        ("messenger", ConnectionStatus.CONNECTED): 1,
    }


async def test_credentials_are_stored_replaced_listed_and_deleted(store: AnyStore) -> None:
    conns = sorted((connection() for _ in range(3)), key=lambda c: c.id)
    await save(store, *conns)
    t = now()
    creds = [Credential(c.id, "k1", b"\x00secret\xff" + c.id.encode(), t) for c in conns]
    async with store.transaction() as tx:
        for cred in creds:
            await tx.put_credential(cred)
        rotated = Credential(conns[0].id, "k2", b"new", t)
        await tx.put_credential(rotated)
    async with store.transaction() as tx:
        assert await tx.get_credential(conns[0].id) == rotated
        assert await tx.list_credentials(after_connection_id="", limit=2) == [rotated, creds[1]]
        assert await tx.list_credentials(after_connection_id=conns[1].id, limit=2) == [creds[2]]
        assert await tx.delete_credential(conns[1].id) is True
        assert await tx.delete_credential(conns[1].id) is False
        assert await tx.get_credential(conns[1].id) is None
