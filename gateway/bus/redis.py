"""The Redis Streams bus: production, any number of replicas on one Redis.

Ordering design: shard streams + one leased reader per (group, shard) + local hold-back.

- ``publish`` appends each event to one of N shard streams (``crc32(ordering_key) % N``)
  with ``XADD``, a whole batch in one Lua script call (one per hash slot on a cluster). A
  conversation always lands on the same shard, in publish order.
- Each group is a Redis consumer group on every shard. Within a group, each shard is read
  by exactly one consumer at a time, the holder of a lease key (``SET NX PX``, renewed by
  a heartbeat). Shards are spread round-robin over the group's live members (a sorted set
  of heartbeats), so consumers that join take over shards and consumers that leave (or
  stop heartbeating) hand theirs over; a shard changes hands only after its owner's
  deliveries are acked or past their deadline (drain), so two consumers never hold
  deliveries of one conversation at once, and after its owner's read of it returned, so
  that nothing that read takes is left pending under a name that no longer reads it.
- The owner reads its shards in bulk (``XREADGROUP COUNT n BLOCK t`` over all of them in
  one call) into a hold-back buffer that hands out a conversation's next entry only after
  the previous one is acked, nacked or past its deadline. Many conversations of one shard
  are thus in flight in parallel, bounded by max_in_flight, while each is strictly ordered.
- Redelivery: a deadline that passes or a nack puts the entry back at the head of its
  conversation (``XCLAIM`` to count the delivery: attempt + 1; an entry acked meanwhile is
  not claimed and just frees the conversation). A new owner first ``XAUTOCLAIM``\\ s
  everything pending on the shard (a departed consumer's unacked work) and delivers it
  before new entries.

Why not "hold back a conversation while an earlier entry is unacked" across consumers
sharing one stream: it needs a shared per-conversation lock on every delivery (another
round trip per event, and a Lua script per entry), and a consumer that dies holding locks
stalls those conversations until the locks expire. Leasing whole shards costs one
heartbeat per consumer per interval, and keeps the hot path at one ``XREADGROUP`` and one
``XACK`` per batch. The price: parallelism across consumers of one group is bounded by the
shard count (16 by default), and a crashed consumer's shards wait for its lease to expire.

Retention is by time only: ``trim`` (periodically, and on demand) drops entries older than
the retention window with ``XTRIM MINID``. A length cap (``MAXLEN``) would bound memory,
but Redis trims by length whatever the groups have read, so a group offline or behind for
longer than the cap lasts would lose events without a word, against the promise that it
gets everything within the retention window. ``max_len`` exists for a deployment that
prefers that trade (and for tests); Redis is sized for the retention times the event rate.

Every key is built in :mod:`gateway.bus.keys` and hash-tagged per shard stream, so a
shard's stream, leases and groups live in one slot of a Redis Cluster.

Redis Cluster (a ``redis+cluster://`` URL): no command names keys of two slots. On one
node, a consumer reads all its shards in one ``XREADGROUP``; on a cluster, where the shard
streams hash to different slots (``CROSSSLOT`` otherwise), it runs one blocking reader per
slot (:meth:`RedisBus.read_groups`), each holding a connection to its slot's node while it
blocks. Pipelines are never transactions: the cluster client splits them by node and each
command names one slot's keys (a stream, or a lease, or the member set); Lua scripts touch
one lease key. The group is created stream by stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from redis.crc import key_slot
from redis.exceptions import NoScriptError, ResponseError

from gateway.bus import metrics
from gateway.bus.keys import BusKeys
from gateway.bus.redis_consumer import FIELD, RedisConsumer
from gateway.bus.redis_watch import AckWatch
from gateway.domain.bus import Subscription, Watermark
from gateway.domain.codec import encode_event
from gateway.domain.errors import BusLost, BusUnavailable
from gateway.domain.events import Event
from gateway.domain.store import OutboxEntry
from gateway.redis_client import REDIS_ERRORS, RedisClient, is_cluster, open_redis
from gateway.tasks import leave_if_cancelled

log = logging.getLogger(__name__)

# KEYS[1..n]: the shard stream of each event, in publish order, then the markers of m of
# those streams' shards (each once; m = 0: no check); ARGV[1]: an approximate length cap
# (0: none, retention is by time); ARGV[2]: n; ARGV[2 + j]: what the j-th marker must hold,
# the run_id of the server that served its shard when the caller last found Redis whole;
# ARGV[2 + m + i]: the encoded event for KEYS[i]. A marker missing or holding anything
# else, or another server (restarted, even with its data, or a replica that took over),
# appends nothing and returns -1: Redis may have lost data since then
# (gateway.bus.redis_watch). A server that refuses INFO is not checked for that (about
# 5 us of Redis's CPU a call otherwise). Returns the highest millisecond part of the ids it
# added: the server's clock at the last append (or later, should a stream's last id be
# ahead of the clock), which the relay compares with the groups' acks (RedisBus.watermark).
_APPEND = f"""
local cap = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local m = #KEYS - n
if m > 0 then
  local info = redis.pcall('INFO', 'server')
  local server = nil
  if type(info) == 'string' then server = string.match(info, 'run_id:(%x+)') end
  for j = 1, m do
    local whole = ARGV[2 + j]
    if redis.call('GET', KEYS[n + j]) ~= whole then return -1 end
    if server and server ~= whole then return -1 end
  end
