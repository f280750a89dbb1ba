"""Event bus benchmark: publish rate, group delivery rate, delivery latency.

For each backend (``redis``: the Redis Streams bus on a redis-server started here;
``memory``: the in-process bus), it prints one JSON line per figure:

- ``published_per_s``: events appended per second (batches of 100);
- ``delivered_per_s`` with ``consumers`` 1 and 4: publish-to-ack rate of the whole group,
  from the first publish until the group lag is 0; Redis consumers run in separate
  processes (one each), the in-process bus's in its own process by definition;
- ``p50_ms`` / ``p99_ms``: publish-to-delivery latency at a steady ``offered_per_s``;
- the ceilings measured in the same run and the ratios to them: for Redis, bare redis-py
  (pipelined XADD; XREADGROUP COUNT 100 + XACK); for the in-process bus, a bare
  ``asyncio.Queue`` carrying the same events to one consumer taking 100 at a time.

Every figure is the median of ``runs`` runs (3 with ``--quick``, 5 otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

import redis.asyncio

from bench._common import emit, median, percentile, redis_server
from gateway.bus import MemoryBus, RedisBus
from gateway.domain.bus import Bus, Consumer, Subscription
from gateway.domain.codec import encode_event
from gateway.domain.events import Event, EventKind, new_event

BENCH = "bus"
CONVERSATIONS = 1000
LEASE_TTL_S = 1.0


def _event(n: int) -> Event:
    now = datetime.now(UTC)
    return new_event(
        tenant_id="tenant_1",
        connection_id="conn_01jbench0000000000000000",
        channel="instagram",
        kind=EventKind.MESSAGE_RECEIVED,
        occurred_at=now,
        received_at=now,
        conversation_id=f"conv_{n % CONVERSATIONS:06d}",
        payload={
            "message": {"id": f"msg_{n}", "text": "x" * 120, "direction": "DIRECTION_INBOUND"},
            "t": time.time(),
        },
    )


def _fresh_prefix() -> str:
    """Each measurement on its own streams, so no group starts with an earlier backlog."""
    return f"bench:{secrets.token_hex(4)}:"


def _redis_bus(url: str, prefix: str) -> RedisBus:
    return RedisBus(url, key_prefix=prefix, lease_ttl_s=LEASE_TTL_S, block_ms=200)


# ---- consumers (a separate process for Redis) ----


async def _consume(
    consumer: Consumer, stop: MpEvent | asyncio.Event, latencies: list[float] | None
) -> int:
    count = 0
    while not stop.is_set():
        batch = await consumer.receive(500, 0.1)
        if not batch:
            continue
        if latencies is not None:
            now = time.time()
            latencies.extend(now - d.event.payload["t"] for d in batch)
        await consumer.ack([d.delivery_id for d in batch])
        count += len(batch)
    return count


def _consumer_process(
    url: str, prefix: str, group: str, name: str, ready: Any, stop: MpEvent, results: Any
) -> None:
    async def main() -> None:
        bus = _redis_bus(url, prefix)
        await bus.start()
        latencies: list[float] = []
        sub = Subscription(group, name, max_in_flight=1000, ack_deadline_s=60.0)
        async with bus.subscribe(sub) as consumer:
            ready.put(name)
            await _consume(consumer, stop, latencies)
        await bus.aclose()
        results.put(latencies)

    asyncio.run(main())


class _RedisConsumers:
    def __init__(self, url: str, prefix: str, group: str, count: int) -> None:
        ctx = mp.get_context("spawn")
        self._ready = ctx.Queue()
        self._results = ctx.Queue()
        self._stop = ctx.Event()
        self._procs = [
            ctx.Process(
                target=_consumer_process,
                args=(url, prefix, group, f"c{i}", self._ready, self._stop, self._results),
            )
            for i in range(count)
        ]

    async def start(self) -> None:
        for proc in self._procs:
            proc.start()
        for _ in self._procs:
            await asyncio.to_thread(self._ready.get, True, 60)
        if len(self._procs) > 1:
            await asyncio.sleep(LEASE_TTL_S * 1.5)  # shards spread over the consumers

    async def stop(self) -> list[float]:
        self._stop.set()
        latencies: list[float] = []
        for _ in self._procs:
            latencies.extend(await asyncio.to_thread(self._results.get, True, 60))
        for proc in self._procs:
            proc.join(10)
        return latencies


# ---- the figures ----


async def _publish_rate(bus: Bus, n: int) -> float:
    events = [_event(i) for i in range(n)]
    start = time.perf_counter()
    for i in range(0, n, 100):
        await bus.publish(events[i : i + 100])
    return n / (time.perf_counter() - start)


async def _wait_lag_zero(bus: Bus, group: str, within_s: float) -> None:
    give_up = time.monotonic() + within_s
    while await bus.group_lag(group) > 0:
        if time.monotonic() > give_up:
            raise SystemExit(f"bench: group {group} did not catch up in {within_s} s")
        await asyncio.sleep(0.005)


async def _delivery_rate_redis(url: str, consumers: int, n: int) -> float:
    prefix = _fresh_prefix()
    bus = _redis_bus(url, prefix)
    await bus.start()
    group = f"g{secrets.token_hex(3)}"
    try:
        await bus.ensure_group(group)
        procs = _RedisConsumers(url, prefix, group, consumers)
        await procs.start()
        events = [_event(i) for i in range(n)]
        start = time.perf_counter()
        for i in range(0, n, 100):
            await bus.publish(events[i : i + 100])
        await _wait_lag_zero(bus, group, 120)
        rate = n / (time.perf_counter() - start)
        await procs.stop()
        return rate
    finally:
        await bus.aclose()


async def _latency_redis(url: str, offered: int, seconds: float) -> list[float]:
    prefix = _fresh_prefix()
    bus = _redis_bus(url, prefix)
    await bus.start()
    group = f"g{secrets.token_hex(3)}"
    try:
        await bus.ensure_group(group)
        procs = _RedisConsumers(url, prefix, group, 1)
        await procs.start()
        await _offer(bus, offered, seconds)
        await _wait_lag_zero(bus, group, 60)
        return await procs.stop()
    finally:
        await bus.aclose()


async def _offer(bus: Bus, offered: int, seconds: float) -> None:
    """Publishes at a steady rate: every millisecond-ish tick, the events now due."""
    total = int(offered * seconds)
    start = time.perf_counter()
    sent = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - start) * offered) + 1)
        if due > sent:
            await bus.publish([_event(i) for i in range(sent, due)])
            sent = due
        await asyncio.sleep(0.001)


async def _delivery_rate_memory(consumers: int, n: int) -> float:
    bus = MemoryBus(None)
    await bus.start()
    stop = asyncio.Event()
    group = "g"
    subs = [Subscription(group, f"c{i}", max_in_flight=1000) for i in range(consumers)]
    try:
        async with _MemoryConsumers(bus, subs, stop, None):
            events = [_event(i) for i in range(n)]
            start = time.perf_counter()
            for i in range(0, n, 100):
                await bus.publish(events[i : i + 100])
                await asyncio.sleep(0)
            await _wait_lag_zero(bus, group, 120)
            return n / (time.perf_counter() - start)
    finally:
        await bus.aclose()


async def _latency_memory(offered: int, seconds: float) -> list[float]:
    bus = MemoryBus(None)
    await bus.start()
    stop = asyncio.Event()
    latencies: list[float] = []
    try:
        sub = Subscription("g", "c0", max_in_flight=1000)
        async with _MemoryConsumers(bus, [sub], stop, latencies):
            await _offer(bus, offered, seconds)
            await _wait_lag_zero(bus, "g", 60)
    finally:
        await bus.aclose()
    return latencies


class _MemoryConsumers:
    def __init__(
        self,
        bus: MemoryBus,
        subs: Sequence[Subscription],
        stop: asyncio.Event,
        latencies: list[float] | None,
    ) -> None:
        self._bus, self._subs, self._stop, self._latencies = bus, subs, stop, latencies
        self._tasks: list[asyncio.Task[int]] = []

    async def __aenter__(self) -> None:
        for sub in self._subs:
            self._tasks.append(asyncio.create_task(self._run(sub)))
        await asyncio.sleep(0)

    async def _run(self, sub: Subscription) -> int:
        async with self._bus.subscribe(sub) as consumer:
            return await _consume(consumer, self._stop, self._latencies)

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


# ---- ceilings: bare redis-py, same payload ----


async def _ceiling_publish(url: str, n: int) -> float:
    client = redis.asyncio.Redis.from_url(url)
    stream = f"ceiling:{secrets.token_hex(3)}"
    payloads = [encode_event(_event(i)) for i in range(n)]
    try:
        start = time.perf_counter()
        for i in range(0, n, 100):
            pipe = client.pipeline(transaction=False)
            for payload in payloads[i : i + 100]:
                pipe.xadd(stream, {b"e": payload}, maxlen=200_000, approximate=True)
            await pipe.execute()
        rate = n / (time.perf_counter() - start)
        await client.delete(stream)
        return rate
    finally:
        await client.aclose()


async def _ceiling_deliver(url: str, n: int) -> float:
    client = redis.asyncio.Redis.from_url(url)
    stream = f"ceiling:{secrets.token_hex(3)}"
    try:
        await client.xgroup_create(stream, "g", id="0", mkstream=True)
        for i in range(0, n, 100):
            pipe = client.pipeline(transaction=False)
            for j in range(i, min(n, i + 100)):
                pipe.xadd(stream, {b"e": encode_event(_event(j))})
            await pipe.execute()
        done = 0
        start = time.perf_counter()
        while done < n:
            reply: Any = await client.xreadgroup("g", "c", {stream: ">"}, count=100, block=100)
            ids = [entry_id for _, entries in reply for entry_id, _ in entries]
            await client.xack(stream, "g", *ids)
            done += len(ids)
        rate = n / (time.perf_counter() - start)
        await client.delete(stream)
        return rate
    finally:
        await client.aclose()


# ---- ceilings of the in-process bus: a bare asyncio.Queue, same events ----


async def _ceiling_memory_publish(n: int) -> float:
    queue: asyncio.Queue[Event] = asyncio.Queue()
    events = [_event(i) for i in range(n)]
    start = time.perf_counter()
    for i in range(0, n, 100):
        for event in events[i : i + 100]:
            queue.put_nowait(event)
        await asyncio.sleep(0)
    return n / (time.perf_counter() - start)


async def _ceiling_memory_deliver(n: int) -> float:
    """One consumer taking up to 100 at a time, as the bus's consumers do."""
    queue: asyncio.Queue[Event] = asyncio.Queue()
    events = [_event(i) for i in range(n)]
    done = 0

    async def consume() -> None:
        nonlocal done
        while done < n:
            batch = [await queue.get()]
            while len(batch) < 100 and not queue.empty():
                batch.append(queue.get_nowait())
            done += len(batch)

    consumer = asyncio.create_task(consume())
    start = time.perf_counter()
    for i in range(0, n, 100):
        for event in events[i : i + 100]:
            queue.put_nowait(event)
        await asyncio.sleep(0)
    await consumer
    return n / (time.perf_counter() - start)


