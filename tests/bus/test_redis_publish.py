"""Publishing to Redis: one script call per batch appends each event to its shard stream."""

from __future__ import annotations

import secrets

import redis.asyncio

from gateway.bus import RedisBus
from gateway.bus.redis_consumer import FIELD
from gateway.domain.codec import decode_event
from gateway.domain.store import OutboxEntry
from tests.bus.conftest import make_event


async def _streams(client: redis.asyncio.Redis, bus: RedisBus) -> dict[int, list[str]]:
    """Each shard's texts, in stream order."""
    found: dict[int, list[str]] = {}
    for shard in range(bus.keys.shards):
        for _, fields in await client.xrange(bus.keys.stream(shard)):
            event = decode_event(fields[FIELD])
            found.setdefault(shard, []).append(event.payload["message"]["text"])
    return found


async def test_a_batch_lands_on_its_shards_in_publish_order(
    redis_url: str, redis_prefix: str
) -> None:
    bus = RedisBus(redis_url, key_prefix=f"{redis_prefix}{secrets.token_hex(4)}:", shards=4)
    await bus.start()
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        events = [make_event(f"conv{i % 7}", i) for i in range(60)]
        await bus.publish(events)
        found = await _streams(client, bus)
    finally:
        await client.aclose()
        await bus.aclose()
    expected: dict[int, list[str]] = {}
    for event in events:
        shard = bus.keys.shard_of(event.ordering_key)
        expected.setdefault(shard, []).append(event.payload["message"]["text"])
    assert found == expected
    assert len(found) > 1


async def test_outbox_entries_are_published_as_the_outbox_encoded_them(
    redis_url: str, redis_prefix: str
) -> None:
    bus = RedisBus(redis_url, key_prefix=f"{redis_prefix}{secrets.token_hex(4)}:", shards=1)
    await bus.start()
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        event = make_event("conv1")
        wire = b'{"as":"stored"}'
        await bus.publish_outbox([OutboxEntry(seq=1, event=event, attempts=1, wire=wire)])
        entries = await client.xrange(bus.keys.stream(0))
    finally:
        await client.aclose()
        await bus.aclose()
    assert [fields[FIELD] for _, fields in entries] == [wire]


async def test_a_redis_that_forgot_the_script_still_gets_every_event_once(
    redis_url: str, redis_prefix: str
) -> None:
    bus = RedisBus(redis_url, key_prefix=f"{redis_prefix}{secrets.token_hex(4)}:", shards=2)
    await bus.start()
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await bus.publish([make_event("conv0", 0)])
        await client.script_flush()  # as after a restart or a failover
        await bus.publish([make_event("conv0", 1), make_event("conv1", 2)])
        found = await _streams(client, bus)
    finally:
        await client.aclose()
        await bus.aclose()
    assert sorted(text for texts in found.values() for text in texts) == [
        "conv0#0",
        "conv0#1",
        "conv1#2",
    ]
