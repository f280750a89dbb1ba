"""The Redis consumer when things go wrong around it: a conversation's backlog clogging its
buffer, acks Redis refuses, nacks across a rebalance, reads cut off, a consumer stalled;
the in-process bus beside it where the two must agree."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gateway.bus import MemoryBus, RedisBus
from gateway.domain.bus import Delivery, Subscription
from gateway.domain.events import Event
from tests.bus.conftest import cut_reader, make_event, seq_of

SHARDS = 8


@pytest.fixture
async def bus(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisBus]:
    prefix = f"{redis_prefix}{secrets.token_hex(4)}:"
    # A small read count: the consumer's buffer holds max(2 * 5, 4 * max_in_flight).
    async with RedisBus(
        redis_url,
        key_prefix=prefix,
        shards=SHARDS,
        lease_ttl_s=2.0,
        block_ms=200,
        read_count=5,
    ) as bus:
        yield bus


def conversation_on(bus: RedisBus, shard: int | None = None, avoid: int | None = None) -> str:
    run = secrets.token_hex(3)
    for n in itertools.count():
        name = f"conv-{run}-{n}"
        s = bus.keys.shard_of(name)
        if (shard is None or s == shard) and (avoid is None or s != avoid):
            return name
    raise AssertionError


# ---------------------------------------------------------------------------------------
# A conversation's backlog that fills the buffer while its head is out (a slow client, a
# nack with a delay) is parked, ids only, so that the other conversations go on (DESIGN.md
# §4: different conversations proceed in parallel), and comes back in order in its turn.
# ---------------------------------------------------------------------------------------


async def test_a_long_conversation_backlog_does_not_stall_other_conversations(
    bus: RedisBus,
) -> None:
    busy = conversation_on(bus)
    other = conversation_on(bus, avoid=bus.keys.shard_of(busy))
    backlog = [make_event(busy, n) for n in range(30)]
    await bus.publish(backlog)
    async with bus.subscribe(Subscription("g", "c", max_in_flight=2)) as consumer:
        [head] = await consumer.receive(10, 5.0)
        assert head.event.event_id == backlog[0].event_id
        # The client cannot handle this conversation now: retry it in a minute.
        await consumer.nack(head.delivery_id, 60.0)
        await asyncio.sleep(0.5)  # the reader fills its buffer meanwhile
        lone = make_event(other, 0)
        await bus.publish([lone])
        got = await consumer.receive(10, 3.0)
    assert [d.event.event_id for d in got] == [lone.event_id]


async def test_a_parked_backlog_comes_back_in_order_once_its_head_is_done(bus: RedisBus) -> None:
    """The backlog parked out of the full buffer, and what is published of its conversation
    meanwhile, come back once its head is acked: every event once, in order, while another
    conversation went on beside it."""
    busy = conversation_on(bus)
    other = conversation_on(bus, avoid=bus.keys.shard_of(busy))
    await bus.publish([make_event(busy, n) for n in range(30)])
    labels = {"backend": "redis", "group": "g"}
    parks = REGISTRY.get_sample_value("switchboard_bus_buffer_parks_total", labels) or 0.0
    async with bus.subscribe(Subscription("g", "c", max_in_flight=2)) as consumer:
        [head] = await consumer.receive(10, 5.0)
        await consumer.nack(head.delivery_id, 1.5)
        await asyncio.sleep(0.5)  # the buffer fills with the backlog, and is parked
        await bus.publish([make_event(busy, n) for n in range(30, 40)])
        await bus.publish([make_event(other, 0)])
        seen: list[tuple[str, int, int]] = []
        async with asyncio.timeout(20):
            while sum(1 for c, _, _ in seen if c == busy) < 40:
                for d in await consumer.receive(10, 1.0):
                    seen.append((d.event.conversation_id, seq_of(d.event), d.attempt))
                    await consumer.ack([d.delivery_id])
    assert REGISTRY.get_sample_value("switchboard_bus_buffer_parks_total", labels) > parks
    assert seen[0] == (other, 0, 1)  # not behind the parked backlog
    assert [(n, attempt) for c, n, attempt in seen if c == busy] == [(0, 2)] + [
        (n, 1) for n in range(1, 40)
    ]


async def test_a_parked_backlog_goes_whole_and_in_order_to_the_next_consumer(
    bus: RedisBus,
) -> None:
    """A consumer leaves holding a parked backlog: the next one delivers the conversation
    once, in order, its head as the retry it was."""
    busy = conversation_on(bus)
    await bus.publish([make_event(busy, n) for n in range(30)])
    async with bus.subscribe(Subscription("g", "a", max_in_flight=2)) as a:
        [head] = await a.receive(10, 5.0)
        await a.nack(head.delivery_id, 60.0)
        async with asyncio.timeout(5):
            while not a._parked:  # noqa: ASYNC110 - the reader fills the buffer, then parks
                await asyncio.sleep(0.05)
    seen: list[tuple[int, int]] = []
    async with bus.subscribe(Subscription("g", "b", max_in_flight=2)) as b:
        async with asyncio.timeout(20):
            while len(seen) < 30:
                for d in await b.receive(10, 1.0):
                    seen.append((seq_of(d.event), d.attempt))
                    await b.ack([d.delivery_id])
    assert seen == [(0, 2)] + [(n, 1) for n in range(1, 30)]


async def test_the_memory_bus_does_deliver_the_other_conversation(tmp_path: object) -> None:
    # The same on the in-process bus.
    from gateway.store import SqliteStore, open_store

    store = open_store(f"sqlite:///{tmp_path}/bus.db")
    assert isinstance(store, SqliteStore)
    await store.open()
    await store.migrate()
    bus = MemoryBus(store)
    await bus.start()
    try:
        backlog = [make_event("busy", n) for n in range(30)]
        await bus.publish(backlog)
        async with bus.subscribe(Subscription("g", "c", max_in_flight=2)) as consumer:
            [head] = await consumer.receive(10, 5.0)
            await consumer.nack(head.delivery_id, 60.0)
            lone = make_event("other", 0)
            await bus.publish([lone])
            got = await consumer.receive(10, 3.0)
        assert [d.event.event_id for d in got] == [lone.event_id]
    finally:
        await bus.aclose()
        await store.aclose()


# ---------------------------------------------------------------------------------------
# An ack takes its deliveries out of flight only once Redis has taken it: one that fails
# (an entry id past 64 bits, Redis down) leaves them out, their conversations held.
# ---------------------------------------------------------------------------------------


async def test_an_ack_with_an_out_of_range_entry_id_acks_and_releases_nothing(
    bus: RedisBus,
) -> None:
    group = f"g{secrets.token_hex(3)}"
    conversation = conversation_on(bus)
    first, second = make_event(conversation, 0), make_event(conversation, 1)
    await bus.publish([first, second])
    async with bus.subscribe(Subscription(group, "c")) as consumer:
        [d1] = await consumer.receive(10, 2.0)
        assert d1.event.event_id == first.event_id
        too_big = "0/99999999999999999999-0/1"  # 20 digits, > 2**64 - 1
        from gateway.domain.errors import BusUnavailable, InvalidArgument

        with pytest.raises((InvalidArgument, BusUnavailable)) as refused:
            await consumer.ack([d1.delivery_id, too_big])
        # The first delivery is still out (unacked in Redis): its conversation must not go
        # on. And the parser's own promise: an entry id Redis would refuse is
        # INVALID_ARGUMENT, not a Redis failure.
        next_out = await consumer.receive(10, 0.5)
        names = {first.event_id: "first", second.event_id: "second"}
        outcome = (type(refused.value).__name__, [names[d.event.event_id] for d in next_out])
        assert outcome == ("InvalidArgument", [])


# ---------------------------------------------------------------------------------------
# A nack's delay holds across a rebalance: the shard waits for its retries, as for its
# deliveries in flight, before it moves.
# ---------------------------------------------------------------------------------------


def one_per_shard(bus: RedisBus) -> list[Event]:
    events: dict[int, Event] = {}
    run = secrets.token_hex(3)
    for n in itertools.count():
        name = f"conv-{run}-{n}"
        events.setdefault(bus.keys.shard_of(name), make_event(name, 0))
        if len(events) == SHARDS:
            return list(events.values())
    raise AssertionError


async def nack_one_per_shard(bus: RedisBus, consumer: Any, delay_s: float) -> list[Event]:
    """Publishes an event on each shard; ``consumer`` takes them all and nacks each."""
    events = one_per_shard(bus)
    await bus.publish(events)
    got: list[Delivery] = []
    async with asyncio.timeout(10):
        while len(got) < SHARDS:
            got.extend(await consumer.receive(100, 1.0))
    for d in got:
        await consumer.nack(d.delivery_id, delay_s)
    return events


async def test_a_nack_delay_holds_when_another_consumer_joins(bus: RedisBus) -> None:
    async with bus.subscribe(Subscription("g", "a")) as a:
        await nack_one_per_shard(bus, a, 30.0)  # retry in 30 s, not before
        async with bus.subscribe(Subscription("g", "b")) as b:
            # a gives b its share (heartbeats every 0.5 s), but not while retries wait.
            early = await b.receive(100, 2.5)
            assert len(a._held) == SHARDS
    assert [(d.event.conversation_id, d.attempt) for d in early] == []


async def test_nacked_entries_come_back_after_their_delay_from_whoever_owns_them(
    bus: RedisBus,
) -> None:
    """The shards b is to take wait for the retries; once due, each entry is delivered
    again (attempt 2) by the consumer that owns its shard then, none lost, none twice."""
    async with bus.subscribe(Subscription("g", "a")) as a:
        events = await nack_one_per_shard(bus, a, 1.0)
        async with bus.subscribe(Subscription("g", "b")) as b:
            again: list[tuple[str, Delivery]] = []

            async def take(name: str, consumer: object) -> None:
                while len(again) < SHARDS:
                    for d in await consumer.receive(100, 0.2):  # type: ignore[attr-defined]
                        again.append((name, d))
                        await consumer.ack([d.delivery_id])  # type: ignore[attr-defined]

            async with asyncio.timeout(15):
                await asyncio.gather(take("a", a), take("b", b))
    assert sorted(d.event.event_id for _, d in again) == sorted(e.event_id for e in events)
    assert {d.attempt for _, d in again} == {2}


async def test_an_ack_that_redis_fails_keeps_the_delivery_in_flight(
    bus: RedisBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same root cause with a transient failure (a reset connection): the flight is
    # gone although Redis never got the XACK. The next event of the conversation goes
    # out, and the first one, still pending, has no deadline left here: it comes back
    # only when the consumer closes, after the second (order broken).
    import redis.exceptions

    from gateway.bus.redis_consumer import RedisConsumer
    from gateway.domain.errors import BusUnavailable

    group = f"g{secrets.token_hex(3)}"
    conversation = conversation_on(bus)
    first, second = make_event(conversation, 0), make_event(conversation, 1)
    await bus.publish([first, second])
    async with bus.subscribe(Subscription(group, "c", ack_deadline_s=1.0)) as consumer:
        [d1] = await consumer.receive(10, 2.0)
        real = RedisConsumer._xack

        async def broken(self: RedisConsumer, by_shard: dict[int, list[str]]) -> None:
            raise redis.exceptions.ConnectionError("Connection reset by peer")

        monkeypatch.setattr(RedisConsumer, "_xack", broken)
        with pytest.raises(BusUnavailable):
            await consumer.ack([d1.delivery_id])
        monkeypatch.setattr(RedisConsumer, "_xack", real)
        # Past the first delivery's deadline: what comes next must be the first again.
        got: list[Delivery] = []
        async with asyncio.timeout(10):
            while not got:
                got = await consumer.receive(10, 0.5)
    names = {first.event_id: "first", second.event_id: "second"}
    assert [names[d.event.event_id] for d in got] == ["first"]


# ---------------------------------------------------------------------------------------
# After a read is cut off, the entries read again from our own pending list keep their
# attempt (and so a delivery id of their own).
# ---------------------------------------------------------------------------------------


async def test_a_redelivery_keeps_its_attempt_after_a_read_was_cut_off(
    bus: RedisBus, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import redis.asyncio

    from gateway.bus import redis_consumer as consumer_module

    caplog.set_level(logging.WARNING, logger=consumer_module.__name__)
    client: redis.asyncio.Redis = bus.client  # type: ignore[assignment]
    conversation = conversation_on(bus)
    first, second = make_event(conversation, 0), make_event(conversation, 1)
    await bus.publish([first, second])
    async with bus.subscribe(Subscription("g", "a")) as a:
        [d1] = await a.receive(10, 5.0)  # attempt 1, never acked
    assert d1.attempt == 1
    async with bus.subscribe(Subscription("g", "b")) as b:
        # b took the shard over: first (attempt 2) and second wait in its buffer.
        assert b._buffer.size == 2
        await cut_reader(b, client, caplog)
        await asyncio.sleep(0.3)  # the reload
        [again] = await b.receive(10, 5.0)
        await b.ack([again.delivery_id])
    assert again.event.event_id == first.event_id
    assert (again.attempt, again.delivery_id) != (1, d1.delivery_id)
    assert again.attempt == 2


# ---------------------------------------------------------------------------------------
# A consumer stalled past its deliveries' deadline (a Subscribe whose client stopped
# reading) leaves the group until it receives again: the others redeliver its deliveries and
# read its conversations meanwhile, as the in-process bus does.
# ---------------------------------------------------------------------------------------


async def _stalled_consumer_scenario(bus: object, events: list[Event]) -> list[Delivery]:
    sub = {"max_in_flight": 100, "ack_deadline_s": 1.0}
    async with (
        bus.subscribe(Subscription("g", "a", **sub)) as a,  # type: ignore[attr-defined]
        bus.subscribe(Subscription("g", "b", **sub)) as b,  # type: ignore[attr-defined]
    ):
        if isinstance(bus, RedisBus):
            async with asyncio.timeout(10):
                while not (a._active and b._active and len(a._held | b._held) == SHARDS):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                while a._draining or b._draining:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        await bus.publish(events)  # type: ignore[attr-defined]
        # b takes what it can and then stalls: no ack, no further receive.
        stalled: list[Delivery] = []
        async with asyncio.timeout(5):
            while not stalled:
                stalled = await b.receive(100, 0.5)
        # a works normally, acking what it gets, for well past b's ack deadline.
        got: list[Delivery] = []
        loop = asyncio.get_running_loop()
        until = loop.time() + 5.0
        while loop.time() < until:
            batch = await a.receive(100, 0.2)
            got.extend(batch)
            if batch:
                await a.ack([d.delivery_id for d in batch])
        stalled_ids = {d.event.event_id for d in stalled}
        return [d for d in got if d.event.event_id in stalled_ids]


async def test_a_stalled_consumers_expired_deliveries_go_to_another_consumer(
    bus: RedisBus,
) -> None:
    events = one_per_shard(bus)
    redelivered = await _stalled_consumer_scenario(bus, events)
    assert redelivered, "b's deliveries, 4 s past their 1 s deadline, never came again"
    assert all(d.attempt == 2 for d in redelivered)


async def test_the_memory_bus_redelivers_a_stalled_consumers_deliveries(
    tmp_path: object,
) -> None:
    bus = MemoryBus(None)
    await bus.start()
    try:
        events = [make_event(f"conv-{n}", 0) for n in range(SHARDS)]
        redelivered = await _stalled_consumer_scenario(bus, events)
    finally:
        await bus.aclose()
    assert redelivered
    assert all(d.attempt == 2 for d in redelivered)
