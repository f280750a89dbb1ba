"""The Redis bus across a Redis Cluster failover: a primary is killed, its replica takes
over, and the bus carries on.

A cluster of its own (three primaries, one replica each, a 1 s node timeout so that the
failover takes seconds), since the test kills one of its servers. The consumer lives
through the failover: its blocking reader of the dead primary's slots must find the
promoted replica, its leases there must be taken again, and what is published during the
failover and after it must reach it, every conversation in order. Then a consumer that
joins the group shares the work with it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest
import redis.asyncio
from redis.crc import key_slot

from gateway.bus import RedisBus
from gateway.domain.bus import Subscription
from gateway.domain.errors import BusLost, BusUnavailable
from gateway.domain.events import Event
from gateway.domain.store import OutboxEntry
from tests.bus.conftest import OrderCheck, make_event
from tests.bus.test_redis_cluster import SHARDS, cluster_bus, conversations_on_every_shard
from tests.helpers import RedisClusterNodes, RedisClusterUnavailable, redis_cluster_nodes

# Generous: a failover with a 1 s node timeout takes a few seconds.
FAILOVER_TIMEOUT_S = 30.0
LEASE_TTL_S = 1.0
PER_SET = 4  # events per conversation in each set


@pytest.fixture
def cluster() -> Iterator[RedisClusterNodes]:
    try:
        with redis_cluster_nodes(3, 1, node_timeout_ms=1000) as running:
            yield running
    except RedisClusterUnavailable as exc:
        pytest.skip(f"no Redis Cluster: {exc}")


@pytest.fixture
async def bus(cluster: RedisClusterNodes) -> AsyncIterator[RedisBus]:
    async with cluster_bus(cluster.url, lease_ttl_s=LEASE_TTL_S) as bus:
        yield bus


async def wait_for(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    """Polls ``check`` (without blocking the loop the bus runs on) until it holds."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + FAILOVER_TIMEOUT_S
    while True:
        try:
            if await check():
                return
        except (redis.RedisError, OSError):
            pass  # a node still down or refusing mid-failover: ask again
        if loop.time() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def cluster_nodes(port: int) -> dict[str, Any]:
    """CLUSTER NODES as ``port`` sees it, by ``host:port``."""
    async with redis.asyncio.Redis(host="127.0.0.1", port=port, socket_timeout=5) as node:
        seen: Any = await node.cluster("NODES")
        return dict(seen)


def serves(info: dict[str, Any], slot: int) -> bool:
    return any(int(lo) <= slot <= int(hi) for lo, hi, *_ in info["slots"])


