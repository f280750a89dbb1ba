"""The outbox relay: publishes what the store's transactions committed to the outbox.

Producers write events in the same transaction as the data they describe and then call
:meth:`OutboxRelay.notify`; the relay claims outbox entries in batches (a lease, so that
replicas never publish the same batch at once), publishes them in one bus call and marks
them published. A sweep every ``sweep_interval_s`` republishes whatever was committed but
never published: a process that died right after a commit, or a claim whose lease lapsed.
Republishing keeps each event's ``event_id``; consumers dedupe on it.

It also purges published entries past the retention window. With the in-process bus the
outbox is the bus's log, so that retention must not be shorter than the bus's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime, timedelta

from gateway.domain.bus import Bus
from gateway.domain.errors import Unavailable
from gateway.domain.store import Store

log = logging.getLogger(__name__)


class OutboxRelay:
    def __init__(
        self,
        store: Store,
        bus: Bus,
        *,
        batch_size: int = 500,
        lease_s: float = 30.0,
        sweep_interval_s: float = 1.0,
        retention_s: float = 3 * 86400.0,
        purge_interval_s: float = 600.0,
    ) -> None:
        self._store = store
        self._bus = bus
        self._batch_size = batch_size
        self._lease = timedelta(seconds=lease_s)
        self._sweep_interval_s = sweep_interval_s
        self._retention = timedelta(seconds=retention_s)
        self._purge_interval_s = purge_interval_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.published = 0

    async def __aenter__(self) -> OutboxRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Stops after the batch in hand (a batch cut off between publish and mark is
        only published again, but a store call cut off mid-transaction may not be safe)."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        _, late = await asyncio.wait([self._task], timeout=grace_s)
        for task in late:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None

    def notify(self) -> None:
        """A transaction with events just committed: publish now rather than at the sweep."""
        self._wake.set()

    async def run_once(self) -> int:
        """Publishes every claimable entry; returns how many were published."""
        total = 0
        while True:
            now = datetime.now(UTC)
            entries = await self._store.claim_outbox(
                now=now, lease_until=now + self._lease, limit=self._batch_size
            )
            if not entries:
                return total
            await self._bus.publish_outbox(entries)
            await self._store.mark_published([e.seq for e in entries], datetime.now(UTC))
            total += len(entries)
            self.published += len(entries)
            if len(entries) < self._batch_size:
                return total

    async def purge(self) -> int:
        return await self._store.purge_published(datetime.now(UTC) - self._retention)

    async def _run(self) -> None:
        backoff = 0.1
        next_purge = time.monotonic() + self._purge_interval_s
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._sweep_interval_s)
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.run_once()
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + self._purge_interval_s
                    await self.purge()
                backoff = 0.1
            except Unavailable:
                # Claimed entries stay leased until the lease lapses, then the sweep
                # publishes them: nothing is lost, only delayed.
                log.warning("outbox relay cannot publish now, retrying", exc_info=True)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                # Anything else is a bug, but the relay must outlive it: the entries stay
                # in the outbox and are retried, while the log says what went wrong.
                log.exception("outbox relay failed, retrying")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