# ---- driver ----


async def _bench_redis(url: str, runs: int, n: int, offered: int, seconds: float) -> None:
    published, ceiling_pub, ceiling_del = [], [], []
    delivered: dict[int, list[float]] = {1: [], 4: []}
    p50, p99 = [], []
    for _ in range(runs):
        bus = _redis_bus(url, _fresh_prefix())
        await bus.start()
        published.append(await _publish_rate(bus, n))
        await bus.aclose()
        ceiling_pub.append(await _ceiling_publish(url, n))
        ceiling_del.append(await _ceiling_deliver(url, n))
        for consumers in delivered:
            delivered[consumers].append(await _delivery_rate_redis(url, consumers, n))
        latencies = await _latency_redis(url, offered, seconds)
        p50.append(percentile(latencies, 0.50) * 1000)
        p99.append(percentile(latencies, 0.99) * 1000)
    common = {"runs": runs, "events": n}
    emit(BENCH, "redis", "published_per_s", median(published), "events/s", **common)
    emit(BENCH, "redis", "ceiling_published_per_s", median(ceiling_pub), "events/s", **common)
    ratio = median(published) / median(ceiling_pub)
    emit(BENCH, "redis", "ratio_to_ceiling", ratio, "ratio", of="published_per_s", **common)
    emit(BENCH, "redis", "ceiling_delivered_per_s", median(ceiling_del), "events/s", **common)
    for consumers, rates in delivered.items():
        emit(
            BENCH, "redis", "delivered_per_s", median(rates), "events/s",
            consumers=consumers, **common,
        )  # fmt: skip
        ratio = median(rates) / median(ceiling_del)
        emit(
            BENCH, "redis", "ratio_to_ceiling", ratio, "ratio",
            of="delivered_per_s", consumers=consumers, **common,
        )  # fmt: skip
    lat = {"runs": runs, "offered_per_s": offered, "seconds": seconds}
    emit(BENCH, "redis", "p50_ms", median(p50), "ms", **lat)
    emit(BENCH, "redis", "p99_ms", median(p99), "ms", **lat)


