"""What the Redis bus tells the outbox relay: whether Redis lost what it held, and up to
when every group acked what was appended (``gateway.bus.redis_watch``)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster

from gateway.bus import RedisBus
from gateway.domain.bus import Delivery, Subscription, Watermark
from gateway.domain.errors import BusLost, BusUnavailable
from gateway.domain.store import OutboxEntry
from tests.bus.conftest import make_event
from tests.helpers import redis_node

T = TypeVar("T")


async def _bus(url: str, prefix: str, shards: int = 4) -> RedisBus:
    bus = RedisBus(url, key_prefix=f"{prefix}{secrets.token_hex(4)}:", shards=shards)
    await bus.start()
    return bus


@pytest.fixture
async def bus(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisBus]:
    opened = await _bus(redis_url, redis_prefix)
    # A prefix nobody used has no markers: that first look is a loss, answered here.
    assert (await opened.watermark()).lost
    await opened.recovered()
    try:
        yield opened
    finally:
        await opened.aclose()


async def _publish(bus: RedisBus, conversation: str, n: int = 0) -> int:
    entry = OutboxEntry(seq=n + 1, event=make_event(conversation, n), attempts=1)
    return await bus.publish_outbox([entry])


async def _acked(bus: RedisBus, mark: int) -> bool:
    # The watermark is strictly after what it covers: an append in the very millisecond
    # of the look is not known acked yet.
    await asyncio.sleep(0.002)
    watermark = await bus.watermark()
    assert not watermark.lost
    return watermark.acked_before_ms is not None and mark < watermark.acked_before_ms


async def test_without_a_group_what_is_appended_is_owed_to_nobody(bus: RedisBus) -> None:
    mark = await _publish(bus, "conv1")
    assert mark > 0
    assert await _acked(bus, mark)


async def test_an_entry_is_acked_once_every_group_acked_it(bus: RedisBus) -> None:
    await bus.ensure_group("ai")
    await bus.ensure_group("audit")
    first = await _publish(bus, "conv1")
    assert not await _acked(bus, first)  # appended, read by nobody
    async with (
        bus.subscribe(Subscription(group="ai", consumer="c1")) as ai,
        bus.subscribe(Subscription(group="audit", consumer="c1")) as audit,
    ):
        (delivery,) = await ai.receive(10, 5.0)
        assert not await _acked(bus, first)  # read, pending
        await ai.ack([delivery.delivery_id])
        assert not await _acked(bus, first)  # "audit" has not read it
        (other,) = await audit.receive(10, 5.0)
        await audit.ack([other.delivery_id])
        assert await _acked(bus, first)
        # A later entry on another shard is held back by its own group positions only.
        second = await _publish(bus, "conv-elsewhere", 1)
        assert not await _acked(bus, second)
        assert await _acked(bus, first) or first >= second  # same millisecond at most


async def test_a_retired_group_holds_nothing_back(bus: RedisBus, redis_url: str) -> None:
    await bus.ensure_group("gone")
    mark = await _publish(bus, "conv1")
    assert not await _acked(bus, mark)
    # Retired from another process (the CLI): this one forgets it too.
    other = RedisBus(redis_url, key_prefix=bus.keys.prefix, shards=bus.keys.shards)
    await other.start()
    try:
        assert await other.delete_group("gone")
    finally:
        await other.aclose()
    assert await _acked(bus, mark)
    assert "gone" not in bus._watch.groups


async def test_a_group_missing_on_a_shard_leaves_nothing_acked(
    bus: RedisBus, redis_url: str
) -> None:
    await bus.ensure_group("ai")
    mark = await _publish(bus, "conv1")
    async with bus.subscribe(Subscription(group="ai", consumer="c1")) as ai:
        (delivery,) = await ai.receive(10, 5.0)
        await ai.ack([delivery.delivery_id])
        assert await _acked(bus, mark)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.xgroup_destroy(bus.keys.stream(0), "ai")
    finally:
        await client.aclose()
    watermark = await bus.watermark()
    assert not watermark.lost
    assert watermark.acked_before_ms is None


async def test_markers_naming_another_server_are_a_loss_until_answered(
    bus: RedisBus, redis_url: str
) -> None:
    """What a Redis restarted from its AOF looks like to a process started after it: the
    markers are there, but another server wrote them."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.set(bus.keys.marker(2), "a-server-before-this-one")
    finally:
        await client.aclose()
    fresh = RedisBus(redis_url, key_prefix=bus.keys.prefix, shards=bus.keys.shards)
    await fresh.start()
    try:
        assert (await fresh.watermark()).lost
        assert (await fresh.watermark()).lost  # until answered
        await fresh.recovered()
        assert not (await fresh.watermark()).lost
        assert not (await bus.watermark()).lost
    finally:
        await fresh.aclose()


