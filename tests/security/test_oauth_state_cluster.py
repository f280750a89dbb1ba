"""OAuth states in a real Redis Cluster (three primaries): hashed keys spread over the
nodes, single use even when callbacks race, gone once expired."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio.cluster import RedisCluster

from gateway.domain.errors import Unavailable
from gateway.domain.models import OAuthState
from gateway.security.oauth_state import (
    STATE_TTL,
    RedisOAuthStates,
    hash_state,
    new_state,
    oauth_state_key,
)
from tests.helpers import free_port


@pytest.fixture
def prefix() -> str:
    return f"sbtest:{secrets.token_hex(4)}:"


@pytest.fixture
async def states(redis_cluster_url: str, prefix: str) -> AsyncIterator[RedisOAuthStates]:
    store = RedisOAuthStates(redis_cluster_url, prefix=prefix)
    try:
        yield store
    finally:
        await store.aclose()


def pending(tenant: str, *, expires_in: timedelta = STATE_TTL) -> tuple[str, OAuthState]:
    raw = new_state()
    now = datetime.now(UTC)
    return raw, OAuthState(
        state_hash=hash_state(raw),
        tenant_id=tenant,
        channel="instagram",
        login_flow="instagram",
        return_url="https://app.example.com/done",
        expires_at=now + expires_in,
        created_at=now,
    )


async def test_states_are_kept_hashed_on_every_node_and_taken_once(
    states: RedisOAuthStates, redis_cluster: RedisCluster, prefix: str
) -> None:
    flows = [pending(f"tenant_{i}") for i in range(24)]
    for _, state in flows:
        await states.put(state)
    keys = [oauth_state_key(prefix, state.state_hash) for _, state in flows]
    nodes = {redis_cluster.get_node_from_key(key).name for key in keys}
    assert len(nodes) == 3  # 24 random hashes: spread over all three primaries
    for key in keys:
        assert 590_000 <= await redis_cluster.pttl(key) <= 600_000
    stored = [k async for k in redis_cluster.scan_iter(match=f"{prefix}*")]
    assert len(stored) == len(flows)
    assert not any(raw.encode() in key for raw, _ in flows for key in stored)
    now = datetime.now(UTC)
    for _, state in flows:
        assert await states.take(state.state_hash, now) == state
    for _, state in flows:
        assert await states.take(state.state_hash, now) is None
    assert [k async for k in redis_cluster.scan_iter(match=f"{prefix}*")] == []


async def test_racing_callbacks_take_a_state_once(states: RedisOAuthStates) -> None:
    _, state = pending("tenant_1")
    await states.put(state)
    now = datetime.now(UTC)
    taken = await asyncio.gather(*(states.take(state.state_hash, now) for _ in range(8)))
    assert [t for t in taken if t is not None] == [state]


async def test_an_expired_state_is_refused(states: RedisOAuthStates) -> None:
    _, state = pending("tenant_1")
    await states.put(state)
    assert await states.take(state.state_hash, state.expires_at + timedelta(seconds=1)) is None
    # Consumed all the same: it cannot be tried again with a friendlier clock.
    assert await states.take(state.state_hash, datetime.now(UTC)) is None
    _, gone = pending("tenant_2", expires_in=timedelta(seconds=-5))
    await states.put(gone)
    await asyncio.sleep(0.01)
    assert await states.take(gone.state_hash, datetime.now(UTC)) is None


async def test_a_cluster_that_cannot_be_reached_makes_the_store_unavailable() -> None:
    store = RedisOAuthStates(f"redis+cluster://127.0.0.1:{free_port()}/0", prefix="x:")
    _, state = pending("tenant_1")
    try:
        with pytest.raises(Unavailable) as caught:
            await store.put(state)
        assert caught.value.reason == "STATE_STORE_UNAVAILABLE"
        with pytest.raises(Unavailable):
            await store.take(state.state_hash, datetime.now(UTC))
    finally:
        await store.aclose()
