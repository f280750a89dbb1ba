"""One consumer's session on the Redis bus: shard leases, reading, hold-back, redelivery.

See :mod:`gateway.bus.redis` for the design. In short: the consumer keeps a heartbeat in
the group's member set, computes which shards are its share (round-robin over the sorted
live members), takes each shard's lease (``SET NX PX``) and keeps renewing it. A shard it
takes over starts with ``XAUTOCLAIM`` of everything pending there (the previous owner's
unacked work, delivered again with attempt + 1) before new entries (``XREADGROUP >``).
A shard that is no longer its share is drained: no more reads, buffered entries stay
pending for the next owner, and the lease is released when its deliveries are acked or
their deadline passed, so the next owner never overlaps with an unacked delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from gateway.bus import metrics
from gateway.bus.holdback import HoldbackQueue
from gateway.domain.bus import Delivery, Subscription
from gateway.domain.codec import decode_event
from gateway.domain.errors import BusUnavailable, InvalidArgument
from gateway.domain.events import Event
from gateway.redis_client import REDIS_ERRORS, RedisClient, is_cluster

if TYPE_CHECKING:
    from gateway.bus.redis import RedisBus

log = logging.getLogger(__name__)

BACKEND = "redis"
FIELD = b"e"

# Renews or releases a lease only while this consumer still holds it.
RENEW_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


@dataclass(slots=True, eq=False)
class _Item:
    shard: int
    entry_id: str
    event: Event
    deliveries: int  # Redis's delivery count for this entry, once handed out


@dataclass(slots=True, eq=False)
class _Flight:
    item: _Item
    delivery_id: str
    deadline: float


def _delivery_id(item: _Item) -> str:
    return f"{item.shard}/{item.entry_id}/{item.deliveries}"


def _parse_delivery_id(delivery_id: str) -> tuple[int, str]:
    try:
        shard, entry_id, _ = delivery_id.split("/")
        return int(shard), entry_id
    except ValueError:
        raise InvalidArgument("delivery_id", f"not a delivery id: {delivery_id!r}") from None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisConsumer:
    def __init__(self, bus: RedisBus, subscription: Subscription) -> None:
        self._bus = bus
        self._r: RedisClient = bus.client
        self._cluster: RedisCluster | None = self._r if is_cluster(self._r) else None
        self._read_groups = bus.read_groups()
        self._keys = bus.keys
        self._sub = subscription
        self._group = subscription.group
        # Unique per session: a client reconnecting under the same name must not be
        # mistaken for its previous session, whose pending entries others will claim.
        self.name = f"{subscription.consumer}:{secrets.token_hex(4)}"
        self._labels = (BACKEND, subscription.group)
        self._lease_ms = int(bus.lease_ttl_s * 1000)
        self._active: set[int] = set()
        self._held: set[int] = set()
        self._draining: dict[int, float] = {}
        self._buffer: HoldbackQueue[_Item] = HoldbackQueue()
        self._buffer_limit = max(bus.read_count * 2, subscription.max_in_flight * 4)
        self._flights: dict[tuple[int, str], _Flight] = {}
        self._deadlines: list[tuple[float, int, str, str]] = []
        self._delayed: list[tuple[float, int, _Item]] = []
        self._tiebreak = itertools.count()
        self._wake = asyncio.Event()
        self._reader_wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # ---- lifetime ----
    async def start(self) -> None:
        try:
            await self._rebalance()
        except REDIS_ERRORS as exc:
            raise BusUnavailable(f"redis: {exc.__class__.__name__}") from exc
        self._tasks = [
            *(
                asyncio.create_task(self._read_loop(shards), name=f"bus-read-{self.name}")
                for shards in self._read_groups
            ),
            asyncio.create_task(self._keep_loop(), name=f"bus-keep-{self.name}"),
        ]

    async def aclose(self) -> None:
        if self._closed:
            return
        await self._stop_tasks()
        gone = len(self._flights)
        metrics.IN_FLIGHT.labels(*self._labels).dec(gone)
        if gone:
            metrics.EVENTS_REDELIVERED.labels(*self._labels, metrics.REASON_CONSUMER_GONE).inc(gone)
        self._flights.clear()
        # Our pending entries stay in the group's PEL; releasing the leases and leaving
        # the member set lets the next owner claim them at its next heartbeat.
        try:
            await self._unread({shard: self._give_up(shard) for shard in self._held})
            pipe = self._r.pipeline(transaction=False)
            for shard in self._held:
                pipe.eval(RELEASE_LUA, 1, self._keys.lease(self._group, shard), self.name)
            pipe.zrem(self._keys.members(self._group), self.name)
            await pipe.execute()
        except REDIS_ERRORS:
            # The leases expire on their own; only the handover is slower.
            log.warning("bus consumer could not release its leases", exc_info=True)
        self._held.clear()
        self._active.clear()

    async def _stop_tasks(self) -> None:
        """Lets the loops finish their current Redis call rather than cancelling it:
        a reply cut off mid-read would leave entries pending under our name unseen."""
        self._closed = True
        self._stopping.set()
        self._reader_wake.set()
        self._notify()
        if self._tasks:
            grace = self._bus.block_ms / 1000 + 1.0
            _, late = await asyncio.wait(self._tasks, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- the Consumer protocol ----
    async def receive(self, max_count: int, timeout_s: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while not self._closed:
            await self._run_timers()
            out = self._take(max_count)
            if out:
                return out
            now = loop.time()
            if now >= give_up:
                return []
            wait = give_up - now
            timer = self._next_timer()
            if timer is not None:
                wait = min(wait, max(timer - time.monotonic(), 0.0) + 0.001)
            waiter = self._wake
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), wait)
        return []

    async def ack(self, delivery_ids: Sequence[str]) -> None:
        by_shard: dict[int, list[str]] = defaultdict(list)
        acked = 0
        for delivery_id in delivery_ids:
            shard, entry_id = _parse_delivery_id(delivery_id)
            # Acked even when no longer in flight here: the work is done either way.
            by_shard[shard].append(entry_id)
            flight = self._flights.pop((shard, entry_id), None)
            if flight is not None:
                acked += 1
                self._buffer.release(flight.item.event.ordering_key)
        if not by_shard:
            return
        try:
            pipe = self._r.pipeline(transaction=False)
            for shard, ids in by_shard.items():
                pipe.xack(self._keys.stream(shard), self._group, *ids)
            await pipe.execute()
        except REDIS_ERRORS as exc:
            raise BusUnavailable(f"redis: {exc.__class__.__name__}") from exc
        finally:
            if acked:
                metrics.EVENTS_ACKED.labels(*self._labels).inc(acked)
                metrics.IN_FLIGHT.labels(*self._labels).dec(acked)
                self._notify()

    async def nack(self, delivery_id: str, delay_s: float = 0.0) -> None:
        shard, entry_id = _parse_delivery_id(delivery_id)
        flight = self._flights.pop((shard, entry_id), None)
        if flight is None:
            return
        metrics.IN_FLIGHT.labels(*self._labels).dec()
        metrics.EVENTS_REDELIVERED.labels(*self._labels, metrics.REASON_NACK).inc()
        # The key stays busy until the retry is due, so later entries wait behind it.
        self._buffer.hold(flight.item.event.ordering_key)
        due = time.monotonic() + max(delay_s, 0.0)
        heapq.heappush(self._delayed, (due, next(self._tiebreak), flight.item))
        self._notify()

    # ---- handing out ----
    def _take(self, max_count: int) -> list[Delivery]:
        room = min(max_count, self._sub.max_in_flight - len(self._flights))
        out: list[Delivery] = []
        deadline = time.monotonic() + self._sub.ack_deadline_s
        while len(out) < room:
            popped = self._buffer.pop()
            if popped is None:
                break
            _, item = popped
            delivery_id = _delivery_id(item)
            self._flights[(item.shard, item.entry_id)] = _Flight(item, delivery_id, deadline)
            heapq.heappush(self._deadlines, (deadline, item.shard, item.entry_id, delivery_id))
            out.append(Delivery(delivery_id=delivery_id, attempt=item.deliveries, event=item.event))
        if out:
            metrics.EVENTS_DELIVERED.labels(*self._labels).inc(len(out))
            metrics.IN_FLIGHT.labels(*self._labels).inc(len(out))
            if self._buffer.size < self._buffer_limit // 2:
                self._reader_wake.set()
        return out

    def _next_timer(self) -> float | None:
        times = [q[0][0] for q in (self._deadlines, self._delayed) if q]
        return min(times) if times else None

    async def _run_timers(self) -> None:
        now = time.monotonic()
        due: list[tuple[_Item, str]] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, shard, entry_id, delivery_id = heapq.heappop(self._deadlines)
            flight = self._flights.get((shard, entry_id))
            if flight is None or flight.delivery_id != delivery_id:
                continue  # acked or nacked since
            del self._flights[(shard, entry_id)]
            metrics.IN_FLIGHT.labels(*self._labels).dec()
            due.append((flight.item, metrics.REASON_DEADLINE))
        while self._delayed and self._delayed[0][0] <= now:
            _, _, item = heapq.heappop(self._delayed)
            due.append((item, metrics.REASON_NACK))
        if due:
            await self._redeliver(due)

    async def _redeliver(self, due: list[tuple[_Item, str]]) -> None:
        """Claims the entries again (Redis counts the delivery) and puts each back at the
        head of its key; entries acked meanwhile, trimmed, or on a shard given up are
        dropped and free their key."""
        mine = [(item, reason) for item, reason in due if item.shard in self._active]
        for item, _ in due:
            if item.shard not in self._active:
                self._buffer.release(item.event.ordering_key)
        if not mine:
            return
        by_shard: dict[int, list[str]] = defaultdict(list)
        for item, _ in mine:
            by_shard[item.shard].append(item.entry_id)
        try:
            pipe = self._r.pipeline(transaction=False)
            shards = list(by_shard)
            for shard in shards:
                # Without JUSTID, so that Redis counts the delivery.
                ids: list[Any] = by_shard[shard]
                pipe.xclaim(self._keys.stream(shard), self._group, self.name, 0, ids)
            results = await pipe.execute()
        except REDIS_ERRORS:
            # Keep them due; the next receive tries again.
            log.warning("bus redelivery claim failed", exc_info=True)
            for item, _ in mine:
                heapq.heappush(self._delayed, (time.monotonic() + 0.1, next(self._tiebreak), item))
            return
        still = {
            (shard, _text(entry[0]))
            for shard, entries in zip(shards, results, strict=True)
            for entry in entries
        }
        for item, reason in mine:
            key = item.event.ordering_key
            if (item.shard, item.entry_id) in still:
                item.deliveries += 1
                self._buffer.push_front(key, item)
                if reason == metrics.REASON_DEADLINE:
                    metrics.EVENTS_REDELIVERED.labels(*self._labels, reason).inc()
            else:
                self._buffer.release(key)
        self._notify()

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    # ---- reading ----
    async def _read_loop(self, shards: frozenset[int]) -> None:
        """Reads the owned shards among ``shards`` (one ``XREADGROUP`` may name them all)
        into the buffer, for as long as the consumer lives."""
        backoff = 0.05
        resync = False
        while not self._closed:
            if self._active.isdisjoint(shards) or self._buffer.size >= self._buffer_limit:
                self._reader_wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._reader_wake.wait(), self._bus.block_ms / 1000)
                continue
            try:
                if resync:
                    await self._reload_own_pending(self._active & shards)
                    resync = False
                await self._read_once(shards)
                backoff = 0.05
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    await self._bus.ensure_group(self._group, force=True)
                else:
                    log.warning("bus read failed", exc_info=True)
                    await asyncio.sleep(backoff)
            except Exception:
                # Any error, not only Redis's: during a failover the cluster client also
                # lets others through (redis-py 8.1: an AttributeError on a connection
                # another task disconnected mid-handshake). A reader that died here would
                # leave its slot's shards unread for good, their leases still renewed.
                # The reply of a lost read may have been entries now pending under our
                # name that we never saw: reload them before reading on.
                log.warning("bus read failed, retrying", exc_info=True)
                resync = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _read_once(self, shards: frozenset[int]) -> None:
        active = self._active & shards
        if not active:
            return
        streams: dict[Any, Any] = {self._keys.stream(s): ">" for s in sorted(active)}
        room = self._buffer_limit - self._buffer.size
        if len(self._read_groups) > 1:
            # The readers of other slots fill the same buffer: each takes its share.
            readers = sum(1 for group in self._read_groups if not group.isdisjoint(self._active))
            room = max(1, room // max(readers, 1))
        count = min(self._bus.read_count, room)
        reply = await self._xreadgroup(streams, count=count, block=self._bus.block_ms)
        if reply:
            self._accept(reply, deliveries=1)

    async def _xreadgroup(self, streams: dict[Any, Any], *, count: int, block: int | None) -> Any:
        if self._cluster is None:
            return await self._r.xreadgroup(
                self._group, self.name, streams, count=count, block=block
            )
        # Straight to the node that serves the streams' slot: left to route the command
        # itself, the cluster client asks a node COMMAND GETKEYS before every read
        # (XREADGROUP's keys are "movable"), and it retries a read whose reply was lost,
        # which would hide the entries that read left pending under our name. A MOVED
        # reply is still followed.
        node = self._cluster.get_node_from_key(next(iter(streams)))
        args: list[Any] = ["GROUP", self._group, self.name, "COUNT", count]
        if block is not None:
            args += ["BLOCK", block]
        return await self._cluster.execute_command(
            "XREADGROUP", *args, "STREAMS", *streams, *streams.values(), target_nodes=node
        )

    def _accept(self, reply: Any, *, deliveries: int) -> None:
        filtered: dict[int, list[str]] = defaultdict(list)
        added = 0
        for stream_name, entries in reply:
            shard = self._keys.shard_from_stream(_text(stream_name))
            if shard not in self._active:
                continue  # given up meanwhile: stays pending for the next owner
            for raw_id, fields in entries:
                if not fields:
                    continue  # trimmed while pending
                entry_id = _text(raw_id)
                if (shard, entry_id) in self._flights:
                    continue
                event = decode_event(fields[FIELD])
                if not self._sub.matches(event):
                    filtered[shard].append(entry_id)
                    continue
                self._buffer.push(event.ordering_key, _Item(shard, entry_id, event, deliveries))
                added += 1
        if filtered:
            metrics.EVENTS_FILTERED.labels(*self._labels).inc(sum(map(len, filtered.values())))
            task = asyncio.create_task(self._ack_filtered(filtered))
            self._bus.track(task)
        if added:
            self._notify()

    async def _ack_filtered(self, filtered: dict[int, list[str]]) -> None:
        try:
            pipe = self._r.pipeline(transaction=False)
            for shard, ids in filtered.items():
                pipe.xack(self._keys.stream(shard), self._group, *ids)
            await pipe.execute()
        except REDIS_ERRORS:
            # They stay pending and come back to whoever owns the shard next.
            log.warning("bus could not ack filtered entries", exc_info=True)

    async def _reload_own_pending(self, shards: set[int]) -> None:
        """Rebuilds the buffer from this consumer's own pending entries (history read)."""
        self._buffer.remove_if(lambda item: item.shard in shards)
        for shard in sorted(shards):
            start = "0"
            while True:
                reply = await self._xreadgroup(
                    {self._keys.stream(shard): start}, count=500, block=None
                )
                entries = reply[0][1] if reply else []
                if not entries:
                    break
                self._accept(reply, deliveries=1)
                start = _text(entries[-1][0])

    # ---- membership, leases, rebalancing ----
    async def _keep_loop(self) -> None:
        interval = self._bus.lease_ttl_s / 4
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)
            if self._closed:
                return
            try:
                await self._rebalance()
            except Exception:
                # Any error, as in _read_loop: were this loop to die, the leases would
                # lapse and other consumers take the shards over while our readers still
                # read them.
                log.warning("bus heartbeat failed", exc_info=True)

    async def _rebalance(self) -> None:
        keys, group = self._keys, self._group
        now = time.time()
        held = sorted(self._held)
        pipe = self._r.pipeline(transaction=False)
        pipe.zadd(keys.members(group), {self.name: now})
        pipe.zremrangebyscore(keys.members(group), "-inf", now - self._bus.lease_ttl_s)
        pipe.zrange(keys.members(group), 0, -1)
        pipe.pexpire(keys.members(group), self._lease_ms * 4)
        for shard in held:
            pipe.eval(RENEW_LUA, 1, keys.lease(group, shard), self.name, self._lease_ms)
        results = await pipe.execute()
        members = sorted(_text(m) for m in results[2]) or [self.name]
        for shard, renewed in zip(held, results[4:], strict=True):
            if not renewed:
                log.warning("bus lease lost", extra={"group": group, "shard": shard})
                self._give_up(shard)
                self._held.discard(shard)
                self._draining.pop(shard, None)
        share = {
            s for s in range(keys.shards) if members and members[s % len(members)] == self.name
        }
        dropped: dict[int, list[str]] = {}
        for shard in self._active - share:
            dropped[shard] = self._give_up(shard)
            self._draining[shard] = time.monotonic() + self._sub.ack_deadline_s
        await self._unread(dropped)
        await self._release_drained()
        wanted = sorted(share - self._held)
        if wanted:
            pipe = self._r.pipeline(transaction=False)
            for shard in wanted:
                pipe.set(keys.lease(group, shard), self.name, nx=True, px=self._lease_ms)
            got = await pipe.execute()
            for shard, ok in zip(wanted, got, strict=True):
                if ok:
                    self._held.add(shard)
                    await self._take_over(shard)

    def _give_up(self, shard: int) -> list[str]:
        """Stops handing out the shard's entries; returns the ids of those read but never
        handed out."""
        self._active.discard(shard)
        dropped: list[str] = []

        def of_shard(item: _Item) -> bool:
            if item.shard != shard:
                return False
            dropped.append(item.entry_id)
            return True

        self._buffer.remove_if(of_shard)
        return dropped

    async def _unread(self, dropped: dict[int, list[str]]) -> None:
        """Resets Redis's delivery count of entries read into the buffer but never handed
        out, while we still hold their shards: the next owner's claim then counts their
        first delivery as attempt 1, not as a redelivery. (Not after a lease was lost: the
        new owner may have claimed them already, and a claim of ours would take them back.)"""
        dropped = {shard: ids for shard, ids in dropped.items() if ids}
        if not dropped:
            return
        pipe = self._r.pipeline(transaction=False)
        for shard, ids in dropped.items():
            entry_ids: list[Any] = list(ids)
            pipe.xclaim(
                self._keys.stream(shard),
                self._group,
                self.name,
                0,
                entry_ids,
                retrycount=0,
                justid=True,
            )
        await pipe.execute()

    async def _release_drained(self) -> None:
        now = time.monotonic()
        busy = {shard for shard, _ in self._flights}
        done = [s for s, until in self._draining.items() if s not in busy or now >= until]
        if not done:
            return
        pipe = self._r.pipeline(transaction=False)
        for shard in done:
            pipe.eval(RELEASE_LUA, 1, self._keys.lease(self._group, shard), self.name)
        await pipe.execute()
        for shard in done:
            del self._draining[shard]
            self._held.discard(shard)

    async def _take_over(self, shard: int) -> None:
        """Claims every entry pending on the shard (a previous owner's unacked work) and
        queues it, oldest first, ahead of anything read from the shard afterwards."""
        stream = self._keys.stream(shard)
        start = "0-0"
        claimed: list[tuple[str, Event]] = []
        while True:
            reply: Any = await self._r.xautoclaim(
                stream, self._group, self.name, 0, start_id=start, count=500
            )
            next_start, entries = _text(reply[0]), reply[1]
            for raw_id, fields in entries:
                if fields:
                    claimed.append((_text(raw_id), decode_event(fields[FIELD])))
            if next_start == "0-0":
                break
            start = next_start
        counts: dict[str, int] = {}
        if claimed:
            pending: Any = await self._r.xpending_range(
                stream, self._group, claimed[0][0], claimed[-1][0], len(claimed) + 100
            )
            counts = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        filtered: list[str] = []
        for entry_id, event in claimed:
            if (shard, entry_id) in self._flights:
                continue
            if not self._sub.matches(event):
                filtered.append(entry_id)
                continue
            item = _Item(shard, entry_id, event, counts.get(entry_id, 2))
            self._buffer.push(event.ordering_key, item)
        if filtered:
            await self._r.xack(stream, self._group, *filtered)
        self._active.add(shard)
        self._reader_wake.set()
        if claimed:
            self._notify()
