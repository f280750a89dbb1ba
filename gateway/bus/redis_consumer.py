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
import hashlib
import heapq
import itertools
import logging
import re
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.bus import metrics
from gateway.bus.holdback import HoldbackQueue
from gateway.domain.bus import Delivery, Subscription
from gateway.domain.codec import decode_event
from gateway.domain.errors import BusUnavailable, InvalidArgument
from gateway.domain.events import Event
from gateway.redis_client import REDIS_ERRORS, RedisClient, is_cluster
from gateway.tasks import finish_or_cancel

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
# XACKs on several streams in one call. KEYS: streams (one may come more than once);
# ARGV[1]: the group, then for each key the number of its ids followed by the ids.
XACK_LUA = """
local at, acked = 2, 0
for i = 1, #KEYS do
  local n = tonumber(ARGV[at])
  acked = acked + redis.call('xack', KEYS[i], ARGV[1], unpack(ARGV, at + 1, at + n))
  at = at + n + 1
end
return acked
"""
# Ids per XACK in XACK_LUA: Lua's unpack takes a few thousand values at most.
_XACK_CHUNK = 1000
# Empty reads of the other streams in a row after which they are mostly skipped.
_EMPTY_FOLLOW_UPS = 4
# Redis names a script by its SHA-1 (an identifier here, not a security measure).
_XACK_SHA = hashlib.sha1(XACK_LUA.encode(), usedforsecurity=False).hexdigest()


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


@dataclass(frozen=True, slots=True)
class _Parked:
    """An entry read, parked out of the buffer: fetched again by id when its turn comes."""

    shard: int
    entry_id: str
    deliveries: int


def _delivery_id(item: _Item) -> str:
    return f"{item.shard}/{item.entry_id}/{item.deliveries}"


# shard / stream entry id / deliveries, as _delivery_id writes it.
_DELIVERY_ID = re.compile(r"(\d{1,4})/(\d{1,20}-\d{1,20})/\d{1,10}")
# How long past a delivery's deadline a consumer that has not received since is stalled.
_STALL_GRACE_S = 1.0
# Each part of a stream entry id is an unsigned 64-bit number to Redis.
_MAX_ID_PART = 2**64 - 1


def _parse_delivery_id(delivery_id: str, shards: int) -> tuple[int, str]:
    """The (shard, entry id) a delivery id names; INVALID_ARGUMENT for anything else, as a
    shard beyond the bus's or an entry id Redis would refuse (failing the whole ack)."""
    found = _DELIVERY_ID.fullmatch(delivery_id)
    if (
        found is None
        or int(found[1]) >= shards
        or any(int(part) > _MAX_ID_PART for part in found[2].split("-"))
    ):
        raise InvalidArgument("delivery_id", f"not a delivery id: {delivery_id!r}")
    return int(found[1]), found[2]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _payload(fields: Any) -> Any:
    """An entry's encoded event, from redis-py's dict of its fields or a raw reply's flat
    list of them; None for an entry trimmed while pending."""
    if not fields:
        return None
    if type(fields) is dict:
        return fields[FIELD]
    if fields[0] == FIELD:
        return fields[1]
    return dict(zip(fields[::2], fields[1::2], strict=True))[FIELD]


class _Link:
    """A connection of the consumer's own for one kind of hot command: its reads, or its
    acks.

    redis-py's command path (pool checkout, retry wrapper, argument encoding one by one,
    reply callbacks, observability hooks) costs this process more CPU than a round trip
    on a bare connection: twice as much for an XREADGROUP. On one node, the consumer's
    XREADGROUP and XACK go out packed by hiredis in one call and their replies come back
    as hiredis parses them. One timeout covers the call, in place of the connection's
    own, which would cost a task per send (asyncio.wait_for) and a timer per read. The
    connection reconnects on its own after an error (redis-py closes it on any error but
    an error reply); calls take turns.
    """

    def __init__(self, client: Redis, *, slack_s: float = 0.0) -> None:
        self._pool = client.connection_pool
        self._conn: AbstractConnection | None = None
        self._socket_timeout: float | None = None
        # How long a call may take beyond the socket timeout (a blocking read's block).
        self._slack_s = slack_s
        self._turn = asyncio.Lock()

    async def call(self, *args: str | bytes | int) -> Any:
        async with self._turn:
            conn = self._conn
            if conn is None:
                # redis-py leaves this one unannotated.
                conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
                self._socket_timeout, conn.socket_timeout = conn.socket_timeout, None
                self._conn = conn
            # hiredis's stub types the argument as a 1-tuple; it takes any length.
            packed = hiredis.pack_command(cast(tuple[str | bytes | int], args))
            limit = self._socket_timeout
            try:
                # On expiry the read is cut off, and redis-py closes the connection.
                async with asyncio.timeout(None if limit is None else limit + self._slack_s):
                    await conn.send_packed_command(packed, check_health=False)
                    return await conn.read_response()
            except TimeoutError:
                raise RedisTimeoutError("Timeout reading from redis") from None

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.socket_timeout = self._socket_timeout
            await self._pool.release(conn)


