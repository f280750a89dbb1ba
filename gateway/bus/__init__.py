"""The event bus: Redis Streams when a Redis URL is configured, in-process otherwise.

Both implement :class:`gateway.domain.bus.Bus` with the same guarantees; the rest of the
code only sees that protocol and :func:`open_bus`.
"""

from __future__ import annotations

from gateway.bus.memory import MemoryBus
from gateway.bus.redis import RedisBus
from gateway.domain.bus import Bus
from gateway.domain.store import Store

__all__ = ["MemoryBus", "RedisBus", "open_bus"]


def open_bus(
    redis_url: str | None,
    store: Store,
    *,
    key_prefix: str = "switchboard:",
    retention_s: float = 3 * 86400.0,
    shards: int = 16,
    lease_ttl_s: float = 10.0,
) -> Bus:
    """The bus for this configuration (``SWITCHBOARD_REDIS_URL`` set or not), not started:
    the caller runs ``start`` / ``aclose`` (or ``async with``)."""
    if redis_url:
        return RedisBus(
            redis_url,
            key_prefix=key_prefix,
            retention_s=retention_s,
            shards=shards,
            lease_ttl_s=lease_ttl_s,
        )
    return MemoryBus(store, retention_s=retention_s)
