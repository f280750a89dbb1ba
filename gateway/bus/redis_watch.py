"""What the Redis bus tells the outbox relay (:class:`~gateway.domain.bus.Watermark`):
whether Redis lost what it held, and up to when every group acked what was appended.

Redis may lose what it was given: a server restarted without its data, an AOF that had not
reached the disk, a failover to a replica that lagged, a flush. The outbox relay therefore
keeps each entry it published until every consumer group acked it, and publishes again
what it keeps should Redis turn out to have lost its data (``gateway.services.relay``).

Continuity. Beside each shard stream a marker key holds the identity of the server that
served the shard when the relay last found it whole: its ``run_id`` (a restart, even one
that reloads its data, or a failover changes it; on a cluster, the node that serves the
shard's slot). A look reads each shard's marker and its server's ``run_id`` together, in
one script on that server (``_IDENTITY``: a pipeline on a cluster names no server). A marker
missing or naming another server, or a server other than the one this process last found
serving the shard, is a loss. The relay answers it, then calls :meth:`AckWatch.recovered`,
which writes the markers again: a relay that dies before answering leaves the markers as
they were, and the next process to look sees the loss. Appends check too
(``RedisBus.publish_outbox``): one that finds a marker of its shards gone or other than
the one this process last found whole, or a server other than that one, adds nothing, so
that no newer event goes ahead of what was lost before the relay has looked.

Acks. Each read of the groups is preceded, on the same connection (one per node on a
cluster), by a read of the markers, so that what is read of the groups belongs to the
server found whole. For each shard and group: entries before the oldest pending one (or,
if none is pending, before the last one delivered) are acked; a group that has read to
the end of its shard holds nothing back. The minimum over shards and groups, capped by the
server's clock when the groups were read, is ``acked_before_ms``: every entry appended
before it was acked by every group. Ids and clock are the server's, never this host's.
Groups that exist hold entries back; a group known to the bus but missing on a shard (it
is being created or deleted, or its Redis lost it) leaves nothing acked. A group retired
with ``switchboard groups delete`` holds nothing back any more. After a loss the bus makes
again the groups it knew (``RedisBus.recovered``), reading from the start of the new
streams: what is published again waits for them, whichever process publishes it, even
before their consumers come back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from gateway.bus.keys import BusKeys
from gateway.domain.bus import Watermark
from gateway.redis_client import RedisClient

# KEYS[1]: a shard's marker. The run_id of the server that runs it (INFO, '' where INFO is
# refused) and the marker, read together on that server.
_IDENTITY = """
local info = redis.pcall('INFO', 'server')
local server = ''
if type(info) == 'string' then server = string.match(info, 'run_id:(%x+)') or '' end
return {server, redis.call('GET', KEYS[1])}
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms(stream_id: Any) -> int:
    return int(_text(stream_id).split("-", 1)[0])