def masters_by_port(nodes: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {
        int(addr.rsplit(":", 1)[1]): info
        for addr, info in nodes.items()
        if "master" in info["flags"] and "fail" not in info["flags"] and info["slots"]
    }


async def failed_over(survivors: Sequence[int], victim: int, slot: int) -> bool:
    """Every surviving node sees three primaries, none of them the victim, one serving
    ``slot`` (one of the victim's), and the cluster ok."""
    for port in survivors:
        now = masters_by_port(await cluster_nodes(port))
        if len(now) != 3 or victim in now:
            return False
        if not any(serves(info, slot) for info in now.values()):
            return False
        async with redis.asyncio.Redis(host="127.0.0.1", port=port) as node:
            if (await node.cluster("INFO"))["cluster_state"] != "ok":
                return False
    return True


async def publish_with_retries(bus: RedisBus, events: Sequence[Event]) -> None:
    """Publishes shard by shard, retrying a shard's batch (a bounded number of times)
    while the bus is unavailable, as the outbox relay does. A batch goes to one node, so
    one that failed (its node down) wrote nothing, and its retry duplicates nothing."""
    by_shard: dict[int, list[Event]] = {}
    for event in events:
        by_shard.setdefault(bus.keys.shard_of(event.ordering_key), []).append(event)
    for batch in by_shard.values():
        for attempt in range(60):
            try:
                await bus.publish(batch)
                break
            except BusUnavailable:
                if attempt == 59:
                    raise
                await asyncio.sleep(0.5)


async def test_the_bus_delivers_everything_in_order_after_a_primary_fails_over(
    cluster: RedisClusterNodes, bus: RedisBus
) -> None:
    ports = list(cluster.processes)
    masters = masters_by_port(await cluster_nodes(ports[0]))
    assert len(masters) == 3
    slots = {s: key_slot(bus.keys.stream(s).encode()) for s in range(SHARDS)}
    conversations = conversations_on_every_shard(bus, per_shard=2)
    # Every primary holds some shard, so the one killed below holds some too.
    for info in masters.values():
        assert any(serves(info, slot) for slot in slots.values())
    victim = next(p for p, info in masters.items() if serves(info, slots[0]))
    victim_id = masters[victim]["node_id"]
    survivors = [p for p in ports if p != victim]

    def event_set(k: int) -> list[Event]:
        return [
            make_event(c, n) for n in range(k * PER_SET, (k + 1) * PER_SET) for c in conversations
        ]

    def order_check(events: list[Event], first: int, seed: int) -> OrderCheck:
        check = OrderCheck(len(events), seed=seed)
        for conversation in conversations:
            check.next_expected[conversation] = first
        return check

    sub_a = Subscription("g", "a", max_in_flight=40, ack_deadline_s=30.0)
    async with bus.subscribe(sub_a) as a:
        # 1. Before: everything published is consumed and acked.
        first = event_set(0)
        await bus.publish(first)
        check = order_check(first, 0, seed=1)
        await check.run("a", a)
        assert check.violations == []
        assert check.acked == len(first)
        assert await bus.group_lag("g") == 0

        # 2. The replicas have every write (the acks included); then one primary dies.
        for port in masters:
            async with redis.asyncio.Redis(host="127.0.0.1", port=port) as node:
                assert await node.wait(1, 10_000) >= 1
        cluster.kill(victim)

        # 3. The same consumer must receive every event of a second set, in order: the
        # first half published at once, while the cluster has not noticed the death yet
        # (the relay keeps publishing then: it retries what fails), the second half once
        # the victim's replica has taken over.
        second = event_set(1)
        check = order_check(second, PER_SET, seed=2)
        consuming = asyncio.create_task(check.run("a", a))
        try:
            half = len(second) // 2  # n = 4, 5 of every conversation; then 6, 7
            await publish_with_retries(bus, second[:half])

            taken_over = functools.partial(failed_over, survivors, victim, slots[0])
            await wait_for("the victim's replica to take over", taken_over)
            now = masters_by_port(await cluster_nodes(survivors[0]))
            heir = next(p for p, info in now.items() if serves(info, slots[0]))
            assert heir not in masters  # the victim's replica, promoted
            assert victim_id not in {info["node_id"] for info in now.values()}
            await publish_with_retries(bus, second[half:])
            await consuming
        finally:
            consuming.cancel()  # only still running if something above failed
        assert check.violations == []
        assert check.acked == len(second)
        assert {bus.keys.shard_of(d.event.ordering_key) for d in check.received["a"]} == set(
            range(SHARDS)
        )

        # 4. A consumer that joins now shares the group's shards with the first one.
        sub_b = Subscription("g", "b", max_in_flight=40, ack_deadline_s=30.0)
        async with bus.subscribe(sub_b) as b:
            await asyncio.sleep(LEASE_TTL_S * 1.5)  # they see each other and split the shards
            third = event_set(2)
            check = order_check(third, 2 * PER_SET, seed=3)
            consuming_b = asyncio.gather(check.run("a", a), check.run("b", b))
            await publish_with_retries(bus, third)
            await consuming_b
        assert check.violations == []
        assert check.acked == len(third)
        assert check.received["a"]
        assert check.received["b"]
    assert await bus.group_lag("g") == 0


async def test_a_failover_is_a_loss_appends_are_refused_until_it_is_answered(
    cluster: RedisClusterNodes, bus: RedisBus
) -> None:
    """Replication is asynchronous: a replica that takes over may lack what its primary
    acknowledged last. The shard's marker names the server that served it when the bus
    was found whole, so the promoted replica refuses the append (the relay then publishes
    again what it held, ahead of it) and the next look reports the loss."""
    assert (await bus.watermark()).lost  # no markers yet
    await bus.recovered()
    assert not (await bus.watermark()).lost
    ports = list(cluster.processes)
    masters = masters_by_port(await cluster_nodes(ports[0]))
    slot = key_slot(bus.keys.stream(0).encode())
    victim = next(p for p, info in masters.items() if serves(info, slot))
    survivors = [p for p in ports if p != victim]
    (conversation, *_) = conversations_on_every_shard(bus, per_shard=1)
    assert bus.keys.shard_of(conversation) == 0

    def entry(n: int) -> OutboxEntry:
        return OutboxEntry(seq=n + 1, event=make_event(conversation, n), attempts=1)

    assert await bus.publish_outbox([entry(0)]) > 0
    for port in masters:  # the replicas have the markers: the replica keeps them
        async with redis.asyncio.Redis(host="127.0.0.1", port=port) as node:
            assert await node.wait(1, 10_000) >= 1
    cluster.kill(victim)
    taken_over = functools.partial(failed_over, survivors, victim, slot)
    await wait_for("the victim's replica to take over", taken_over)

    async def refused() -> bool:
        try:
            await bus.publish_outbox([entry(1)])
        except BusLost:
            return True
        except BusUnavailable:
            return False  # the client has not found the new primary yet
        raise AssertionError("the replica that took over took the append")

    await wait_for("the append to be refused", refused)

    async def look_lost() -> bool:
        try:
            return (await bus.watermark()).lost
        except BusUnavailable:
            return False

    await wait_for("the look to report the loss", look_lost)
    await bus.recovered()
    assert not (await bus.watermark()).lost
    assert await bus.publish_outbox([entry(1)]) > 0