class RedisConsumer:
    def __init__(self, bus: RedisBus, subscription: Subscription) -> None:
        self._bus = bus
        self._r: RedisClient = bus.client
        self._cluster: RedisCluster | None = self._r if is_cluster(self._r) else None
        # On one node: the reads on a link of their own, and the acks on another, all the
        # streams' acks in one script call (a pipeline of one XACK per stream cost more
        # than the rest of handling the ack). A cluster keeps each stream in a slot of its
        # own: one XACK per stream there, and the cluster client routes each command.
        self._read_link = self._ack_link = None
        if isinstance(self._r, Redis):
            self._read_link = _Link(self._r, slack_s=bus.block_ms / 1000)
            self._ack_link = _Link(self._r)
        self._read_groups = bus.read_groups()
        self._keys = bus.keys
        self._streams = [bus.keys.stream(shard) for shard in range(bus.keys.shards)]
        self._sub = subscription
        self._group = subscription.group
        # Unique per session: a client reconnecting under the same name must not be
        # mistaken for its previous session, whose pending entries others will claim.
        self.name = f"{subscription.consumer}:{secrets.token_hex(4)}"
        self._labels = (BACKEND, subscription.group)
        # Looked up once: a label lookup costs more than the update it serves.
        self._in_flight = metrics.IN_FLIGHT.labels(*self._labels)
        self._delivered = metrics.EVENTS_DELIVERED.labels(*self._labels)
        self._acked = metrics.EVENTS_ACKED.labels(*self._labels)
        self._lease_ms = int(bus.lease_ttl_s * 1000)
        self._active: set[int] = set()
        self._held: set[int] = set()
        self._draining: dict[int, float] = {}
        # Shards named by a blocking read still waiting for its reply; and entries such a
        # read brought for shards given up meanwhile, to hand back (see _read_once).
        self._reading: set[int] = set()
        self._strays: defaultdict[int, list[tuple[str, int]]] = defaultdict(list)
        self._buffer: HoldbackQueue[_Item] = HoldbackQueue()
        self._buffer_limit = max(bus.read_count * 2, subscription.max_in_flight * 4)
        # Entries read but parked out of the buffer, by conversation (see _park_buffered):
        # ids only, pending under our name, fetched again when their conversation can go on.
        # A conversation parked parks what is read of it next too, so that order holds.
        self._parked: dict[str, deque[_Parked]] = {}
        self._refill_lock = asyncio.Lock()
        self._flights: dict[tuple[int, str], _Flight] = {}
        # One entry per batch handed out: its deadline and its flights' keys and delivery
        # ids. Every batch gets now + the same ack deadline, so this is in deadline order.
        self._deadlines: deque[tuple[float, list[tuple[tuple[int, str], str]]]] = deque()
        self._delayed: list[tuple[float, int, _Item]] = []
        self._tiebreak = itertools.count()
        self._wake = asyncio.Event()
        self._reader_wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._empty_follow_ups = self._follow_up_chances = 0

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
        self._in_flight.dec(gone)
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
        for link in (self._read_link, self._ack_link):
            if link is not None:
                await link.aclose()

    async def _stop_tasks(self) -> None:
        """Lets the loops finish their current Redis call rather than cancelling it:
        a reply cut off mid-read would leave entries pending under our name unseen."""
        self._closed = True
        self._stopping.set()
        self._reader_wake.set()
        self._notify()
        await finish_or_cancel(self._tasks, self._bus.block_ms / 1000 + 1.0)

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
            # asyncio.timeout, not wait_for: wait_for wraps the wait in a task of its own.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await waiter.wait()
        return []

    async def ack(self, delivery_ids: Sequence[str]) -> None:
        # All parsed first: an ack refused for a malformed id acks nothing.
        keys = [_parse_delivery_id(d, self._keys.shards) for d in delivery_ids]
        if not keys:
            return
        by_shard: dict[int, list[str]] = defaultdict(list)
        for shard, entry_id in keys:
            # Acked even when no longer in flight here: the work is done either way.
            by_shard[shard].append(entry_id)
        try:
            await self._xack(by_shard)
        except REDIS_ERRORS as exc:
            # Still in flight, their conversations still held: released before the XACK
            # held, the next event of a conversation would go out while this one stays
            # pending, to come back after it. The ack deadline redelivers them.
            raise BusUnavailable(f"redis: {exc.__class__.__name__}") from exc
        acked = 0
        flights = self._flights
        for key in keys:
            flight = flights.pop(key, None)
            if flight is not None:
                acked += 1
                ordering_key = flight.item.event.ordering_key
                self._buffer.release(ordering_key)
                if ordering_key in self._parked:
                    self._reader_wake.set()
        if acked:
            self._acked.inc(acked)
            self._in_flight.dec(acked)
            # Room in flight, or a conversation released, matters only to entries
            # waiting in the buffer; with none, a receive woken here finds nothing.
            if self._buffer.size:
                self._notify()

    async def _xack(self, by_shard: dict[int, list[str]]) -> None:
        if self._ack_link is None:
            pipe = self._r.pipeline(transaction=False)
            for shard, ids in by_shard.items():
                pipe.xack(self._streams[shard], self._group, *ids)
            await pipe.execute()
            return
        keys: list[str] = []
        args: list[str | int] = [self._group]
        for shard, ids in by_shard.items():
            stream = self._streams[shard]
            for start in range(0, len(ids), _XACK_CHUNK):
                chunk = ids[start : start + _XACK_CHUNK]
                keys.append(stream)
                args.append(len(chunk))
                args.extend(chunk)
        try:
            await self._ack_link.call("EVALSHA", _XACK_SHA, len(keys), *keys, *args)
        except NoScriptError:
            # Redis restarted or was flushed: a script it cannot find never started.
            sha = _text(await self._ack_link.call("SCRIPT", "LOAD", XACK_LUA))
            await self._ack_link.call("EVALSHA", sha, len(keys), *keys, *args)

    async def nack(self, delivery_id: str, delay_s: float = 0.0) -> None:
        shard, entry_id = _parse_delivery_id(delivery_id, self._keys.shards)
        flight = self._flights.pop((shard, entry_id), None)
        if flight is None:
            return
        self._in_flight.dec()
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
        due: list[tuple[tuple[int, str], str]] = []
        flights, buffer = self._flights, self._buffer
        while len(out) < room:
            popped = buffer.pop()
            if popped is None:
                break
            item = popped[1]
            delivery_id = _delivery_id(item)
            key = (item.shard, item.entry_id)
            flights[key] = _Flight(item, delivery_id)
            due.append((key, delivery_id))
            out.append(Delivery(delivery_id=delivery_id, attempt=item.deliveries, event=item.event))
        if out:
            self._deadlines.append((time.monotonic() + self._sub.ack_deadline_s, due))
            self._delivered.inc(len(out))
            self._in_flight.inc(len(out))
            if buffer.size < self._buffer_limit // 2:
                self._reader_wake.set()
        return out

    def _next_timer(self) -> float | None:
        times = [q[0][0] for q in (self._deadlines, self._delayed) if q]
        return min(times) if times else None

    async def _run_timers(self) -> None:
        now = time.monotonic()
        due: list[tuple[_Item, str]] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            for key, delivery_id in self._deadlines.popleft()[1]:
                flight = self._flights.get(key)
                if flight is None or flight.delivery_id != delivery_id:
                    continue  # acked or nacked since
                del self._flights[key]
                self._in_flight.dec()
                due.append((flight.item, metrics.REASON_DEADLINE))
        while self._delayed and self._delayed[0][0] <= now:
            _, _, item = heapq.heappop(self._delayed)
            due.append((item, metrics.REASON_NACK))
        if due:
            await self._redeliver(due)

    async def _redeliver(self, due: list[tuple[_Item, str]]) -> None:
        """Claims the entries again (Redis counts the delivery) and puts each back at the
        head of its key; entries acked meanwhile, trimmed, or on a shard given up (before
        the claim or while it ran) are dropped and free their key."""
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
            # Not if the shard was given up during the claim: the next owner takes the
            # entry over, and handed out here too it would be out twice at once.
            if (item.shard, item.entry_id) in still and item.shard in self._active:
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
            if self._parked:
                try:
                    await self._refill()
                except Exception:
                    # Any error, as below: a reader that died here would leave its shards
                    # unread for good, their leases still renewed.
                    log.warning("bus could not fetch parked entries", exc_info=True)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
            if self._buffer.size >= self._buffer_limit and self._clogged():
                self._park_buffered()
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
                    _stream_lost(self._group)
                    try:
                        await self._bus.ensure_group(self._group, force=True)
                    except BusUnavailable:
                        # Not the end of the reader: the next read is refused NOGROUP again,
                        # and the group made then.
                        log.warning("bus could not make the group again", exc_info=True)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 2.0)
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
        """Reads the active shards among ``shards`` into the buffer.

        A shard given up while the read waits is not released until it returns
        (``_release_drained``): Redis may still answer the read with entries appended to
        the shard meanwhile, pending under our name from then on, and a next owner that
        had already taken the shard over would never see them. Held back, it takes them
        over with the rest: the read's entries for given-up shards are handed back to the
        group, their delivery count reset, before the lease goes."""
        active = self._active & shards
        self._reading |= active
        try:
            if active:
                await self._read_into_buffer(active)
            strays = {s: self._strays.pop(s) for s in list(self._strays) if s in shards}
            if strays:
                # Before the shards are let go: a claim of ours after the next owner's
                # would take the entries back from it.
                await self._unread(strays)
        finally:
            self._reading -= active

    async def _read_into_buffer(self, active: set[int]) -> None:
        streams: dict[Any, Any] = {self._streams[s]: ">" for s in sorted(active)}
        reply = await self._xreadgroup(streams, count=self._room(), block=self._bus.block_ms)
        if not reply:
            return
        added = self._accept(reply, deliveries=1)
        try:
            if (
                len(reply) == 1 < len(streams)
                and self._buffer.size < self._buffer_limit
                and self._follow_up_worth_it()
            ):
                # A read that blocked is answered with the entries of the one stream that
                # woke it, while a publish usually appends to several streams at once: read
                # the others too before handing anything out, so that a publish makes one
                # response to the client rather than two (each costing a gRPC message, an
                # Ack and an XACK).
                streams.pop(_text(reply[0][0]), None)
                more = await self._xreadgroup(streams, count=self._room(), block=None)
                self._empty_follow_ups = 0 if more else self._empty_follow_ups + 1
                if more:
                    added += self._accept(more, deliveries=1)
        finally:
            if added:
                self._notify()

    def _follow_up_worth_it(self) -> bool:
        """Whether to read the other streams after a read that blocked. One that finds
        nothing costs a round trip for nothing: the case when events come one at a time.
        After a few of those in a row, only one chance in 16 is taken, to notice batches
        coming back."""
        if self._empty_follow_ups < _EMPTY_FOLLOW_UPS:
            return True
        self._follow_up_chances += 1
        return self._follow_up_chances % 16 == 0

    def _room(self) -> int:
        """How many entries one read may bring into the buffer."""
        room = self._buffer_limit - self._buffer.size
        if len(self._read_groups) > 1:
            # The readers of other slots fill the same buffer: each takes its share.
            readers = sum(1 for group in self._read_groups if not group.isdisjoint(self._active))
            room = room // max(readers, 1)
        return max(1, min(self._bus.read_count, room))

    async def _xreadgroup(
        self, streams: dict[Any, Any], *, count: int, block: int | None
    ) -> list[tuple[Any, list[Any]]]:
        """The streams read, each with its entries: (id, fields), the fields as a dict or
        as a raw reply's flat list (see :func:`_payload`)."""
        args: list[Any] = ["GROUP", self._group, self.name, "COUNT", count]
        if block is not None:
            args += ["BLOCK", block]
        if self._read_link is not None:
            reply = await self._read_link.call(
                "XREADGROUP", *args, "STREAMS", *streams, *streams.values()
            )
            # RESP3 answers a map of streams, RESP2 a list of pairs; nothing: nil.
            return list(reply.items()) if isinstance(reply, dict) else reply or []
        assert self._cluster is not None
        # Straight to the node that serves the streams' slot: left to route the command
        # itself, the cluster client asks a node COMMAND GETKEYS before every read
        # (XREADGROUP's keys are "movable"), and it retries a read whose reply was lost,
        # which would hide the entries that read left pending under our name. A MOVED
        # reply is still followed.
        node = self._cluster.get_node_from_key(next(iter(streams)))
        reply = await self._cluster.execute_command(
            "XREADGROUP", *args, "STREAMS", *streams, *streams.values(), target_nodes=node
        )
        return reply or []

    def _accept(
        self, reply: Any, *, deliveries: int, counts: Mapping[str, int] | None = None
    ) -> int:
        """Buffers the entries of an XREADGROUP reply, each delivered ``deliveries`` times
        (or as ``counts`` says by entry id); how many (the caller notifies)."""
        filtered: dict[int, list[str]] = defaultdict(list)
        added = 0
        for stream_name, entries in reply:
            shard = self._keys.shard_from_stream(_text(stream_name))
            if shard not in self._active:
                # Given up meanwhile: back to the group for the next owner (_read_once).
                self._strays[shard].extend((_text(raw_id), 0) for raw_id, _ in entries)
                continue
            for raw_id, fields in entries:
                payload = _payload(fields)
                if payload is None:
                    continue  # trimmed while pending
                entry_id = _text(raw_id)
                if (shard, entry_id) in self._flights:
                    continue
                event = decode_event(payload)
                if not self._sub.matches(event):
                    filtered[shard].append(entry_id)
                    continue
                times = deliveries if counts is None else counts.get(entry_id, deliveries)
                parked = self._parked.get(event.ordering_key)
                if parked is not None:
                    parked.append(_Parked(shard, entry_id, times))
                    continue
                self._buffer.push(event.ordering_key, _Item(shard, entry_id, event, times))
                added += 1
        if filtered:
            metrics.EVENTS_FILTERED.labels(*self._labels).inc(sum(map(len, filtered.values())))
            task = asyncio.create_task(self._ack_filtered(filtered))
            self._bus.track(task)
        return added

    async def _ack_filtered(self, filtered: dict[int, list[str]]) -> None:
        try:
            await self._xack(filtered)
        except REDIS_ERRORS:
            # They stay pending and come back to whoever owns the shard next.
            log.warning("bus could not ack filtered entries", exc_info=True)

    async def _reload_own_pending(self, shards: set[int]) -> None:
        """Rebuilds the buffer from this consumer's own pending entries (history read)."""
        self._buffer.remove_if(lambda item: item.shard in shards)
        self._unpark(lambda entry: entry.shard in shards)
        # Not the nacked retries waiting for their delay: their retry puts them back.
        retrying = {(item.shard, item.entry_id) for _, _, item in self._delayed}
        for shard in sorted(shards):
            start = "0"
            while True:
                reply = await self._xreadgroup(
                    {self._keys.stream(shard): start}, count=500, block=None
                )
                entries = reply[0][1] if reply else []
                if not entries:
                    break
                rest = [e for e in entries if (shard, _text(e[0])) not in retrying]
                if rest:
                    # Asked of the whole page: a nacked retry left out of ``rest`` is still
                    # pending in its range, and would take the place of another's count.
                    counts = await self._attempts_so_far(shard, entries)
                    if self._accept([(reply[0][0], rest)], deliveries=1, counts=counts):
                        self._notify()
                start = _text(entries[-1][0])

    async def _attempts_so_far(self, shard: int, entries: list[Any]) -> dict[str, int]:
        """How many times these entries of ours, just read again from history, had been
        delivered before: that read counts one more in Redis without reaching anyone. An
        entry taken over from a consumer gone keeps its attempt (and a delivery id of its
        own) rather than going out again as attempt 1."""
        first, last = _text(entries[0][0]), _text(entries[-1][0])
        pending: Any = await self._r.xpending_range(
            self._keys.stream(shard), self._group, first, last, len(entries), self.name
        )
        return {_text(p["message_id"]): max(1, int(p["times_delivered"]) - 1) for p in pending}

    # ---- parking: one conversation's backlog must not stop the others ----
    def _clogged(self) -> bool:
        """The buffer is full, yet nothing in it can go out while there is room in flight:
        every conversation buffered waits for one of its deliveries (out with a slow
        client, or nacked with a delay). Left so, no other conversation would be read."""
        return len(self._flights) < self._sub.max_in_flight and not self._buffer.has_ready()

    def _park_buffered(self) -> None:
        """Takes everything out of the buffer, keeping each entry's id (it stays pending
        under our name): memory stays bounded, and reading goes on for the others."""
        for key, items in self._buffer.take_all().items():
            parked = self._parked.setdefault(key, deque())
            # Ahead of what is parked already: a buffered entry is older than those.
            parked.extendleft(_Parked(i.shard, i.entry_id, i.deliveries) for i in reversed(items))
        metrics.BUFFER_PARKS.labels(*self._labels).inc()

    def _unpark(self, predicate: Callable[[_Parked], bool]) -> list[_Parked]:
        """Forgets (and returns) the parked entries ``predicate`` picks."""
        removed: list[_Parked] = []
        for key in list(self._parked):
            kept: deque[_Parked] = deque()
            for entry in self._parked[key]:
                (removed if predicate(entry) else kept).append(entry)
            if kept:
                self._parked[key] = kept
            else:
                del self._parked[key]
        return removed

    async def _refill(self) -> None:
        """Fetches the parked entries of conversations that can go on (none of theirs out,
        nothing of theirs buffered) back into the buffer, oldest first, while there is
        room: the rest of a conversation stays parked, and so does what is read of it
        meanwhile, until its turn comes again."""
        async with self._refill_lock:
            room = self._buffer_limit - self._buffer.size
            wanted: list[tuple[str, list[_Parked]]] = []
            for key, parked in self._parked.items():
                if room <= 0:
                    break
                if self._buffer.is_busy(key) or self._buffer.queued(key):
                    continue
                chunk = list(itertools.islice(parked, min(room, self._bus.read_count)))
                wanted.append((key, chunk))
                room -= len(chunk)
            if not wanted:
                return
            pipe = self._r.pipeline(transaction=False)
            for _, chunk in wanted:
                for entry in chunk:
                    pipe.xrange(self._streams[entry.shard], entry.entry_id, entry.entry_id)
            replies = iter(await pipe.execute())
            added = 0
            for key, chunk in wanted:
                left = self._parked.get(key)
                for entry in chunk:
                    found = next(replies)
                    if not left or left[0] != entry:
                        continue  # given up (or reloaded) meanwhile
                    left.popleft()
                    payload = _payload(found[0][1]) if found else None
                    if payload is None or entry.shard not in self._active:
                        continue  # trimmed while pending, or no longer ours to hand out
                    event = decode_event(payload)
                    self._buffer.push(
                        key, _Item(entry.shard, entry.entry_id, event, entry.deliveries)
                    )
                    added += 1
                if left is not None and not left:
                    del self._parked[key]
            if added:
                self._notify()

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
        stalled = self._stalled()
        pipe = self._r.pipeline(transaction=False)
        if stalled:
            pipe.zrem(keys.members(group), self.name)
        else:
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
        if stalled:
            share = set()
        dropped: dict[int, list[tuple[str, int]]] = {}
        for shard in self._active - share:
            dropped[shard] = self._give_up(shard)
            # A stalled consumer's deliveries are past their deadline already: the next
            # owner redelivers them now.
            drain = 0.0 if stalled else self._sub.ack_deadline_s
            self._draining[shard] = time.monotonic() + drain
        await self._unread(dropped)
        await self._release_drained()
        wanted = sorted(share - self._held)
        if wanted:
            pipe = self._r.pipeline(transaction=False)
            for shard in wanted:
                pipe.set(keys.lease(group, shard), self.name, nx=True, px=self._lease_ms)
            got = await pipe.execute()
            self._held.update(shard for shard, ok in zip(wanted, got, strict=True) if ok)
        # The shards just leased, and any whose take-over failed (a Redis error) at an
        # earlier heartbeat: leased, renewed, and so read by nobody else until it succeeds.
        for shard in sorted(self._held - self._active - self._draining.keys()):
            await self._take_over(shard)

    def _stalled(self) -> bool:
        """Whether deliveries are out past their deadline and no receive has come to
        redeliver them: a Subscribe whose client stopped reading (its stream waits on flow
        control). Such a consumer leaves the group until it receives again, so that the
        others redeliver its deliveries and read its conversations meanwhile, as the
        in-process bus does. A receive wakes at each deadline: a second late is not a
        receive about to come."""
        if not self._flights:
            return False
        late = time.monotonic() - _STALL_GRACE_S
        flights = self._flights
        for deadline, batch in self._deadlines:
            if deadline >= late:
                return False
            # A batch acked (or nacked) since stays queued until a receive pops it: only a
            # delivery still out counts.
            for key, delivery_id in batch:
                flight = flights.get(key)
                if flight is not None and flight.delivery_id == delivery_id:
                    return True
        return False

    def _give_up(self, shard: int) -> list[tuple[str, int]]:
        """Stops handing out the shard's entries; returns the ids of those read (or
        claimed) but not handed out since, each with the delivery count Redis had for it
        before: the deliveries it had before ours."""
        self._active.discard(shard)
        dropped: list[tuple[str, int]] = []

        def of_shard(item: _Item) -> bool:
            if item.shard != shard:
                return False
            dropped.append((item.entry_id, item.deliveries - 1))
            return True

        self._buffer.remove_if(of_shard)
        for entry in self._unpark(lambda entry: entry.shard == shard):
            dropped.append((entry.entry_id, entry.deliveries - 1))
        return dropped

    async def _unread(self, dropped: dict[int, list[tuple[str, int]]]) -> None:
        """Puts Redis's delivery count of entries read (or claimed) into the buffer but not
        handed out back to what it was before, while we still hold their shards: the next
        owner's claim then counts the delivery it makes as the entry's next attempt, 1 for
        an entry never delivered, and one more for a redelivery held back (never reset to
        1: it was delivered before). (Not after a lease was lost: the new owner may have
        claimed them already, and a claim of ours would take them back.)"""
        by_count: dict[tuple[int, int], list[Any]] = defaultdict(list)
        for shard, entries in dropped.items():
            if shard in self._held:
                for entry_id, count in entries:
                    by_count[shard, count].append(entry_id)
        if not by_count:
            return
        pipe = self._r.pipeline(transaction=False)
        for (shard, count), entry_ids in by_count.items():
            pipe.xclaim(
                self._keys.stream(shard),
                self._group,
                self.name,
                0,
                entry_ids,
                retrycount=count,
                justid=True,
            )
        await pipe.execute()

    async def _release_drained(self) -> None:
        """Lets go of the shards given up once nothing of theirs is out, or at their drain
        deadline: in flight, or nacked and waiting for its delay (the next owner would
        deliver it at once). A retry that comes due on a shard given up is not ours to make
        any more: dropped, it frees the shard, and the next owner makes it."""
        now = time.monotonic()
        busy = {shard for shard, _ in self._flights}
        busy.update(item.shard for _, _, item in self._delayed)
        done = [
            s
            for s, until in self._draining.items()
            if s not in self._reading and (s not in busy or now >= until)
        ]
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
            try:
                reply: Any = await self._r.xautoclaim(
                    stream, self._group, self.name, 0, start_id=start, count=500
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc) or start != "0-0":
                    raise
                # Redis lost the stream, and the group with it (a restart, a flush), after
                # the bus made the group: made again (as a read refused NOGROUP does), it
                # has nothing pending to claim.
                _stream_lost(self._group)
                await self._bus.ensure_group(self._group, force=True)
                break
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
        items: list[_Item] = []
        # Our own, after a lease lost and taken again: out with the client, or a nacked
        # retry waiting for its delay (its retry puts it back).
        retrying = {(item.shard, item.entry_id) for _, _, item in self._delayed}
        for entry_id, event in claimed:
            if (shard, entry_id) in self._flights or (shard, entry_id) in retrying:
                continue
            if not self._sub.matches(event):
                filtered.append(entry_id)
                continue
            items.append(_Item(shard, entry_id, event, counts.get(entry_id, 2)))
        if filtered:
            await self._r.xack(stream, self._group, *filtered)
        # Only once nothing can fail: a take-over that fails is tried again from the start.
        for item in items:
            self._buffer.push(item.event.ordering_key, item)
        self._active.add(shard)
        self._reader_wake.set()
        if claimed:
            self._notify()


def _stream_lost(group: str) -> None:
    """Said as an error: the group existed (the bus makes it before anyone reads), so Redis
    lost its streams (restarted without its data, or flushed). Nothing a group had not
    acked is lost with them: the outbox keeps an entry until every group acked it, and the
    relay publishes again what it kept once it sees the loss (gateway.bus.redis_watch)."""
    log.error(
        "bus stream lost: Redis no longer has a group it had; the outbox relay publishes"
        " again what no group acked, and what the group had acked is not delivered again",
        extra={"group": group},
    )
