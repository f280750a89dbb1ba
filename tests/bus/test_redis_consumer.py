"""How the Redis consumer keeps its round trips few: a publish reaches a waiting receive
as one batch, the acks of many shards go in one call (even after Redis lost its scripts),
and the bus metrics still count every delivery and ack."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from prometheus_client import REGISTRY

from gateway.bus import RedisBus
from gateway.bus import redis_consumer as consumer_module
from gateway.bus.redis_consumer import RedisConsumer
from gateway.domain.bus import Delivery, Subscription
from gateway.domain.errors import InvalidArgument
from gateway.domain.events import Event
from tests.bus.conftest import cut_reader, make_event
from tests.bus.test_contract import drain

SHARDS = 8


@pytest.fixture
async def bus(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisBus]:
    prefix = f"{redis_prefix}{secrets.token_hex(4)}:"
    # A long block: the reader is surely waiting in XREADGROUP when the test publishes.
    async with RedisBus(
        redis_url, key_prefix=prefix, shards=SHARDS, lease_ttl_s=2.0, block_ms=2000
    ) as bus:
        yield bus


def across_shards(bus: RedisBus, count: int) -> list[Event]:
    """One event per conversation, the conversations on as many shards as they can be
    (chosen, not left to chance: a test must not depend on where random names hash)."""
    run = secrets.token_hex(3)
    events: list[Event] = []
    used: set[int] = set()
    names = (f"conv-{run}-{n}" for n in itertools.count())
    while len(events) < count:
        event = make_event(next(names), 0)
        shard = bus.keys.shard_of(event.ordering_key)
        if shard not in used or len(used) == SHARDS:
            used.add(shard)
            events.append(event)
    return events


async def pending(bus: RedisBus, group: str) -> int:
    client: redis.asyncio.Redis = bus.client  # type: ignore[assignment]
    total = 0
    for shard in range(SHARDS):
        summary = await client.xpending(bus.keys.stream(shard), group)
        total += int(summary["pending"])
    return total


def sample(name: str, group: str) -> float:
    return REGISTRY.get_sample_value(name, {"backend": "redis", "group": group}) or 0.0


async def test_a_publish_across_shards_reaches_a_waiting_receive_as_one_batch(
    bus: RedisBus,
) -> None:
    events = across_shards(bus, 12)
    async with bus.subscribe(Subscription("g", "c")) as consumer:
        waiting = asyncio.create_task(consumer.receive(100, 5.0))
        # Redis answers a reader blocked on several streams with the one that woke it; the
        # consumer reads the others before handing out, not in a second batch.
        await asyncio.sleep(0.3)
        await bus.publish(events)
        got = await waiting
    assert sorted(d.event.event_id for d in got) == sorted(e.event_id for e in events)


async def test_acks_of_many_shards_leave_nothing_pending(
    bus: RedisBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small chunks: one ack call then names some streams several times.
    monkeypatch.setattr(consumer_module, "_XACK_CHUNK", 2)
    await bus.publish([make_event(f"conv{i % 5}", i // 5) for i in range(30)])
    async with bus.subscribe(Subscription("g", "c")) as consumer:
        got: list[Delivery] = []
        while len(got) < 30:
            batch = await consumer.receive(100, 2.0)
            assert batch
            assert await pending(bus, "g") >= len(batch)
            await consumer.ack([d.delivery_id for d in batch])
            got.extend(batch)
        assert await pending(bus, "g") == 0


async def test_acks_go_through_when_redis_lost_the_script(
    bus: RedisBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A SHA-1 Redis has never seen: as after a restart, which empties its script cache.
    monkeypatch.setattr(consumer_module, "_XACK_SHA", "0" * 40)
    await bus.publish(across_shards(bus, 6))
    async with bus.subscribe(Subscription("g", "c")) as consumer:
        got = await drain(consumer, 6)
        assert len(got) == 6
        assert await pending(bus, "g") == 0


async def test_the_bus_metrics_count_deliveries_acks_and_what_is_in_flight(
    bus: RedisBus,
) -> None:
    group = f"g{secrets.token_hex(3)}"
    await bus.publish(across_shards(bus, 5))
    async with bus.subscribe(Subscription(group, "c")) as consumer:
        got: list[Delivery] = []
        while len(got) < 5:
            got.extend(await consumer.receive(100, 2.0))
        assert sample("switchboard_bus_events_delivered_total", group) == 5
        assert sample("switchboard_bus_in_flight", group) == 5
        await consumer.ack([d.delivery_id for d in got[:3]])
        assert sample("switchboard_bus_events_acked_total", group) == 3
        assert sample("switchboard_bus_in_flight", group) == 2
    # Closing hands the other two back to the group.
    assert sample("switchboard_bus_in_flight", group) == 0


async def test_reads_of_the_other_streams_are_mostly_skipped_while_they_find_nothing(
    bus: RedisBus,
) -> None:
    consumer = RedisConsumer(bus, Subscription("g", "c"))
    assert consumer._follow_up_worth_it()
    consumer._empty_follow_ups = consumer_module._EMPTY_FOLLOW_UPS
    taken = sum(consumer._follow_up_worth_it() for _ in range(64))
    assert taken == 4
    # One that finds something again (the caller resets the count) restores them all.
    consumer._empty_follow_ups = 0
    assert all(consumer._follow_up_worth_it() for _ in range(8))


async def test_an_entry_read_for_a_shard_being_handed_over_reaches_the_next_owner(
    bus: RedisBus,
) -> None:
    # a holds every shard and waits in a 2 s XREADGROUP naming them all when b joins. a's
    # heartbeat gives half the shards up; should it let them go while that read still
    # waits, an entry appended to one of them meanwhile is read by a (pending under its
    # name) after b took the shard over: b never sees it.
    async with bus.subscribe(Subscription("g", "a")) as a:
        await asyncio.sleep(0.3)
        async with bus.subscribe(Subscription("g", "b")) as b:
            async with asyncio.timeout(10):
                while not b._active:  # noqa: ASYNC110 - b's heartbeat takes the shards
                    await asyncio.sleep(0.01)
            shard = min(b._active)
            event = next(
                e for e in across_shards(bus, 64) if bus.keys.shard_of(e.ordering_key) == shard
            )
            await bus.publish([event])
            got = await drain(b, 1, timeout=5.0)
            assert await a.receive(10, 0.2) == []
    assert [(d.event.event_id, d.attempt) for d in got] == [(event.event_id, 1)]


async def test_an_ack_refused_for_a_malformed_id_acks_and_releases_nothing(
    bus: RedisBus,
) -> None:
    # The valid id before the malformed one must not leave flight while its ack is refused:
    # its conversation would go on (the next event handed out) although Redis still holds
    # it unacked, to be delivered again after that next event; and the in-flight gauge
    # would keep counting it for good.
    group = f"g{secrets.token_hex(3)}"
    first, second = make_event("conv1", 0), make_event("conv1", 1)
    await bus.publish([first, second])
    async with bus.subscribe(Subscription(group, "c")) as consumer:
        [d1] = await consumer.receive(10, 2.0)
        with pytest.raises(InvalidArgument):
            await consumer.ack([d1.delivery_id, "not-a-delivery-id"])
        assert await consumer.receive(10, 0.3) == []
        assert await pending(bus, group) == 2  # the second read, held back
        assert sample("switchboard_bus_in_flight", group) == 1
        await consumer.ack([d1.delivery_id])
        [d2] = await consumer.receive(10, 2.0)
        assert d2.event.event_id == second.event_id
    assert sample("switchboard_bus_in_flight", group) == 0


@pytest.mark.parametrize(
    "wrong",
    [f"{SHARDS}/1-0/1", "-1/1-0/1", "0/not-an-entry/1", "0/1-0", "0/1-0/1/2"],
)
async def test_an_ack_naming_no_delivery_of_the_bus_is_invalid_argument(
    bus: RedisBus, wrong: str
) -> None:
    # A shard beyond the bus's (or a negative one, which named the last) and an entry id
    # Redis refuses failed the whole ack with an unexpected error, or acked elsewhere.
    group = f"g{secrets.token_hex(3)}"
    await bus.publish([make_event("conv1", 0)])
    async with bus.subscribe(Subscription(group, "c")) as consumer:
        [d1] = await consumer.receive(10, 2.0)
        with pytest.raises(InvalidArgument) as refused:
            await consumer.ack([d1.delivery_id, wrong])
        assert refused.value.field == "delivery_id"
        with pytest.raises(InvalidArgument):
            await consumer.nack(wrong)
        assert await pending(bus, group) == 1
        await consumer.ack([d1.delivery_id])
        assert await pending(bus, group) == 0


async def test_a_redelivery_claimed_as_its_shard_is_given_up_is_not_handed_out(
    bus: RedisBus,
) -> None:
    # A delivery's deadline passes and the consumer claims the entry again (XCLAIM, one
    # round trip); meanwhile its heartbeat gives the shard up. Put back into the buffer
    # when the claim answers, the entry would go out again from a shard that is no longer
    # this consumer's, while the next owner, taking the shard over, delivers it too.
    event = make_event(f"conv-{secrets.token_hex(3)}", 0)
    shard = bus.keys.shard_of(event.ordering_key)
    await bus.publish([event])
    async with bus.subscribe(Subscription("g", "a", ack_deadline_s=0.3)) as a:
        [first] = await a.receive(10, 5.0)
        await asyncio.sleep(0.35)  # past the deadline
        again = asyncio.create_task(a.receive(10, 0.1))
        async with asyncio.timeout(5):
            while a._flights:  # noqa: ASYNC110 - until the redelivery's claim is sent
                await asyncio.sleep(0)
        assert not again.done()
        # What the heartbeat does to a shard that leaves a's share.
        a._give_up(shard)
        a._draining[shard] = time.monotonic() + 0.3
        assert await again == []
    assert first.event.event_id == event.event_id


async def test_a_shard_whose_take_over_failed_is_taken_over_at_a_later_heartbeat(
    bus: RedisBus, caplog: pytest.LogCaptureFixture
) -> None:
    # The claim that starts a take-over meets a Redis error (in production a timeout or a
    # reset connection; here the shard's key, lost with its lease, holds a value of the
    # wrong type). The consumer keeps renewing the lease it took, so nobody else reads the
    # shard: left unread by it too, the events published there never come.
    caplog.set_level(logging.WARNING, logger=consumer_module.__name__)
    client: redis.asyncio.Redis = bus.client  # type: ignore[assignment]
    event = make_event(f"conv-{secrets.token_hex(3)}", 0)
    shard = bus.keys.shard_of(event.ordering_key)
    stream, lease = bus.keys.stream(shard), bus.keys.lease("g", shard)
    async with bus.subscribe(Subscription("g", "a")) as a:
        await client.delete(stream, lease)
        await client.set(stream, "not a stream")
        # a's heartbeat finds the lease gone, takes it again, and fails to take over.
        async with asyncio.timeout(10):
            while await client.get(lease) != a.name.encode() or not any(  # noqa: ASYNC110
                r.getMessage() == "bus heartbeat failed" for r in caplog.records
            ):
                await asyncio.sleep(0.02)
        await client.delete(stream)
        await bus.ensure_group("g", force=True)
        await bus.publish([event])
        got = await drain(a, 1, timeout=5.0)
    assert [d.event.event_id for d in got] == [event.event_id]


async def test_a_consumer_takes_over_a_shard_whose_stream_redis_lost(
    bus: RedisBus, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis lost a shard's stream, and the group with it (a restart without persistence, a
    # flush), after the bus had made the group: what is published since lands in a new
    # stream with no group. The take-over's claim is refused NOGROUP; the group must be
    # made again, as a read refused NOGROUP makes it, or the shard is never read.
    client: redis.asyncio.Redis = bus.client  # type: ignore[assignment]
    event = make_event(f"conv-{secrets.token_hex(3)}", 0)
    shard = bus.keys.shard_of(event.ordering_key)
    async with bus.subscribe(Subscription("g", "a")):
        pass
    await client.delete(bus.keys.stream(shard))
    await bus.publish([event])
    async with bus.subscribe(Subscription("g", "b")) as b:
        got = await drain(b, 1, timeout=5.0)
    assert [(d.event.event_id, d.attempt) for d in got] == [(event.event_id, 1)]
    # What the lost stream held is gone: said as an error, not made again in silence.
    lost = [r for r in caplog.records if r.getMessage().startswith("bus stream lost")]
    assert lost
    assert lost[0].levelname == "ERROR"
    assert lost[0].group == "g"


async def test_the_reader_lives_through_a_failure_to_make_the_group_again(
    bus: RedisBus,
) -> None:
    # A read refused NOGROUP (Redis lost a stream: a restart, a flush) makes the group
    # again; should that fail too (Redis still loading, a connection reset; here another
    # shard's key holding a value of the wrong type), the reader must try again later, not
    # end: its shards would go unread for good, their leases still renewed.
    client: redis.asyncio.Redis = bus.client  # type: ignore[assignment]
    event = make_event(f"conv-{secrets.token_hex(3)}", 0)
    async with bus.subscribe(Subscription("g", "a")) as a:
        # Streams are read in shard order: the read meets the lost group of shard 0 first.
        await client.delete(bus.keys.stream(0))
        await client.set(bus.keys.stream(1), "not a stream")
        async with asyncio.timeout(10):
            # Making the group again makes shard 0's stream, then fails at shard 1's key.
            while not await client.exists(bus.keys.stream(0)):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await client.delete(bus.keys.stream(1))
        await bus.ensure_group("g", force=True)
        await bus.publish([event])
        got = await drain(a, 1, timeout=5.0)
    assert [d.event.event_id for d in got] == [event.event_id]


async def test_a_nacked_entry_comes_once_after_its_shard_was_taken_again(bus: RedisBus) -> None:
    # The consumer loses a shard's lease (its heartbeat late, or here the key gone) while a
    # nacked entry of it waits for its delay, and takes the shard again: its take-over
    # claims what is pending there, the nacked entry too, which its retry then puts back as
    # well. Delivered twice, the second time after the client acked it.
    client: redis.asyncio.Redis = bus.client  # type: ignore[assignment]
    conversation = f"conv-{secrets.token_hex(3)}"
    first, second = make_event(conversation, 0), make_event(conversation, 1)
    shard = bus.keys.shard_of(first.ordering_key)
    lease = bus.keys.lease("g", shard)
    await bus.publish([first, second])
    async with bus.subscribe(Subscription("g", "a")) as a:
        [d1] = await a.receive(10, 5.0)
        await a.nack(d1.delivery_id, 1.5)
        await client.delete(lease)
        async with asyncio.timeout(5):
            while await client.get(lease) != a.name.encode():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        got: list[Delivery] = []
        async with asyncio.timeout(10):
            while not got or got[-1].event.event_id != second.event_id:
                batch = await a.receive(10, 0.5)
                got.extend(batch)
                if batch:
                    await a.ack([d.delivery_id for d in batch])
        assert await a.receive(10, 0.3) == []
    assert [d.event.event_id for d in got] == [first.event_id, second.event_id]
    assert got[0].attempt == 2


async def test_a_nacked_entry_comes_once_after_a_read_was_cut_off(
    bus: RedisBus, caplog: pytest.LogCaptureFixture
) -> None:
    # A read cut off (its connection broken) may have left entries pending under the
    # consumer's name unseen: before reading on, the consumer reads its own pending entries
    # again. A nacked entry waiting for its delay is one of them: queued by that reload,
    # and again by its retry, it would come twice.
    caplog.set_level(logging.WARNING, logger=consumer_module.__name__)
    client: redis.asyncio.Redis = bus.client  # type: ignore[assignment]
    conversation = f"conv-{secrets.token_hex(3)}"
    first, second = make_event(conversation, 0), make_event(conversation, 1)
    await bus.publish([first, second])
    async with bus.subscribe(Subscription("g", "a")) as a:
        [d1] = await a.receive(10, 5.0)
        await a.nack(d1.delivery_id, 1.5)
        await cut_reader(a, client, caplog)
        got: list[Delivery] = []
        async with asyncio.timeout(10):
            while not got or got[-1].event.event_id != second.event_id:
                batch = await a.receive(10, 0.5)
                got.extend(batch)
                if batch:
                    await a.ack([d.delivery_id for d in batch])
        assert await a.receive(10, 0.3) == []
    assert [(d.event.event_id, d.attempt) for d in got] == [
        (first.event_id, 2),
        (second.event_id, 1),
    ]
