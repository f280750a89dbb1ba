"""The Redis consumer's stall detection, attempts after a cut-off read, and parking under
load: a healthy consumer is never taken for stalled, attempts survive a nacked retry in the
page read again, parked conversations keep their order, and the reader outlives any error
while fetching parked entries."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from gateway.bus import RedisBus
from gateway.domain.bus import Delivery, Subscription
from tests.bus.conftest import cut_reader, make_event
from tests.bus.test_redis_consumer_recovery import (  # noqa: F401 - fixture
    SHARDS,
    bus,
    conversation_on,
)

# ---------------------------------------------------------------------------------------
# A consumer holding a delivery well within its deadline, and only not calling receive
# right now, is not stalled, even when an older batch it acked long ago is still queued.
# ---------------------------------------------------------------------------------------


async def test_a_consumer_whose_only_expired_batch_was_acked_is_not_stalled(
    bus: RedisBus,  # noqa: F811
) -> None:
    sub = {"max_in_flight": 10, "ack_deadline_s": 4.0}
    async with (
        bus.subscribe(Subscription("g", "a", **sub)) as a,
        bus.subscribe(Subscription("g", "b", **sub)) as b,
    ):
        async with asyncio.timeout(10):
            while not (a._active and b._active and len(a._held | b._held) == SHARDS):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            while a._draining or b._draining:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        shard = min(a._active)
        first = make_event(conversation_on(bus, shard), 0)
        second = make_event(conversation_on(bus, shard), 0)
        await bus.publish([first])
        [d1] = await a.receive(10, 3.0)
        await a.ack([d1.delivery_id])  # done at once: nothing of this batch is out
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(3.2)  # idle, nothing out: a normal pause between receives
        await bus.publish([second])
        [d2] = await a.receive(10, 3.0)  # deadline: now + 4 s
        held_until = loop.time() + 4.0
        assert d2.event.event_id == second.event_id
        # a works on d2 for 2.5 s (well within its 4 s deadline) without calling receive.
        stolen: list[Delivery] = []
        while loop.time() < held_until - 0.8:
            stolen.extend(await b.receive(10, 0.2))
        info = {
            "a_active": sorted(a._active),
            "a_flights": len(a._flights),
            "since_start": round(loop.time() - started, 1),
        }
        await a.ack([d2.delivery_id])
    assert [d.event.event_id for d in stolen] == [], (
        f"b got a's unexpired delivery (attempt {[d.attempt for d in stolen]}); {info}"
    )


# ---------------------------------------------------------------------------------------
# After a cut-off read, the page read again from our own pending list keeps each entry's
# attempt, a nacked retry waiting in the same range included.
# ---------------------------------------------------------------------------------------


async def test_attempts_survive_a_cut_off_read_with_a_nacked_retry_in_between(
    bus: RedisBus,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    import redis.asyncio

    from gateway.bus import redis_consumer as consumer_module

    caplog.set_level(logging.WARNING, logger=consumer_module.__name__)
    client: redis.asyncio.Redis = bus.client  # type: ignore[assignment]
    shard = bus.keys.shard_of(conversation_on(bus))
    convs: list[str] = []
    while len(convs) < 3:
        c = conversation_on(bus, shard)
        if c not in convs:
            convs.append(c)
    events = [make_event(c, 0) for c in convs]
    await bus.publish(events)
    async with bus.subscribe(Subscription("g", "a")) as a:
        got: list[Delivery] = []
        async with asyncio.timeout(5):
            while len(got) < 3:
                got.extend(await a.receive(10, 1.0))
        assert {d.attempt for d in got} == {1}  # never acked
    first_ids = {d.event.event_id: d.delivery_id for d in got}
    async with bus.subscribe(Subscription("g", "b")) as b:
        # b took the shard over: all three wait in its buffer, each as attempt 2.
        assert b._buffer.size == 3
        out = await b.receive(2, 2.0)
        assert [d.event.event_id for d in out] == [e.event_id for e in events[:2]]
        # The second is nacked for later; the first stays out; the third stays buffered.
        await b.nack(out[1].delivery_id, 60.0)
        await cut_reader(b, client, caplog)
        await asyncio.sleep(0.3)  # the reload
        [third] = await b.receive(10, 5.0)
        await b.ack([out[0].delivery_id, third.delivery_id])
    assert third.event.event_id == events[2].event_id
    assert (third.attempt, third.delivery_id != first_ids[third.event.event_id]) == (2, True)


# ---------------------------------------------------------------------------------------
# Parking under load: several conversations with backlogs, heads nacked with short delays,
# a small buffer; every event once acked, in order per conversation, nothing lost.
# ---------------------------------------------------------------------------------------


async def _order_run(bus: RedisBus, *, consumers: int, seed: int) -> list[str]:  # noqa: F811
    import random

    from tests.bus.conftest import seq_of

    rng = random.Random(seed)
    convs = [conversation_on(bus) for _ in range(4)]
    per = 30
    events = [make_event(c, n) for n in range(per) for c in convs]
    await bus.publish(events)
    violations: list[str] = []
    next_expected = {c: 0 for c in convs}
    out: dict[str, tuple[str, Delivery]] = {}
    done = 0
    total = len(events)
    sub = {"max_in_flight": 2, "ack_deadline_s": 30.0}

    async def run(name: str, consumer: Any, until: float) -> None:
        nonlocal done
        loop = asyncio.get_running_loop()
        while done < total and loop.time() < until:
            for d in await consumer.receive(2, 0.1):
                c = d.event.conversation_id
                if c in out:
                    violations.append(f"{c}: two out ({out[c][1].delivery_id}, {d.delivery_id})")
                if seq_of(d.event) != next_expected[c]:
                    violations.append(f"{c}: got {seq_of(d.event)}, want {next_expected[c]}")
                out[c] = (name, d)
            mine = [(c, d) for c, (n, d) in list(out.items()) if n == name]
            for c, d in mine:
                r = rng.random()
                if r < 0.45:
                    del out[c]
                    await consumer.nack(d.delivery_id, rng.choice([0.0, 0.2, 0.4]))
                elif r < 0.8:
                    del out[c]
                    next_expected[c] = max(next_expected[c], seq_of(d.event) + 1)
                    done += 1
                    await consumer.ack([d.delivery_id])
            await asyncio.sleep(rng.choice([0, 0, 0.01, 0.05]))

    loop = asyncio.get_running_loop()
    async with bus.subscribe(Subscription("g", "a", **sub)) as a:
        if consumers == 1:
            await run("a", a, loop.time() + 40)
        else:
            await run("a", a, loop.time() + 1.5)
            async with bus.subscribe(Subscription("g", "b", **sub)) as b:
                end = loop.time() + 40
                await asyncio.gather(run("a", a, end), run("b", b, end))
    if done < total:
        violations.append(f"only {done} of {total} acked; left {next_expected}")
    return violations


@pytest.mark.parametrize("seed", [1])
async def test_parking_keeps_order_one_consumer(bus: RedisBus, seed: int) -> None:  # noqa: F811
    assert await _order_run(bus, consumers=1, seed=seed) == []


@pytest.mark.parametrize("seed", [1])
async def test_parking_keeps_order_two_consumers(bus: RedisBus, seed: int) -> None:  # noqa: F811
    assert await _order_run(bus, consumers=2, seed=seed) == []


# ---------------------------------------------------------------------------------------
# An error of any kind while fetching parked entries is logged and retried: the reader
# goes on, or its shards would stay leased and never be read again.
# ---------------------------------------------------------------------------------------


async def test_an_odd_error_while_fetching_parked_entries_does_not_kill_the_reader(
    bus: RedisBus,  # noqa: F811
) -> None:
    busy = conversation_on(bus)
    other = conversation_on(bus, avoid=bus.keys.shard_of(busy))
    await bus.publish([make_event(busy, n) for n in range(30)])
    async with bus.subscribe(Subscription("g", "c", max_in_flight=2)) as consumer:
        [head] = await consumer.receive(10, 5.0)
        await consumer.nack(head.delivery_id, 1.0)
        async with asyncio.timeout(5):
            while not consumer._parked:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        real = consumer._r
        failed: list[str] = []

        class Pipe:
            def __init__(self, pipe: Any) -> None:
                self._pipe = pipe

            def __getattr__(self, name: str) -> Any:
                return getattr(self._pipe, name)

            def xrange(self, *args: Any, **kwargs: Any) -> Any:
                self._xrange = True
                return self._pipe.xrange(*args, **kwargs)

            async def execute(self, *args: Any, **kwargs: Any) -> Any:
                if getattr(self, "_xrange", False) and not failed:
                    failed.append("refill")
                    raise ConnectionResetError(104, "Connection reset by peer")
                return await self._pipe.execute(*args, **kwargs)

        class Client:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def pipeline(self, *args: Any, **kwargs: Any) -> Any:
                return Pipe(real.pipeline(*args, **kwargs))

        consumer._r = Client()  # type: ignore[assignment]
        # The retry comes back; acked, its conversation may go on: the refill runs (and fails
        # once).
        [again] = await consumer.receive(10, 5.0)
        await consumer.ack([again.delivery_id])
        async with asyncio.timeout(5):
            while not failed:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        lone = make_event(other, 0)
        await bus.publish([lone])
        got: list[Delivery] = []
        async with asyncio.timeout(8):
            while not any(d.event.event_id == lone.event_id for d in got):
                batch = await consumer.receive(10, 1.0)
                if not batch and all(t.done() for t in consumer._tasks[:-1]):
                    break
                got.extend(batch)
                if batch:
                    await consumer.ack([d.delivery_id for d in batch])
        readers = [t for t in consumer._tasks if t.get_name().startswith("bus-read")]
        dead = [t.exception() for t in readers if t.done()]
    assert dead == []
    assert any(d.event.event_id == lone.event_id for d in got)