@pytest.mark.parametrize("marker", [None, "a-server-before-this-one"])
async def test_an_append_is_refused_once_redis_lost_what_it_held(
    bus: RedisBus, redis_url: str, marker: str | None
) -> None:
    """A shard's marker gone (Redis came back empty) or naming another server: the append
    adds nothing and says so, until the loss is answered; the relay then publishes what
    was lost ahead of it (tests/bus/test_relay_holds.py)."""
    stream = bus.keys.stream(bus.keys.shard_of("conv1"))
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await _publish(bus, "conv1")
        if marker is None:
            await client.delete(bus.keys.marker(bus.keys.shard_of("conv1")))
        else:
            await client.set(bus.keys.marker(bus.keys.shard_of("conv1")), marker)
        with pytest.raises(BusLost):
            await _publish(bus, "conv1", 1)
        assert await client.xlen(stream) == 1
        assert (await bus.watermark()).lost
        with pytest.raises(BusLost):
            await _publish(bus, "conv1", 1)  # until answered
        await bus.recovered()
        assert await _publish(bus, "conv1", 1) > 0
        assert await client.xlen(stream) == 2
    finally:
        await client.aclose()


async def test_an_append_is_refused_by_a_server_restarted_with_its_data() -> None:
    """Redis restarted from its AOF keeps the markers, but may have lost what it was given
    last (``appendfsync everysec``), as a replica that takes over may: another server (a
    new run_id) refuses the append all the same, until the loss is answered."""
    with redis_node(persistent=True) as node:
        bus = await _bus(node.url, "aof:")
        client = redis.asyncio.Redis.from_url(node.url)
        try:
            assert (await bus.watermark()).lost
            await bus.recovered()
            await _publish(bus, "conv1")
            node.stop()
            node.start()
            stream = bus.keys.stream(bus.keys.shard_of("conv1"))
            assert await client.get(bus.keys.marker(bus.keys.shard_of("conv1"))) is not None
            with pytest.raises(BusLost):
                await _after_restart(lambda: _publish(bus, "conv1", 1))
            assert await client.xlen(stream) == 1  # kept from before, nothing added
            assert (await _look_after_restart(bus)).lost
            await bus.recovered()
            assert await _publish(bus, "conv1", 1) > 0
        finally:
            await client.aclose()
            await bus.aclose()


async def _after_restart(call: Callable[[], Awaitable[T]]) -> T:
    """The first command after a restart may fail on a connection the old server closed;
    the relay's next round asks again. A refusal (``BusLost``) is an answer."""
    for _ in range(3):
        try:
            return await call()
        except BusLost:
            raise
        except BusUnavailable:
            continue
    return await call()


async def _look_after_restart(bus: RedisBus) -> Watermark:
    return await _after_restart(bus.watermark)


async def test_a_redis_restarted_empty_is_a_loss_for_every_process() -> None:
    with redis_node() as node:
        first, second = await _bus(node.url, "p:"), None
        try:
            assert (await first.watermark()).lost
            await first.recovered()
            await first.ensure_group("ai")
            assert not (await first.watermark()).lost  # and sees the group
            second = RedisBus(node.url, key_prefix=first.keys.prefix, shards=4)
            await second.start()
            assert not (await second.watermark()).lost  # the same server, found whole
            node.stop()
            node.start()
            assert (await _look_after_restart(first)).lost
            await first.recovered()
            # The groups the bus knew are made again, on every shard, before the markers.
            client = redis.asyncio.Redis.from_url(node.url)
            try:
                for shard in range(first.keys.shards):
                    infos = await client.xinfo_groups(first.keys.stream(shard))
                    assert [i["name"] for i in infos] == [b"ai"]
            finally:
                await client.aclose()
            # Markers written again by the first: the second still saw the old server.
            assert (await _look_after_restart(second)).lost
            await second.recovered()
            assert not (await first.watermark()).lost
            assert not (await second.watermark()).lost
        finally:
            await first.aclose()
            if second is not None:
                await second.aclose()


async def test_on_a_cluster_an_ack_moves_the_watermark(
    redis_cluster_url: str, redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    bus = await _bus(redis_cluster_url, redis_prefix, shards=6)
    try:
        assert (await bus.watermark()).lost  # no markers yet
        await bus.recovered()
        await bus.ensure_group("ai")
        marks = [await _publish(bus, f"conv{n}", n) for n in range(6)]
        assert not await _acked(bus, min(marks))
        # A node that came back empty has lost its shards' markers: appends there refuse.
        await redis_cluster.delete(bus.keys.marker(bus.keys.shard_of("conv9")))
        with pytest.raises(BusLost):
            await _publish(bus, "conv9", 9)
        assert (await bus.watermark()).lost
        await bus.recovered()
        async with bus.subscribe(Subscription(group="ai", consumer="c1")) as ai:
            got: list[Delivery] = []
            while len(got) < len(marks):
                got += await ai.receive(10, 5.0)
            await ai.ack([d.delivery_id for d in got])
            assert await _acked(bus, max(marks))
    finally:
        await bus.aclose()