end
local top = 0
for i = 1, n do
  local id
  if cap > 0 then
    id = redis.call('XADD', KEYS[i], 'MAXLEN', '~', cap, '*', '{FIELD.decode()}', ARGV[2 + m + i])
  else
    id = redis.call('XADD', KEYS[i], '*', '{FIELD.decode()}', ARGV[2 + m + i])
  end
  local ms = tonumber(string.match(id, '^%d+'))
  if ms > top then top = ms end
end
return top
"""
# Redis names a script by its SHA-1 (an identifier here, not a security measure).
_APPEND_SHA = hashlib.sha1(_APPEND.encode(), usedforsecurity=False).hexdigest()

BACKEND = "redis"


@dataclass(slots=True)
class _Call:
    """One append script call: the events of one hash slot, and their shards' markers."""

    streams: list[str]
    payloads: list[bytes]
    # The markers to check, each once, and what each must hold.
    markers: dict[str, str]


def _unavailable(exc: BaseException) -> BusUnavailable:
    return BusUnavailable(f"redis: {exc.__class__.__name__}")


class RedisBus:
    backend = BACKEND
    keeps_events = True

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "switchboard:",
        shards: int = 16,
        retention_s: float = 3 * 86400.0,
        max_len: int | None = None,
        lease_ttl_s: float = 10.0,
        block_ms: int = 500,
        read_count: int = 500,
        trim_interval_s: float = 60.0,
        lag_interval_s: float = 15.0,
    ) -> None:
        self._url = url
        self.keys = BusKeys(key_prefix, shards)
        self.retention_s = retention_s
        self.max_len = max_len
        self.lease_ttl_s = lease_ttl_s
        self.block_ms = block_ms
        self.read_count = read_count
        self._trim_interval_s = trim_interval_s
        self._lag_interval_s = lag_interval_s
        self._client: RedisClient | None = None
        self.cluster = False
        self._groups: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumers: set[RedisConsumer] = set()
        self._watch = AckWatch(lambda: self.client, self.keys, cluster=False)

    async def __aenter__(self) -> RedisBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def client(self) -> RedisClient:
        if self._client is None:
            raise RuntimeError("RedisBus.start() was not called")
        return self._client

    async def start(self) -> None:
        if self._client is not None:
            return
        self._client = open_redis(self._url)
        self.cluster = is_cluster(self._client)
        self._watch = AckWatch(lambda: self.client, self.keys, cluster=self.cluster)
        await self.ping()
        self.track(asyncio.create_task(self._maintain_loop(), name="bus-redis-maintain"))

    async def aclose(self) -> None:
        for consumer in list(self._consumers):
            await consumer.aclose()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def track(self, task: asyncio.Task[None]) -> None:
        """Keeps a background task referenced until it ends; ``aclose`` cancels it."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except (*REDIS_ERRORS, OSError) as exc:
            raise _unavailable(exc) from exc

    async def publish(self, events: Sequence[Event]) -> None:
        await self._append([(event.ordering_key, encode_event(event)) for event in events])

    async def publish_outbox(self, entries: Sequence[OutboxEntry]) -> int:
        """Appends the entries, unless Redis may have lost data since this process last
        found it whole (its markers gone or rewritten, or another server:
        ``gateway.bus.redis_watch``): then nothing is appended and :class:`BusLost` is
        raised, so that the relay publishes what was lost before anything newer of the
        same conversations."""
        # The outbox writer encoded each event once, for the outbox and the stream alike.
        return await self._append(
            [(e.event.ordering_key, e.wire or encode_event(e.event)) for e in entries],
            whole=self._watch.whole,
        )

    async def _append(
        self, encoded: Sequence[tuple[str, bytes]], *, whole: Mapping[int, str] | None = None
    ) -> int:
        """Appends each (ordering key, encoded event) to its shard stream, in order: one
        script call per batch (per hash slot on a cluster), where a pipeline of XADDs cost
        the webhook process four times the CPU per event (redis-py's per-command work).
        With ``whole`` (shard -> server), only where each shard's marker and server are
        the ones it names. Returns the server's clock (ms) at the last append (0: nothing
        appended)."""
        if not encoded:
            return 0
        keys = self.keys
        calls: dict[int, _Call] = {}
        for ordering_key, payload in encoded:
            shard = keys.shard_of(ordering_key)
            stream = keys.stream(shard)
            call = calls.setdefault(self._slot_of(stream), _Call([], [], {}))
            call.streams.append(stream)
            call.payloads.append(payload)
            if whole is not None:
                call.markers.setdefault(keys.marker(shard), whole.get(shard, ""))
        try:
            missing, top, refused = await self._run_appends(list(calls.values()))
            if missing:
                # Redis restarted or was flushed, or a cluster node took over a slot: load
                # the script (on every primary), then run the calls it refused. They ran
                # nothing: a script that cannot be found never starts.
                await self.client.script_load(_APPEND)
                missing, again, refused_again = await self._run_appends(missing)
                top = max(top, again)
                refused = refused or refused_again
            if missing:
                raise BusUnavailable("redis: the append script cannot be loaded")
        except (*REDIS_ERRORS, OSError) as exc:
            raise _unavailable(exc) from exc
        if refused:
            # (On a cluster, the calls of other slots may have appended: what is published
            # again after the loss repeats them, with the same event ids.)
            raise BusLost("redis lost what it held since this process last found it whole")
        metrics.EVENTS_PUBLISHED.labels(BACKEND).inc(len(encoded))
        return top

    def _slot_of(self, stream: str) -> int:
        # On one node every stream takes the same call; on a cluster, one per hash slot.
        return key_slot(stream.encode()) if self.cluster else 0

    async def _run_appends(self, calls: Sequence[_Call]) -> tuple[list[_Call], int, bool]:
        """Runs the calls in one pipeline; returns those refused with NOSCRIPT, the latest
        clock the others appended at, and whether one found Redis not as it was whole."""
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            keys = [*call.streams, *call.markers]
            # Through execute_command: redis-py refuses pipe.evalsha on a cluster.
            pipe.execute_command(
                "EVALSHA",
                _APPEND_SHA,
                len(keys),
                *keys,
                self.max_len or 0,
                len(call.streams),
                *call.markers.values(),
                *call.payloads,
            )
        results = await pipe.execute(raise_on_error=False)
        missing = []
        top = 0
        refused = False
        for call, result in zip(calls, results, strict=True):
            if isinstance(result, NoScriptError):
                missing.append(call)
            elif isinstance(result, Exception):
                raise result
            elif int(result) < 0:
                refused = True
            else:
                top = max(top, int(result))
        return missing, top, refused

    async def watermark(self) -> Watermark:
        """Whether Redis lost what it held, and up to when every group acked what was
        appended (``gateway.bus.redis_watch``)."""
        try:
            return await self._watch.watermark()
        except (*REDIS_ERRORS, OSError) as exc:
            raise _unavailable(exc) from exc

    async def recovered(self) -> None:
        """The loss the last :meth:`watermark` reported was answered (published again).
        The groups known before it are made again first, so that what is published again
        is held for them until their consumers come back and ack it."""
        for group in sorted(self._watch.groups):
            await self.ensure_group(group, force=True)
        try:
            await self._watch.recovered()
        except (*REDIS_ERRORS, OSError) as exc:
            raise _unavailable(exc) from exc

    async def ensure_group(self, group: str, *, force: bool = False) -> None:
        """Creates the group on every shard from the start of retention (idempotent)."""
        if group in self._groups and not force:
            return
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.xgroup_create(self.keys.stream(shard), group, id="0", mkstream=True)
        pipe.sadd(self.keys.groups(), group)
        try:
            results = await pipe.execute(raise_on_error=False)
        except (*REDIS_ERRORS, OSError) as exc:
            raise _unavailable(exc) from exc
        for result in results:
            if isinstance(result, ResponseError) and "BUSYGROUP" not in str(result):
                raise _unavailable(result)
        self._groups.add(group)

    async def known_groups(self) -> list[str]:
        """Every group a Subscribe has created, whichever process served it: after a
        rollout, a group whose consumer has not come back (the AI backend down) still has
        its lag reported, which is when it matters."""
        try:
            members = await self.client.smembers(self.keys.groups())
        except (*REDIS_ERRORS, OSError) as exc:
            raise _unavailable(exc) from exc
        names = {m.decode() if isinstance(m, bytes) else str(m) for m in members}
        return sorted(names | self._groups)

    async def live_consumers(self, group: str, *, within_s: float | None = None) -> int:
        """Consumers of ``group`` that beat within ``within_s`` (default: the lease)."""
        since = time.time() - (self.lease_ttl_s if within_s is None else within_s)
        try:
            return int(await self.client.zcount(self.keys.members(group), since, "+inf"))
        except (*REDIS_ERRORS, OSError) as exc:
            raise _unavailable(exc) from exc

    async def delete_group(self, group: str) -> bool:
        """Retires a group nobody reads any more: its read positions, pending entries,
        leases and membership go, and its lag is no longer reported (an abandoned group
        would keep the lag alert firing). False if there was no such group."""
        keys = self.keys
        pipe = self.client.pipeline(transaction=False)
        for shard in range(keys.shards):
            pipe.xgroup_destroy(keys.stream(shard), group)
            pipe.delete(keys.lease(group, shard))
        pipe.delete(keys.members(group))
        pipe.srem(keys.groups(), group)
        try:
            results = await pipe.execute(raise_on_error=False)
        except (*REDIS_ERRORS, OSError) as exc:
            raise _unavailable(exc) from exc
        self._groups.discard(group)
        known = bool(results[-1])
        destroyed = any(r == 1 for r in results[0 : 2 * keys.shards : 2])
        return known or destroyed

    def read_groups(self) -> list[frozenset[int]]:
        """The shards one ``XREADGROUP`` may read together: all of them on one node; on a
        cluster, those whose streams share a hash slot (in practice, one each)."""
        shards = range(self.keys.shards)
        if not self.cluster:
            return [frozenset(shards)]
        by_slot: dict[int, set[int]] = {}
        for shard in shards:
            by_slot.setdefault(key_slot(self.keys.stream(shard).encode()), set()).add(shard)
        return [frozenset(group) for group in by_slot.values()]

    @asynccontextmanager
    async def subscribe(self, subscription: Subscription) -> AsyncIterator[RedisConsumer]:
        await self.ensure_group(subscription.group)
        consumer = RedisConsumer(self, subscription)
        await consumer.start()
        self._consumers.add(consumer)
        try:
            yield consumer
        finally:
            self._consumers.discard(consumer)
            await consumer.aclose()

    async def group_lag(self, group: str) -> int:
        """Entries not yet delivered to the group plus those delivered and not acked."""
        shards = range(self.keys.shards)
        try:
            pipe = self.client.pipeline(transaction=False)
            for shard in shards:
                pipe.xinfo_groups(self.keys.stream(shard))
                pipe.xlen(self.keys.stream(shard))
            results = await pipe.execute(raise_on_error=False)
            total = 0
            for shard in shards:
                infos, length = results[2 * shard], results[2 * shard + 1]
                if isinstance(infos, ResponseError):  # no stream yet
                    continue
                total += await self._shard_lag(shard, group, infos, int(length))
        except (*REDIS_ERRORS, OSError) as exc:
            raise _unavailable(exc) from exc
        metrics.GROUP_LAG.labels(BACKEND, group).set(total)
        return total

    async def _shard_lag(self, shard: int, group: str, infos: list[Any], length: int) -> int:
        for info in infos:
            name = info["name"]
            if (name.decode() if isinstance(name, bytes) else name) != group:
                continue
            pending = int(info["pending"])
            if info.get("lag") is not None:
                return int(info["lag"]) + pending
            # Redis cannot tell the lag after some deletions: count what is left to read.
            last = info["last-delivered-id"]
            last_id = last.decode() if isinstance(last, bytes) else str(last)
            stream = self.keys.stream(shard)
            after: Any = await self.client.xrange(stream, min=f"({last_id}", count=length)
            return len(after) + pending
        return length  # the group does not exist yet: it will receive everything retained

    async def trim(self) -> int:
        min_id = f"{int((time.time() - self.retention_s) * 1000)}-0"
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.xtrim(self.keys.stream(shard), minid=min_id, approximate=False)
        try:
            return sum(int(n) for n in await pipe.execute())
        except (*REDIS_ERRORS, OSError) as exc:
            raise _unavailable(exc) from exc

    async def _maintain_loop(self) -> None:
        next_trim = time.monotonic() + self._trim_interval_s
        while True:
            await asyncio.sleep(min(self._lag_interval_s, self._trim_interval_s))
            try:
                if time.monotonic() >= next_trim:
                    next_trim = time.monotonic() + self._trim_interval_s
                    await self.trim()
                for group in await self.known_groups():
                    await self.group_lag(group)
            except BusUnavailable:
                log.warning("bus maintenance failed", exc_info=True)
            leave_if_cancelled()
