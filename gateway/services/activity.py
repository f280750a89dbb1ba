"""``Connection.last_event_at``: when each connection last received an event.

Written off the webhook path: the inbound service ``touch``es a connection after the
commit that stored its items, which only updates a dict; a background task writes what
was touched in one UPDATE, at most once per ``interval_s``. The ingest transaction never
writes the connection row, so concurrent batches of one connection do not queue on its
lock. The store only moves the time forward, so flushes of several processes (or a flush
retried after a failure) may land in any order.

A connection idle until now is written at once; later touches wait out the interval. The
value therefore lags the stored events by up to ``interval_s`` (plus a failed flush's
retry), which is what a "last message received" display or a "webhooks stopped arriving"
check can afford. No event is emitted: the value changes constantly; it is read through
GetConnection / ListConnections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

from gateway.domain.errors import Unavailable
from gateway.domain.store import Store

log = logging.getLogger(__name__)


class ConnectionActivity:
    def __init__(self, store: Store, *, interval_s: float = 5.0) -> None:
        self._store = store
        self._interval_s = interval_s
        # Connection id -> the latest receipt time not written yet.
        self._pending: dict[str, datetime] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def touch(self, connection_id: str, at: datetime) -> None:
        """Notes an event of the connection received at ``at`` (stored already)."""
        seen = self._pending.get(connection_id)
        if seen is None:
            self._pending[connection_id] = at
            self._wake.set()
        elif at > seen:
            self._pending[connection_id] = at

    @property
    def pending(self) -> int:
        """How many connections have a time not written yet."""
        return len(self._pending)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="connection-activity")

    async def aclose(self) -> None:
        """Stops the background task and writes what is pending, best effort."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()

    async def flush(self) -> bool:
        """Writes every pending time now. False when the store failed: logged, and the
        times are kept for the next flush. Never raises but for cancellation."""
        if not self._pending:
            return True
        batch, self._pending = self._pending, {}
        written = False
        try:
            async with self._store.transaction() as tx:
                await tx.advance_last_event_at(batch)
            written = True
        except Unavailable as exc:
            log.warning(
                "connection activity not saved, retrying at the next flush",
                extra={"reason": exc.reason, "connections": len(batch)},
            )
        except Exception:
            # Not the store being down. The times are still worth keeping, and a flusher
            # that died here would leave last_event_at frozen for good: log and go on.
            log.warning(
                "connection activity not saved, retrying at the next flush",
                extra={"connections": len(batch)},
                exc_info=True,
            )
        finally:
            if not written:
                # Cancelled mid-flush included: the write may not have committed.
                self._restore(batch)
        return written

    def _restore(self, batch: dict[str, datetime]) -> None:
        for connection_id, at in batch.items():
            self.touch(connection_id, at)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()
            # At most one write per interval, however busy the connections are.
            await asyncio.sleep(self._interval_s)
