"""The outbox relay: publishes what the store's transactions committed to the outbox.

Producers write events in the same transaction as the data they describe and then call
:meth:`OutboxRelay.notify`; the relay claims outbox entries in batches (a lease, so that
replicas never publish the same batch at once), publishes them in one bus call and settles
them (below). A producer in the same process may instead write its entries already
claimed for this relay (``lease``) and hand them over after the commit
(:meth:`OutboxRelay.hand_over`): the relay publishes them without a claim transaction.
A sweep every ``sweep_interval_s`` republishes whatever was committed but never
published: a process that died right after a commit, or a claim whose lease lapsed.
Republishing keeps each event's ``event_id``; consumers dedupe on it.

What becomes of a published entry depends on the bus and on the event. Redis keeps the
events in its streams for the retention window, so the entry of an event the store makes
only once (``RECORDED_ONCE_KINDS``: a new message, a status change) is deleted: PostgreSQL
need not hold a second copy of three days of events, and a delete costs it less than the
update that marks. Any other entry is marked published, and purged past the retention
window: it is what stops Meta's repeat of a reaction, a read or an edit, which may come
hours later (Meta retries for 36 hours), from being published again.

But Redis may lose what it holds (a restart without its data, a failover to a replica that
lagged), so on such a bus (``AckWatermarks``) an entry is let go only once every consumer
group acked it (``Watermark.acked_before_ms``): until then the outbox is the copy that
counts. A published entry waits for that in memory, still claimed, for up to ``hold_s``;
past it, it is marked published and held in the store, and let go when the groups have
acked it (the sweep looks). When the bus reports a loss, everything held, in the store and
in memory, is published again (same event ids; consumers dedupe), the store's first: it is
the older. Redis refuses an append once it may have lost data (``BusLost``: its markers
gone, or another server), so that what was lost goes out again before anything newer of
its conversation, whichever relay publishes next. The in-process bus has
no log but the outbox: there every entry is marked, and purged past the retention window,
which must not be shorter than the bus's. The same
periodic purge drops what ingestion keeps of unsends and edits that came before their
message (tombstones, early edits), past their own retention (``TOMBSTONE_RETENTION``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.bus import metrics
from gateway.domain.bus import AckWatermarks, Bus, Watermark
from gateway.domain.errors import BusLost, BusUnavailable
from gateway.domain.events import RECORDED_ONCE_KINDS
from gateway.domain.inbound import TOMBSTONE_RETENTION
from gateway.domain.store import OutboxEntry, Store
from gateway.services.rounds import Rounds
from gateway.tasks import finish_or_cancel

log = logging.getLogger(__name__)

_DROPPED_KINDS = frozenset(kind.value for kind in RECORDED_ONCE_KINDS)


@dataclass(slots=True, eq=False)
class _Published:
    """Entries published in one bus call and not settled yet."""

    entries: Sequence[OutboxEntry]
    # The bus's clock at the last append (``AckWatermarks``); None: the bus does not say.
    mark: int | None
    at: float  # time.monotonic() at the publish


def _bus_time(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


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
        settle_interval_s: float = 0.05,
        tombstone_retention_s: float = TOMBSTONE_RETENTION.total_seconds(),
        hold_s: float = 10.0,
        look_interval_s: float = 0.25,
    ) -> None:
        self._store = store
        self._bus = bus
        # A bus that may lose what it holds and tells when every group acked it.
        self._watch = bus if bus.keeps_events and isinstance(bus, AckWatermarks) else None
        # Well within the lease: an entry waiting in memory stays claimed meanwhile.
        self._hold_s = min(hold_s, lease_s / 3)
        # Whether the bus was looked at since the start (a loss it reports then has only
        # the store's held entries to answer).
        self._looked = False
        self._quiet_until = 0.0
        self._batch_size = batch_size
        self._lease = timedelta(seconds=lease_s)
        self._sweep_interval_s = sweep_interval_s
        self._retention = timedelta(seconds=retention_s)
        self._tombstone_retention = timedelta(seconds=tombstone_retention_s)
        self._purge_interval_s = purge_interval_s
        # On a bus that tells acks, settling asks it first (about 1.4 ms of this process's
        # CPU on Redis with 16 shards): not more often than ``look_interval_s``. What waits
        # meanwhile stays claimed, and goes in larger deletes.
        self._settle_interval_s = (
            max(settle_interval_s, look_interval_s) if self._watch else settle_interval_s
        )
        # Entries published but not yet settled, and when to settle them.
        self._unsettled: list[_Published] = []
        self._settle_due = 0.0
        self._wake = asyncio.Event()
        # Work in commit order: handed-over entries, and None where a producer notified
        # (a claim must run there, so that what it committed is published in its place).
        self._work: deque[Sequence[OutboxEntry] | None] = deque()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Events published, and of those, settled (deleted or marked in the outbox).
        self.published = 0
        self.settled = 0

    @property
    def lease(self) -> timedelta:
        """How long entries claimed for this relay stay claimed before the sweep takes them."""
        return self._lease

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
        """Stops after the batch in hand (a batch cut off between publish and settling is
        only published again, but a store call cut off mid-transaction may not be safe)."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        await finish_or_cancel([self._task], grace_s)
        self._task = None

    def notify(self) -> None:
        """A transaction with events just committed: publish now rather than at the sweep."""
        if not self._work or self._work[-1] is not None:
            self._work.append(None)
        self._wake.set()

    def hand_over(self, entries: Sequence[OutboxEntry]) -> None:
        """Entries a transaction just committed already claimed for this relay (``lease``):
        published next, in this order, without claiming them again."""
        if entries:
            self._work.append(entries)
            self._wake.set()

    async def _drain(self) -> None:
        """Publishes the work queued so far in order; consecutive hand-overs share one bus
        call. What comes in meanwhile is for the next round: under a steady stream of
        hand-overs the queue is never empty, and the round must still settle and sweep."""
        todo = len(self._work)
        while todo and self._work:
            if self._work[0] is None:
                self._work.popleft()
                todo -= 1
                await self.run_once()
                continue
            batch: list[OutboxEntry] = []
            while (
                todo and self._work and self._work[0] is not None and len(batch) < self._batch_size
            ):
                todo -= 1
                taken = self._work.popleft()
                assert taken is not None
                batch.extend(taken)
            try:
                mark = await self._bus.publish_outbox(batch)
            except BusLost:
                await self._answer_loss(batch)
                return
            except BaseException:
                # Back at the head, so that the next round publishes it before anything
                # committed after it: left to the sweep, it would wait for its lease to
                # lapse while later events of its conversations went out first. (Should
                # the process die, the lease lapses and the sweep publishes it.)
                self._work.appendleft(batch)
                await self._keep_claims()
                raise
            self.published += len(batch)
            self._add_unsettled(batch, mark)
        if time.monotonic() >= self._settle_due or (
            self._watch is None and self._unsettled_count() >= self._batch_size
        ):
            await self._settle()

    def _add_unsettled(self, entries: Sequence[OutboxEntry], mark: int | None) -> None:
        if not self._unsettled:
            self._settle_due = time.monotonic() + self._settle_interval_s
        self._unsettled.append(_Published(entries, mark, time.monotonic()))

    def _unsettled_count(self) -> int:
        return sum(len(p.entries) for p in self._unsettled)

    async def _drain_all(self) -> None:
        while self._work:
            await self._drain()

    async def _settle_all(self) -> None:
        await self._settle(force=True)

    async def _settle(self, *, force: bool = False, release: bool = False) -> bool:
        """Settles what was published, for many small batches at once: they stay claimed
        meanwhile, and should the process die first they are only published again (same
        event_id) once the lease lapses. On a bus that may lose what it holds, only what
        every group acked is let go; what waited ``hold_s`` (or everything, with
        ``force``) is held in the store. ``release``: also look at the bus when nothing
        waits, and let go of the store's held entries every group acked since. True when
        the look found the bus had lost what it held (and it was published again)."""
        left, self._unsettled = self._unsettled, []
        try:
            untracked = [p for p in left if p.mark is None or self._watch is None]
            if untracked:
                await self._published([e for p in untracked for e in p.entries])
                left = [p for p in left if p.mark is not None and self._watch is not None]
            if self._watch is None or not (left or release):
                return False
            watermark = await self._look()
            if watermark.lost:
                await self._republish(left)
                left = []
                return True
            acked_before = watermark.acked_before_ms
            now = time.monotonic()
            acked = [
                p
                for p in left
                if acked_before is not None and p.mark is not None and p.mark < acked_before
            ]
            if acked:
                await self._published([e for p in acked for e in p.entries])
                left = [p for p in left if p not in acked]
            overdue = [p for p in left if force or now - p.at >= self._hold_s]
            if overdue:
                marks = [p.mark for p in overdue if p.mark is not None]
                seqs = [e.seq for p in overdue for e in p.entries]
                await self._store.hold_published(seqs, _bus_time(max(marks)))
                self.settled += len(seqs)
                left = [p for p in left if p not in overdue]
            if release and acked_before is not None:
                await self._store.release_held(_bus_time(acked_before), _DROPPED_KINDS)
            return False
        finally:
            # Whatever was not settled waits for the next round, ahead of what came since.
            self._unsettled[:0] = left
            if self._unsettled:
                self._settle_due = time.monotonic() + self._settle_interval_s

    async def _look(self) -> Watermark:
        """The bus's watermark; when it cannot be read (Redis down, or a managed Redis
        that refuses INFO or XINFO), nothing is known acked and what waited is held in
        the store, so that publishing goes on whatever this look costs."""
        assert self._watch is not None
        try:
            watermark = await self._watch.watermark()
        except BusUnavailable as exc:
            if time.monotonic() >= self._quiet_until:
                self._quiet_until = time.monotonic() + 60.0
                log.warning(
                    "outbox relay: the bus cannot tell what its groups acked;"
                    " published entries are held in the store",
                    extra={"error": str(exc)},
                )
            return Watermark(lost=False, acked_before_ms=None)
        self._looked = True
        return watermark

    async def _answer_loss(self, refused: Sequence[OutboxEntry]) -> None:
        """The bus refused to append ``refused`` (``BusLost``): they go back to the head of
        the work queue, and what the bus lost goes out again ahead of them (the settle's
        look finds the loss), so that nothing newer of a conversation is published before
        what it lost of it."""
        self._work.appendleft(refused)
        if not await self._settle(release=True):
            # The look failed, or raced another process's answer to the loss: try again
            # after the rounds' backoff rather than spin on a refusing bus.
            await self._keep_claims()
            raise BusUnavailable("the bus refused an append and reports no loss")

    async def _republish(self, published: Sequence[_Published]) -> None:
        """The bus lost what it held: the store's held entries and ``published`` (this
        relay's, in memory) are published again, the store's first (the older), by a
        claim at the head of the work queue."""
        assert self._watch is not None
        reclaimed = await self._store.reclaim_held(datetime.now(UTC))
        # Once the store's held entries are claimable again, and before this relay's are
        # queued: should the process die now, its own are still claimed by it, unpublished,
        # and a sweep publishes them when the lease lapses.
        await self._watch.recovered()
        entries = [e for p in published for e in p.entries]
        if entries:
            self._work.appendleft(entries)
        self._work.appendleft(None)
        self._wake.set()
        if reclaimed or entries:
            metrics.EVENTS_REPUBLISHED.labels(self._bus.backend).inc(reclaimed + len(entries))
            log.error(
                "bus lost what it held: publishing it again",
                extra={"held": reclaimed, "in_memory": len(entries)},
            )
        else:
            # A new Redis (or key prefix), or a loss of nothing the outbox still held.
            log.info("bus found without its markers: nothing held to publish again")

    async def _published(self, entries: Sequence[OutboxEntry]) -> None:
        kept = [e.seq for e in entries]
        if self._bus.keeps_events:
            dropped = [e.seq for e in entries if e.event.kind in RECORDED_ONCE_KINDS]
            if dropped:
                await self._store.delete_published(dropped)
                kept = [e.seq for e in entries if e.event.kind not in RECORDED_ONCE_KINDS]
        if kept:
            await self._store.mark_published(kept, datetime.now(UTC))
        self.settled += len(entries)

    async def run_once(self) -> int:
        """Publishes every claimable entry; returns how many were published."""
        # What this relay published is settled first: an entry whose claim lapsed meanwhile
        # (the bus or the store down for longer than the lease) would be claimed again.
        await self._settle()
        total = 0
        while True:
            now = datetime.now(UTC)
            entries = await self._store.claim_outbox(
                now=now, lease_until=now + self._lease, limit=self._batch_size
            )
            if not entries:
                return total
            try:
                mark = await self._bus.publish_outbox(entries)
            except BusLost:
                await self._answer_loss(entries)
                return total
            except BaseException:
                # Claimed for this relay: published first by the next round, as a failed
                # hand-over is, rather than left to wait for the lease to lapse.
                self._work.appendleft(entries)
                await self._keep_claims()
                raise
            total += len(entries)
            self.published += len(entries)
            if mark is not None and self._watch is not None:
                # Let go once every group acked them, as a hand-over is.
                self._add_unsettled(entries, mark)
            else:
                try:
                    await self._published(entries)
                except BaseException:
                    # Published: settled with the next round's, as a hand-over is, rather
                    # than claimed again by a sweep once the lease lapses and published twice.
                    self._add_unsettled(entries, None)
                    self._settle_due = time.monotonic()
                    raise
            if len(entries) < self._batch_size:
                return total

    async def _keep_claims(self) -> None:
        """Extends the claims of the entries held for another try, while the bus is down:
        a claim that lapsed meanwhile would have a sweep publish them too once it is back.
        Best effort: with the store down as well, the leases keep what they can."""
        held = [e.seq for batch in self._work if batch is not None for e in batch]
        # And those published but not settled yet: lapsed, a claim would publish them again.
        seqs = held + [e.seq for p in self._unsettled for e in p.entries]
        if not seqs:
            return
        now = datetime.now(UTC)
        try:
            await self._store.extend_outbox_claims(seqs, now=now, lease_until=now + self._lease)
        except Exception as exc:
            log.warning(
                "outbox relay: claims not extended", extra={"error": exc.__class__.__name__}
            )

    async def purge(self) -> int:
        """Purges past retention; returns how many outbox entries went."""
        now = datetime.now(UTC)
        purged = await self._store.purge_published(now - self._retention)
        await self._store.purge_tombstones(now - self._tombstone_retention)
        return purged

    async def _run(self) -> None:
        # Claimed entries stay leased until the lease lapses, then the sweep publishes
        # them: a failed round delays events, never loses them.
        rounds = Rounds("outbox relay", log)
        schedule = _Schedule(self._sweep_interval_s, self._purge_interval_s)
        # Until stopped: a stop asked for during a round finds ``_wake`` set, and ends below.
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), schedule.until_sweep())
            self._wake.clear()
            if self._stopping:
                # What was handed over is published and settled before leaving, so that
                # the next process does not publish it again; the rest waits for a sweep
                # (the lease keeps it, nothing is lost).
                for last in (self._drain_all, self._settle_all):
                    try:
                        await last()
                    except Exception as exc:
                        log.warning(
                            "outbox relay: left to the sweep on stop",
                            extra={"step": last.__name__, "error": exc.__class__.__name__},
                        )
                return
            await rounds.run(lambda: self._round(schedule))

    async def _round(self, schedule: _Schedule) -> None:
        if self._watch is not None and not self._looked:
            # Before the first publish: a loss the bus reports now (Redis lost its data
            # while no process ran) concerns the store's held entries alone.
            await self._settle(release=True)
        await self._drain()
        # Hand-overs alone never claim: the sweep must still run under steady load to pick
        # up lapsed leases and other processes' leftovers.
        if schedule.sweep_due():
            if self._watch is not None:
                await self._settle(release=True)
            await self.run_once()
        if schedule.purge_due():
            await self.purge()


class _Schedule:
    """When the relay's periodic sweep and purge are due next."""

    def __init__(self, sweep_interval_s: float, purge_interval_s: float) -> None:
        self._sweep_s = sweep_interval_s
        self._purge_s = purge_interval_s
        self._next_sweep = time.monotonic() + sweep_interval_s
        self._next_purge = time.monotonic() + purge_interval_s

    def until_sweep(self) -> float:
        return max(0.0, self._next_sweep - time.monotonic())

    def sweep_due(self) -> bool:
        if time.monotonic() < self._next_sweep:
            return False
        self._next_sweep = time.monotonic() + self._sweep_s
        return True

    def purge_due(self) -> bool:
        if time.monotonic() < self._next_purge:
            return False
        self._next_purge = time.monotonic() + self._purge_s
        return True
