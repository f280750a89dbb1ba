from __future__ import annotations

from datetime import UTC, timedelta

import pytest

from gateway.domain.errors import AlreadyExists
from gateway.domain.ids import new_id
from gateway.domain.models import ALL_TENANTS, ApiToken, OAuthState, Scope
from tests.store.conftest import AnyStore
from tests.store.factories import now


def token(name: str = "backend", tenants: tuple[str, ...] = ("t1", "t2")) -> ApiToken:
    return ApiToken(
        id=new_id("tok"),
        name=name,
        tenants=tenants,
        scopes=frozenset({Scope.SEND, Scope.READ}),
        created_at=now(),
    )


async def test_api_token_round_trips_and_is_found_by_hash(store: AnyStore) -> None:
    created = token()
    async with store.transaction() as tx:
        await tx.create_api_token(created, "hash-1")
    async with store.transaction() as tx:
        found = await tx.find_api_token("hash-1")
        assert await tx.find_api_token("hash-unknown") is None
    assert found == created
    assert found.created_at is not None
    assert found.created_at.tzinfo == UTC


async def test_api_token_with_a_used_hash_already_exists(store: AnyStore) -> None:
    async with store.transaction() as tx:
        await tx.create_api_token(token(), "hash-1")
    with pytest.raises(AlreadyExists):
        async with store.transaction() as tx:
            await tx.create_api_token(token(), "hash-1")


async def test_a_refused_write_leaves_its_transaction_usable(store: AnyStore) -> None:
    """The conflict is scoped to its statement: what the transaction did before and does
    after it still commits."""
    before, after = token("before"), token("after")
    async with store.transaction() as tx:
        await tx.create_api_token(before, "h1")
        with pytest.raises(AlreadyExists):
            await tx.create_api_token(token("twin"), "h1")
        await tx.create_api_token(after, "h2")
        assert await tx.revoke_api_token("after", now()) == 1
    async with store.transaction() as tx:
        listed = await tx.list_api_tokens()
    assert sorted(t.name for t in listed) == ["after", "before"]


async def test_revoked_api_token_is_no_longer_found_but_still_listed(store: AnyStore) -> None:
    first, second = token("ci", (ALL_TENANTS,)), token("other")
    t = now()
    async with store.transaction() as tx:
        await tx.create_api_token(first, "h1")
        await tx.create_api_token(second, "h2")
        assert await tx.revoke_api_token("ci", t) == 1
        assert await tx.revoke_api_token(second.id, t) == 1
        assert await tx.revoke_api_token(second.id, t) == 0
        assert await tx.revoke_api_token("nobody", t) == 0
    async with store.transaction() as tx:
        assert await tx.find_api_token("h1") is None
        listed = await tx.list_api_tokens()
    assert [tok.id for tok in listed] == [first.id, second.id]
    assert all(tok.revoked_at == t for tok in listed)
    assert listed[0].all_tenants


async def test_touching_an_api_token_records_its_last_use(store: AnyStore) -> None:
    created, t = token(), now()
    async with store.transaction() as tx:
        await tx.create_api_token(created, "h1")
        await tx.touch_api_token(created.id, t)
        found = await tx.find_api_token("h1")
    assert found is not None
    assert found.last_used_at == t


def state(expires_in: timedelta = timedelta(minutes=10)) -> OAuthState:
    t = now()
    return OAuthState(
        state_hash=new_id("st"),
        tenant_id="t1",
        channel="instagram",
        login_flow="facebook",
        return_url="https://app.example/done",
        expires_at=t + expires_in,
        created_at=t,
    )


async def test_oauth_state_can_be_taken_only_once(store: AnyStore) -> None:
    put = state()
    async with store.transaction() as tx:
        await tx.put_oauth_state(put)
    async with store.transaction() as tx:
        assert await tx.take_oauth_state(put.state_hash, now()) == put
    async with store.transaction() as tx:
        assert await tx.take_oauth_state(put.state_hash, now()) is None
        assert await tx.take_oauth_state("unknown", now()) is None


async def test_expired_oauth_state_is_not_returned_and_is_consumed(store: AnyStore) -> None:
    put = state(expires_in=timedelta(seconds=1))
    async with store.transaction() as tx:
        await tx.put_oauth_state(put)
        assert await tx.take_oauth_state(put.state_hash, put.expires_at) is None
        assert await tx.purge_oauth_states(now() + timedelta(days=1)) == 0


async def test_purging_oauth_states_removes_only_expired_ones(store: AnyStore) -> None:
    old, fresh = state(timedelta(seconds=-5)), state()
    async with store.transaction() as tx:
        await tx.put_oauth_state(old)
        await tx.put_oauth_state(fresh)
        assert await tx.purge_oauth_states(now()) == 1
        assert await tx.take_oauth_state(fresh.state_hash, now()) == fresh