async def _bench_memory(runs: int, n: int, offered: int, seconds: float) -> None:
    published, ceiling_pub, ceiling_del = [], [], []
    delivered: dict[int, list[float]] = {1: [], 4: []}
    p50, p99 = [], []
    for _ in range(runs):
        bus = MemoryBus(None)
        await bus.start()
        published.append(await _publish_rate(bus, n))
        await bus.aclose()
        ceiling_pub.append(await _ceiling_memory_publish(n))
        ceiling_del.append(await _ceiling_memory_deliver(n))
        for consumers in delivered:
            delivered[consumers].append(await _delivery_rate_memory(consumers, n))
        latencies = await _latency_memory(offered, seconds)
        p50.append(percentile(latencies, 0.50) * 1000)
        p99.append(percentile(latencies, 0.99) * 1000)
    # One process by design: no store behind it here, so the figures are the bus alone.
    common = {"runs": runs, "events": n, "process": "single", "store": "none"}
    emit(BENCH, "memory", "published_per_s", median(published), "events/s", **common)
    emit(BENCH, "memory", "ceiling_published_per_s", median(ceiling_pub), "events/s", **common)
    ratio = median(published) / median(ceiling_pub)
    emit(BENCH, "memory", "ratio_to_ceiling", ratio, "ratio", of="published_per_s", **common)
    emit(BENCH, "memory", "ceiling_delivered_per_s", median(ceiling_del), "events/s", **common)
    for consumers, rates in delivered.items():
        emit(
            BENCH, "memory", "delivered_per_s", median(rates), "events/s",
            consumers=consumers, **common,
        )  # fmt: skip
        ratio = median(rates) / median(ceiling_del)
        emit(
            BENCH, "memory", "ratio_to_ceiling", ratio, "ratio",
            of="delivered_per_s", consumers=consumers, **common,
        )  # fmt: skip
    lat = {"runs": runs, "offered_per_s": offered, "seconds": seconds, "process": "single"}
    emit(BENCH, "memory", "p50_ms", median(p50), "ms", **lat)
    emit(BENCH, "memory", "p99_ms", median(p99), "ms", **lat)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bus", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--backend", choices=["redis", "memory", "both"], default="both")
    args = parser.parse_args()
    runs, n, seconds = (3, 10_000, 2.0) if args.quick else (5, 50_000, 10.0)
    offered = 1000
    if args.backend in ("memory", "both"):
        asyncio.run(_bench_memory(runs, n, offered, seconds))
    if args.backend in ("redis", "both"):
        with redis_server() as url:
            asyncio.run(_bench_redis(url, runs, n, offered, seconds))


if __name__ == "__main__":
    main()
