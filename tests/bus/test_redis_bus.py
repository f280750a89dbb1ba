"""What only the Redis bus has: hash-tagged keys, leases that expire, the factory."""

from __future__ import annotations

import asyncio
import secrets

import redis.asyncio
from prometheus_client import REGISTRY

from gateway.bus import MemoryBus, RedisBus, open_bus
from gateway.bus.keys import BusKeys
from gateway.domain.bus import Subscription
from tests.bus.conftest import Harness, make_event
from tests.bus.test_contract import drain


def test_every_key_of_a_shard_shares_its_hash_tag() -> None:
    keys = BusKeys("switchboard:", 16)
    stream = keys.stream(3)
    assert stream == "{switchboard:bus:3}"
    assert keys.lease("ai", 3).startswith(stream + ":")
    assert keys.shard_from_stream(stream) == 3
    assert keys.shard_of("conv_1") == keys.shard_of("conv_1")


def test_open_bus_picks_redis_only_when_a_url_is_set(harness: Harness) -> None:
    assert harness.store is not None
    assert isinstance(open_bus(None, harness.store), MemoryBus)
    assert isinstance(open_bus("redis://127.0.0.1:6379/0", harness.store), RedisBus)


async def test_a_crashed_consumers_shards_move_when_its_lease_expires(
    redis_url: str, redis_prefix: str
) -> None:
    prefix = f"{redis_prefix}{secrets.token_hex(4)}:"
    opts = {"key_prefix": prefix, "shards": 4, "lease_ttl_s": 0.4, "block_ms": 100}
    crashed = RedisBus(redis_url, **opts)  # type: ignore[arg-type]
    survivor = RedisBus(redis_url, **opts)  # type: ignore[arg-type]
    await crashed.start()
    await survivor.start()
    try:
        events = [make_event(f"conv{i}", 0) for i in range(6)]
        await crashed.publish(events)
        async with crashed.subscribe(Subscription("g", "a")) as a:
            taken = await drain(a, 6, ack=False)
            # The process dies: no lease released, no goodbye.
            a._closed = True
            await asyncio.wait(a._tasks)
            async with survivor.subscribe(Subscription("g", "b")) as b:
                got = await drain(b, 6, timeout=5.0)
    finally:
        await survivor.aclose()
        await crashed.aclose()
    assert len(taken) == 6
    assert sorted(d.event.event_id for d in got) == sorted(e.event_id for e in events)
    assert all(d.attempt == 2 for d in got)


async def test_streams_are_capped_by_maxlen(redis_url: str, redis_prefix: str) -> None:
    prefix = f"{redis_prefix}{secrets.token_hex(4)}:"
    bus = RedisBus(redis_url, key_prefix=prefix, shards=1, max_len=100)
    await bus.start()
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        for _ in range(10):
            await bus.publish([make_event(f"conv{i}") for i in range(100)])
        length = await client.xlen(bus.keys.stream(0))
    finally:
        await client.aclose()
        await bus.aclose()
    assert length < 1000


async def test_every_process_reports_the_lag_of_groups_it_never_served(
    redis_url: str, redis_prefix: str
) -> None:
    """After a rollout, no process may have served the AI backend's group yet (the backend
    is down): its lag must still be reported, which is when the alert on it matters."""
    prefix = f"{redis_prefix}{secrets.token_hex(4)}:"
    group = f"ai-{secrets.token_hex(3)}"
    served = RedisBus(redis_url, key_prefix=prefix, shards=2, block_ms=100)
    fresh = RedisBus(redis_url, key_prefix=prefix, shards=2, block_ms=100, lag_interval_s=0.05)
    await served.start()
    try:
        async with served.subscribe(Subscription(group, "a")):
            pass  # the group exists; its consumer went away
        await served.publish([make_event(f"conv{i}", 0) for i in range(7)])
        await fresh.start()
        labels = {"backend": "redis", "group": group}
        async with asyncio.timeout(10):
            while REGISTRY.get_sample_value("switchboard_bus_group_lag", labels) != 7:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert group in await fresh.known_groups()
    finally:
        await fresh.aclose()
        await served.aclose()


async def test_a_group_nobody_reads_any_more_can_be_retired(
    redis_url: str, redis_prefix: str
) -> None:
    prefix = f"{redis_prefix}{secrets.token_hex(4)}:"
    group = f"old-{secrets.token_hex(3)}"
    async with RedisBus(redis_url, key_prefix=prefix, shards=2, block_ms=100) as bus:
        async with bus.subscribe(Subscription(group, "a")):
            assert await bus.live_consumers(group) == 1
        await bus.publish([make_event(f"conv{i}", 0) for i in range(3)])
        assert group in await bus.known_groups()
        assert await bus.delete_group(group)
        assert group not in await bus.known_groups()
        client = bus.client
        for shard in range(2):
            infos = await client.xinfo_groups(bus.keys.stream(shard))
            assert all(info["name"] not in (group, group.encode()) for info in infos)
        assert not await bus.delete_group(group)
