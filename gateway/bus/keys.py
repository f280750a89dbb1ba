"""Every Redis key the bus uses, in one place.

Keys that belong to one shard stream share that stream's hash tag (``{<prefix>bus:<n>}``),
so Redis Cluster keeps a stream, its leases and its consumer groups on one slot.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BusKeys:
    prefix: str
    shards: int

    def shard_of(self, ordering_key: str) -> int:
        # crc32 is stable across processes and languages, unlike hash().
        return zlib.crc32(ordering_key.encode()) % self.shards

    def stream(self, shard: int) -> str:
        return f"{{{self.prefix}bus:{shard}}}"

    def shard_from_stream(self, name: str) -> int:
        return int(name[len(self.prefix) + 5 : -1])

    def lease(self, group: str, shard: int) -> str:
        """Held by the one consumer of ``group`` that reads ``shard`` right now."""
        return f"{self.stream(shard)}:lease:{group}"

    def members(self, group: str) -> str:
        """Sorted set of the group's live consumers, scored by their last heartbeat."""
        return f"{{{self.prefix}bus:group:{group}}}:members"

    def groups(self) -> str:
        """Set of every group ever subscribed (for lag reporting)."""
        return f"{{{self.prefix}bus}}:groups"

    def marker(self, shard: int) -> str:
        """Written once beside each shard stream: gone, the stream's Redis lost its data."""
        return f"{self.stream(shard)}:marker"
