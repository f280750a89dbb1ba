"""The shared rate limiter on a real Redis Cluster (three primaries): buckets and pauses
of accounts that live on different nodes, decided in one pipeline per batch."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster

from gateway.domain.errors import Unavailable
from gateway.domain.outbound import RateCategory
from gateway.services.ratelimit import RedisRateLimiter
from tests.helpers import free_port

RATES = {RateCategory.TEXT: 3.0, RateCategory.MEDIA: 1.0}
T0 = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
async def limiter(redis_cluster_url: str) -> AsyncIterator[RedisRateLimiter]:
    limiter = RedisRateLimiter(redis_cluster_url, RATES, prefix=f"sbtest:{secrets.token_hex(4)}:")
    try:
        yield limiter
    finally:
        await limiter.aclose()


def accounts_on_distinct_nodes(
    limiter: RedisRateLimiter, redis_cluster: RedisCluster, count: int
) -> list[str]:
    """Accounts whose keys live on ``count`` different nodes (one account per node)."""
    by_node: dict[str, str] = {}
    n = 0
    while len(by_node) < count:
        account = f"ig_{n}"
        n += 1
        node = redis_cluster.get_node_from_key(limiter.keys.pause(account))
        assert node is not None
        by_node.setdefault(node.name, account)
    return list(by_node.values())


async def test_each_accounts_buckets_refill_at_the_rate_on_whichever_node_holds_them(
    limiter: RedisRateLimiter, redis_cluster: RedisCluster
) -> None:
    accounts = accounts_on_distinct_nodes(limiter, redis_cluster, 3)
    for account in accounts:
        # One script touches the bucket and the pause: they must share a slot.
        slots = {redis_cluster.keyslot(limiter.keys.bucket(account, c)) for c in RateCategory}
        assert slots == {redis_cluster.keyslot(limiter.keys.pause(account))}

    async def burst(account: str) -> list[tuple[bool, float]]:
        out = []
        for _ in range(4):
            admission = await limiter.acquire(account, RateCategory.TEXT, T0)
            out.append((admission.ok, admission.wait_s))
        return out

    # Concurrent decisions are batched: pipelines that the cluster client splits by node.
    bursts = await asyncio.gather(*(burst(a) for a in accounts))
    for outcome in bursts:
        assert [ok for ok, _ in outcome] == [True, True, True, False]
        assert outcome[3][1] == pytest.approx(1 / 3, abs=0.002)
    media = [await limiter.acquire(a, RateCategory.MEDIA, T0) for a in accounts]
    assert all(m.ok for m in media)  # another bucket: the text burst did not drain it
    assert not (await limiter.acquire(accounts[0], RateCategory.MEDIA, T0)).ok
    later = T0 + timedelta(seconds=0.34)
    refilled = await asyncio.gather(
        *(limiter.acquire(a, RateCategory.TEXT, later) for a in accounts)
    )
    assert [r.ok for r in refilled] == [True, True, True]
    assert not (await limiter.acquire(accounts[0], RateCategory.TEXT, later)).ok


async def test_a_pause_holds_every_category_of_its_account_only(
    limiter: RedisRateLimiter, redis_cluster: RedisCluster
) -> None:
    paused, other = accounts_on_distinct_nodes(limiter, redis_cluster, 2)
    now = datetime.now(UTC)
    until = now + timedelta(seconds=60)
    await limiter.pause(paused, until)
    await limiter.pause(paused, now + timedelta(seconds=10))  # an earlier end does not win
    for category in RateCategory:
        admission = await limiter.acquire(paused, category, now)
        assert not admission.ok
        assert admission.paused_until is not None
        assert abs((admission.paused_until - until).total_seconds()) < 0.002
        assert admission.wait_s == pytest.approx(60, abs=0.01)
    assert (await limiter.acquire(other, RateCategory.TEXT, now)).ok
    pause_ttl = await redis_cluster.pttl(limiter.keys.pause(paused))
    assert 55_000 < pause_ttl <= 60_000
    after = await limiter.acquire(paused, RateCategory.TEXT, until + timedelta(seconds=1))
    assert after.ok


async def test_a_script_lost_by_one_node_is_loaded_again_without_charging_others_twice(
    limiter: RedisRateLimiter, redis_cluster: RedisCluster
) -> None:
    kept, lost = accounts_on_distinct_nodes(limiter, redis_cluster, 2)
    assert (await limiter.acquire(kept, RateCategory.TEXT, T0)).ok  # 3 -> 2 tokens
    assert (await limiter.acquire(lost, RateCategory.TEXT, T0)).ok
    lost_node = redis_cluster.get_node_from_key(limiter.keys.pause(lost))
    assert lost_node is not None
    # What a failover to a fresh primary, or a restarted node, looks like to the limiter.
    async with redis.asyncio.Redis(host=lost_node.host, port=lost_node.port) as node:
        await node.script_flush()
        assert await node.script_exists(limiter._acquire.sha) == [False]
    both = await asyncio.gather(
        limiter.acquire(kept, RateCategory.TEXT, T0), limiter.acquire(lost, RateCategory.TEXT, T0)
    )
    assert [a.ok for a in both] == [True, True]  # 2 -> 1 token each
    # One token left for each: a decision asked twice would have taken it.
    assert (await limiter.acquire(kept, RateCategory.TEXT, T0)).ok
    assert (await limiter.acquire(lost, RateCategory.TEXT, T0)).ok
    assert not (await limiter.acquire(kept, RateCategory.TEXT, T0)).ok
    assert not (await limiter.acquire(lost, RateCategory.TEXT, T0)).ok
    async with redis.asyncio.Redis(host=lost_node.host, port=lost_node.port) as node:
        assert await node.script_exists(limiter._acquire.sha) == [True]


async def test_a_cluster_that_cannot_be_reached_makes_the_limiter_unavailable() -> None:
    limiter = RedisRateLimiter(f"redis+cluster://127.0.0.1:{free_port()}/0", RATES, prefix="x:")
    try:
        with pytest.raises(Unavailable) as caught:
            await limiter.acquire("ig_1", RateCategory.TEXT, T0)
        assert caught.value.reason == "RATE_LIMITER_UNAVAILABLE"
        with pytest.raises(Unavailable):
            await limiter.pause("ig_1", datetime.now(UTC) + timedelta(seconds=5))
    finally:
        await limiter.aclose()