class AckWatch:
    def __init__(self, client: Callable[[], RedisClient], keys: BusKeys, *, cluster: bool) -> None:
        self._client = client
        self._keys = keys
        self._cluster = cluster
        # Shard -> the server this process last found whole serving it, and the one the
        # last look found.
        self._whole: dict[int, str] | None = None
        self._seen: dict[int, str] | None = None
        # The groups the last look found whole knew of: made again after a loss.
        self.groups: set[str] = set()

    @property
    def whole(self) -> dict[int, str] | None:
        """Shard -> what its marker holds, and the run_id of its server, while Redis keeps
        what this process last found it holding; None before the first look found it
        whole. Appends check it (``RedisBus``)."""
        return self._whole

    async def watermark(self) -> Watermark:
        keys = self._keys
        client = self._client()
        # The clock first: an entry appended before it is in the groups' state read next.
        # (A cluster client runs TIME alone, on any node.)
        clock = await client.time() if self._cluster else None
        pipe = client.pipeline(transaction=False)
        if not self._cluster:
            pipe.time()
        for shard in range(keys.shards):
            _identity(pipe, keys.marker(shard))
            pipe.xinfo_groups(keys.stream(shard))
        pipe.smembers(keys.groups())
        results = await pipe.execute(raise_on_error=False)
        if not self._cluster:
            clock = _raised(results.pop(0))
        found_ids, infos = results[0 : 2 * keys.shards : 2], results[1 : 2 * keys.shards : 2]
        members = _raised(results[-1])
        servers: dict[int, str] = {}
        lost = False
        for shard, found in enumerate(found_ids):
            server, marker = _server_and_marker(found)
            servers[shard] = server
            if marker != server:
                lost = True
        self._seen = servers
        if self._whole is not None and self._whole != servers:
            lost = True
        if lost:
            return Watermark(lost=True, acked_before_ms=None)
        if self._whole is None:
            self._whole = servers
        assert clock is not None
        seconds, micros = clock
        bound = int(seconds) * 1000 + int(micros) // 1000
        # The bus's set of groups, not this process's memory of the groups it served: a
        # group retired elsewhere (``switchboard groups delete``) must hold nothing back.
        known = {_text(m) for m in members}
        present_anywhere = {
            _text(info["name"])
            for found in infos
            if not isinstance(found, ResponseError)
            for info in _raised(found)
        }
        self.groups = known | present_anywhere
        # (shard, group, last delivered id, whether some are pending) to look at closer.
        closer: list[tuple[int, str, str, bool]] = []
        for shard, found in enumerate(infos):
            if isinstance(found, ResponseError):  # no stream: nothing appended, no group
                if known:
                    return Watermark(lost=False, acked_before_ms=None)
                continue
            present = set()
            for info in _raised(found):
                name, last = _text(info["name"]), _text(info["last-delivered-id"])
                present.add(name)
                lag = info.get("lag")
                if int(info["pending"]) > 0 or lag is None:
                    closer.append((shard, name, last, int(info["pending"]) > 0))
                elif int(lag) > 0:
                    bound = min(bound, _ms(last))
            if known - present:
                return Watermark(lost=False, acked_before_ms=None)
        if closer:
            closer_bound = await self._closer(closer, servers)
            if closer_bound is None:
                return Watermark(lost=False, acked_before_ms=None)
            bound = min(bound, closer_bound)
        return Watermark(lost=False, acked_before_ms=bound)

    async def _closer(
        self, closer: list[tuple[int, str, str, bool]], servers: dict[int, str]
    ) -> int | None:
        """The bound of the groups that have entries pending (their oldest) or whose lag
        Redis cannot tell (whether they read to the end); None if a marker changed
        meanwhile or a group went (what is read now may not be the server read before)."""
        keys = self._keys
        pipe = self._client().pipeline(transaction=False)
        # A shard's identity once, ahead of the reads of its groups (on its node's
        # connection, in order), not once per group.
        shards = list(dict.fromkeys(shard for shard, _, _, _ in closer))
        for shard in shards:
            _identity(pipe, keys.marker(shard))
        for shard, group, _, pending in closer:
            if pending:
                pipe.xpending(keys.stream(shard), group)
            else:
                pipe.xrevrange(keys.stream(shard), count=1)
        results = await pipe.execute(raise_on_error=False)
        for shard, identity in zip(shards, results, strict=False):
            if _server_and_marker(identity) != (servers[shard], servers[shard]):
                return None
        bound: int | None = None
        for (_, _, last, pending), found in zip(closer, results[len(shards) :], strict=True):
            if isinstance(found, ResponseError):
                return None
            if pending and found.get("min") is not None:
                mark = _ms(found["min"])
            elif not pending and found and _text(found[0][0]) == last:
                continue  # read to the end of its shard
            else:
                # Acked meanwhile, or more to read: what it had delivered is acked.
                mark = _ms(last)
            bound = mark if bound is None else min(bound, mark)
        return bound if bound is not None else 2**63

    async def recovered(self) -> None:
        """The relay answered the loss: the server last looked at is the whole one now."""
        seen = self._seen
        if seen is None:
            return
        # What the look saw, not what serves the shard now: a server that took over since
        # then finds a marker naming another, and the next look sees that loss too.
        pipe = self._client().pipeline(transaction=False)
        for shard, server in seen.items():
            pipe.set(self._keys.marker(shard), server)
        await pipe.execute()
        self._whole = dict(seen)


def _identity(pipe: Any, marker: str) -> None:
    # EVAL, not EVALSHA: a server that restarted has no scripts, and a look is not hot.
    # Through execute_command: redis-py refuses pipe.eval on a cluster.
    pipe.execute_command("EVAL", _IDENTITY, 1, marker)


def _server_and_marker(result: Any) -> tuple[str, str | None]:
    server, marker = _raised(result)
    if not server:
        # As when INFO itself was refused: the relay then holds what it published.
        raise ResponseError("the server refuses INFO: its identity cannot be read")
    return _text(server), None if marker is None else _text(marker)


def _raised(result: Any) -> Any:
    if isinstance(result, Exception):
        raise result
    return result
