"""The in-process bus: the embedded default, one process, the store's outbox as its log.

Every group keeps, per ordering key (the conversation), a queue of the entries it has not
acked yet, and a key whose head entry is in flight (or nacked with a delay) is *busy*: none
of its later entries is handed out until the head is acked, nacked or its deadline passes.
Keys that are not busy and have entries wait in a ready queue, so consumers take different
conversations in parallel and in arrival order.

Durability: events reach this bus from the outbox relay with their outbox ``seq``; acks are
written to the store behind the consumers' backs (``bus_ack``, batched), and with them the
attempt count of each delivery still unacked by then (``bus_record_attempts``: one acked
before that write, which comes within ``ack_flush_interval_s``, costs none). After a restart
``start`` reloads the published entries of the retention window and each group's acks and
attempts (``bus_load``), so everything a group had not acked is delivered again, same
event_id, as the next attempt. Losing the last few acks in a crash only means a few
redeliveries (at-least-once); losing the last attempt counts, a redelivery that counts one
attempt too few. Events published directly (``publish``, without an outbox seq) live in
memory only.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from gateway.bus import metrics
from gateway.domain.bus import Delivery, Subscription
from gateway.domain.errors import InvalidArgument, StoreUnavailable
from gateway.domain.events import Event
from gateway.domain.store import OutboxEntry, Store

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKEND = "memory"


@dataclass(slots=True, eq=False)
class _Entry:
    index: int
    event: Event
    seq: int | None  # the outbox seq; None for events published without the outbox
    published_at: float  # wall clock, for retention
    trimmed: bool = False


@dataclass(slots=True, eq=False)
class _Flight:
    entry: _Entry
    consumer: MemoryConsumer
    attempt: int
    deadline: float  # monotonic
    delivery_id: str


class _Group:
    """One consumer group's view of the log."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queues: dict[str, deque[_Entry]] = {}
        self.ready: deque[str] = deque()
        self.busy: set[str] = set()
        self.queued = 0
        self.attempts: dict[int, int] = {}
        self.flights: dict[int, _Flight] = {}  # by entry index
        self.deadlines: list[tuple[float, int, int]] = []  # (deadline, index, attempt)
        self.delayed: list[tuple[float, int, _Entry]] = []  # (due, index, entry)
        self._wake = asyncio.Event()

    # ---- waking consumers ----
    def wake(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def waiter(self) -> asyncio.Event:
        return self._wake

    # ---- queue operations ----
    def enqueue(self, entry: _Entry) -> None:
        key = entry.event.ordering_key
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = deque()
        queue.append(entry)
        self.queued += 1
        if len(queue) == 1 and key not in self.busy:
            self.ready.append(key)

    def requeue_front(self, entry: _Entry) -> None:
        """Puts an entry that was in flight back at the head of its key, and frees the key."""
        key = entry.event.ordering_key
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = deque()
        queue.appendleft(entry)
        self.queued += 1
        self.busy.discard(key)
        # Redeliveries go first: they are the oldest work of the group.
        self.ready.appendleft(key)

    def free(self, key: str) -> None:
        self.busy.discard(key)
        if self.queues.get(key):
            self.ready.append(key)

    def pop_ready(self) -> tuple[str, _Entry] | None:
        """The head entry of the first ready key; the key leaves the ready queue (the
        caller marks it busy, or puts it back with ``unpop``)."""
        while self.ready:
            key = self.ready.popleft()
            queue = self.queues.get(key)
            if not queue:
                self.queues.pop(key, None)
                continue
            entry = queue.popleft()
            self.queued -= 1
            if not queue:
                del self.queues[key]
            if entry.trimmed:
                if key in self.queues:
                    self.ready.appendleft(key)
                continue
            return key, entry
        return None

    def unpop(self, key: str) -> None:
        """The popped entry needs no delivery: the key's next entry is ready at once."""
        if key in self.queues:
            self.ready.appendleft(key)

    def drop_trimmed(self) -> None:
        for key in list(self.queues):
            kept = deque(e for e in self.queues[key] if not e.trimmed)
            self.queued -= len(self.queues[key]) - len(kept)
            if kept:
                self.queues[key] = kept
            else:
                del self.queues[key]
        self.ready = deque(k for k in self.ready if k in self.queues)

    def lag(self) -> int:
        return self.queued + len(self.flights) + len(self.delayed)

    def next_timer(self) -> float | None:
        times = []
        if self.deadlines:
            times.append(self.deadlines[0][0])
        if self.delayed:
            times.append(self.delayed[0][0])
        return min(times) if times else None


class MemoryConsumer:
    """One consumer's session in a group of the in-process bus."""

    def __init__(self, bus: MemoryBus, group: _Group, subscription: Subscription) -> None:
        self._bus = bus
        self._group = group
        self._sub = subscription
        self._flights: set[int] = set()
        self._closed = False
        self._labels = (BACKEND, subscription.group)

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def receive(self, max_count: int, timeout_s: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while not self._closed:
            self._bus._run_timers(self._group)
            out = self._take(max_count)
            if out:
                return out
            now = loop.time()
            if now >= give_up:
                return []
            wait = give_up - now
            timer = self._group.next_timer()
            if timer is not None:
                wait = min(wait, max(timer - now, 0.0) + 0.001)
            waiter = self._group.waiter()
            with suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), wait)
        return []

    def _take(self, max_count: int) -> list[Delivery]:
        group = self._group
        room = min(max_count, self._sub.max_in_flight - len(self._flights))
        out: list[Delivery] = []
        deadline = time.monotonic() + self._sub.ack_deadline_s
        while len(out) < room:
            popped = group.pop_ready()
            if popped is None:
                break
            key, entry = popped
            if not self._sub.matches(entry.event):
                # Outside this consumer's filters: acked for the group, never delivered.
                metrics.EVENTS_FILTERED.labels(*self._labels).inc()
                self._bus._record_ack(group.name, entry)
                group.attempts.pop(entry.index, None)
                group.unpop(key)
                continue
            attempt = group.attempts.get(entry.index, 0) + 1
            group.attempts[entry.index] = attempt
            self._bus._record_attempt(group.name, entry, attempt)
            delivery_id = f"{self._bus.epoch}.{entry.index}.{attempt}"
            group.busy.add(key)
            group.flights[entry.index] = _Flight(entry, self, attempt, deadline, delivery_id)
            heapq.heappush(group.deadlines, (deadline, entry.index, attempt))
            self._flights.add(entry.index)
            out.append(Delivery(delivery_id=delivery_id, attempt=attempt, event=entry.event))
        if out:
            metrics.EVENTS_DELIVERED.labels(*self._labels).inc(len(out))
            metrics.IN_FLIGHT.labels(*self._labels).inc(len(out))
        return out

    async def ack(self, delivery_ids: Sequence[str]) -> None:
        group = self._group
        acked = 0
        # All parsed first: an ack refused for a malformed id acks nothing.
        indexes = [_index_of(d, self._bus.epoch) for d in delivery_ids]
        for index in indexes:
            # Acked even when delivered again since (the work is done either way); not
            # when made before a restart (None): that index may name another event now.
            flight = group.flights.pop(index, None) if index is not None else None
            if flight is None:
                continue  # already acked, or its entry was trimmed
            acked += 1
            flight.consumer._forget(flight.entry.index)
            group.attempts.pop(flight.entry.index, None)
            self._bus._record_ack(group.name, flight.entry)
            group.free(flight.entry.event.ordering_key)
        if acked:
            metrics.EVENTS_ACKED.labels(*self._labels).inc(acked)
            group.wake()

    async def nack(self, delivery_id: str, delay_s: float = 0.0) -> None:
        group = self._group
        index = _index_of(delivery_id, self._bus.epoch)
        flight = group.flights.get(index) if index is not None else None
        # Only this very delivery, out with this consumer: a stale nack (its deadline
        # passed, delivered again since, maybe to another consumer) takes nothing away.
        if flight is None or flight.delivery_id != delivery_id or flight.consumer is not self:
            return
        del group.flights[flight.entry.index]
        flight.consumer._forget(flight.entry.index)
        metrics.EVENTS_REDELIVERED.labels(*self._labels, metrics.REASON_NACK).inc()
        if delay_s <= 0:
            group.requeue_front(flight.entry)
        else:
            # The key stays busy until the delay is over, so order holds.
            due = time.monotonic() + delay_s
            heapq.heappush(group.delayed, (due, flight.entry.index, flight.entry))
        group.wake()

    def _forget(self, index: int) -> None:
        if index in self._flights:
            self._flights.discard(index)
            metrics.IN_FLIGHT.labels(*self._labels).dec()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        group = self._group
        for index in sorted(self._flights):
            flight = group.flights.pop(index, None)
            if flight is not None:
                group.requeue_front(flight.entry)
                metrics.EVENTS_REDELIVERED.labels(*self._labels, metrics.REASON_CONSUMER_GONE).inc()
        metrics.IN_FLIGHT.labels(*self._labels).dec(len(self._flights))
        self._flights.clear()
        self._bus._consumers.discard(self)
        group.wake()


# epoch . log index . attempt, as MemoryConsumer.receive writes it.
_DELIVERY_ID = re.compile(r"([0-9a-f]{8})\.([1-9][0-9]{0,17})\.[1-9][0-9]{0,8}")


def _index_of(delivery_id: str, epoch: str) -> int | None:
    """The log index a delivery id names; None for one made by an earlier run of the bus
    (log indexes start again at each start); INVALID_ARGUMENT for anything else."""
    found = _DELIVERY_ID.fullmatch(delivery_id)
    if found is None:
        raise InvalidArgument("delivery_id", f"not a delivery id: {delivery_id!r}")
    return int(found[2]) if found[1] == epoch else None


class MemoryBus:
    """The in-process Bus; pass the store to make it durable across restarts."""

    backend = BACKEND
    keeps_events = False

    def __init__(
        self,
        store: Store | None,
        *,
        retention_s: float = 3 * 86400.0,
        trim_interval_s: float = 60.0,
        ack_flush_interval_s: float = 0.05,
    ) -> None:
        self._store = store
        self._retention_s = retention_s
        self._trim_interval_s = trim_interval_s
        self._ack_flush_interval_s = ack_flush_interval_s
        self._log: deque[_Entry] = deque()
        self._by_seq: dict[int, _Entry] = {}
        self._groups: dict[str, _Group] = {}
        self._loaded_acks: dict[str, set[int]] = {}
        self._loaded_attempts: dict[str, dict[int, int]] = {}
        self._index = itertools.count(1)
        # Names this run in its delivery ids: indexes start again at each start.
        self.epoch = secrets.token_hex(4)
        self._pending_acks: dict[str, list[int]] = {}
        # Per group, seq -> attempt of the deliveries not acked yet (written at the flush).
        self._pending_attempts: dict[str, dict[int, int]] = {}
        self._acks_waiting = asyncio.Event()
        self._consumers: set[MemoryConsumer] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    async def __aenter__(self) -> MemoryBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        if self._store is not None:
            since = datetime.now(UTC) - timedelta(seconds=self._retention_s)
            state = await self._store.bus_load(since=since)
            self._loaded_acks = state.acked
            self._loaded_attempts = state.attempts
            self._append([(e.event, e.seq) for e in state.entries])
            # Retention runs from the first publication, not from this start.
            for e in state.entries:
                if e.published_at is not None:
                    self._by_seq[e.seq].published_at = e.published_at.timestamp()
            for name in list(state.acked):
                self._group(name)
        self._tasks.append(asyncio.create_task(self._trim_loop(), name="bus-memory-trim"))
        if self._store is not None:
            self._tasks.append(asyncio.create_task(self._ack_loop(), name="bus-memory-acks"))

    async def aclose(self) -> None:
        for consumer in list(self._consumers):
            await consumer.aclose()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._flush_acks()
        self._started = False

    async def ping(self) -> None:
        return None

    async def publish(self, events: Sequence[Event]) -> None:
        self._append([(event, None) for event in events])

    async def publish_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        # A relay may publish an entry twice (a lease lapsed mid-publish): keep the first.
        self._append([(e.event, e.seq) for e in entries if e.seq not in self._by_seq])

    def _append(self, items: Sequence[tuple[Event, int | None]]) -> None:
        now = time.time()
        for event, seq in items:
            entry = _Entry(next(self._index), event, seq, now)
            self._log.append(entry)
            if seq is not None:
                self._by_seq[seq] = entry
            for group in self._groups.values():
                group.enqueue(entry)
        if items:
            metrics.EVENTS_PUBLISHED.labels(BACKEND).inc(len(items))
            for group in self._groups.values():
                group.wake()

    @asynccontextmanager
    async def subscribe(self, subscription: Subscription) -> AsyncIterator[MemoryConsumer]:
        if subscription.group not in self._groups and self._store is not None:
            await self._store.bus_add_group(subscription.group, datetime.now(UTC))
        consumer = MemoryConsumer(self, self._group(subscription.group), subscription)
        self._consumers.add(consumer)
        try:
            yield consumer
        finally:
            await consumer.aclose()

    async def group_lag(self, group: str) -> int:
        state = self._groups.get(group)
        lag = state.lag() if state is not None else sum(1 for e in self._log if not e.trimmed)
        metrics.GROUP_LAG.labels(BACKEND, group).set(lag)
        return lag

    async def trim(self) -> int:
        cutoff = time.time() - self._retention_s
        dropped = 0
        while self._log and self._log[0].published_at < cutoff:
            entry = self._log.popleft()
            entry.trimmed = True
            if entry.seq is not None:
                self._by_seq.pop(entry.seq, None)
            dropped += 1
        if dropped:
            for group in self._groups.values():
                group.drop_trimmed()
        return dropped

    # ---- internals ----
    def _group(self, name: str) -> _Group:
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = _Group(name)
            acked = self._loaded_acks.pop(name, set())
            tried = self._loaded_attempts.pop(name, {})
            for entry in self._log:
                if entry.seq is None or entry.seq not in acked:
                    group.enqueue(entry)
                    if entry.seq in tried:
                        group.attempts[entry.index] = tried[entry.seq]
        return group

    def _run_timers(self, group: _Group) -> None:
        now = time.monotonic()
        changed = False
        while group.deadlines and group.deadlines[0][0] <= now:
            _, index, attempt = heapq.heappop(group.deadlines)
            flight = group.flights.get(index)
            if flight is None or flight.attempt != attempt:
                continue  # acked or nacked since: a stale timer
            del group.flights[index]
            flight.consumer._forget(index)
            group.requeue_front(flight.entry)
            labels = (BACKEND, group.name, metrics.REASON_DEADLINE)
            metrics.EVENTS_REDELIVERED.labels(*labels).inc()
            changed = True
        while group.delayed and group.delayed[0][0] <= now:
            _, _, entry = heapq.heappop(group.delayed)
            group.requeue_front(entry)
            changed = True
        if changed:
            group.wake()

    def _record_ack(self, group: str, entry: _Entry) -> None:
        if entry.seq is not None and self._store is not None:
            self._pending_acks.setdefault(group, []).append(entry.seq)
            attempts = self._pending_attempts.get(group)
            if attempts is not None:
                attempts.pop(entry.seq, None)
            self._acks_waiting.set()

    def _record_attempt(self, group: str, entry: _Entry, attempt: int) -> None:
        if entry.seq is not None and self._store is not None:
            self._pending_attempts.setdefault(group, {})[entry.seq] = attempt
            self._acks_waiting.set()

    async def _ack_loop(self) -> None:
        while True:
            await self._acks_waiting.wait()
            # Waiting a little batches the acks of many deliveries into one write.
            await asyncio.sleep(self._ack_flush_interval_s)
            try:
                await self._flush_acks()
            except Exception:  # the loop must outlive any failed write: the acks stay pending
                log.exception("bus acks or attempt counts not stored, retrying")

    async def _flush_acks(self) -> None:
        """Writes the acks, then the attempt counts of the deliveries still unacked. What
        is not written stays pending for the next flush, whatever stopped it: the store, an
        unexpected error, or ``aclose`` cancelling this loop mid-write (the final flush
        then writes it; writing an ack or a count twice is harmless)."""
        self._acks_waiting.clear()
        if self._store is None:
            return
        acks, self._pending_acks = self._pending_acks, {}
        try:
            await _write_per_group(acks, self._store.bus_ack, "acks")
        finally:
            for group, seqs in acks.items():
                self._pending_acks.setdefault(group, []).extend(seqs)
                self._acks_waiting.set()
        # Taken after the acks' write: an ack that came meanwhile took its count away.
        attempts = {g: a for g, a in self._pending_attempts.items() if a}
        self._pending_attempts = {}
        try:
            await _write_per_group(attempts, self._store.bus_record_attempts, "attempts")
        finally:
            for group, counts in attempts.items():
                kept = self._pending_attempts.setdefault(group, {})
                for seq, attempt in counts.items():
                    kept[seq] = max(attempt, kept.get(seq, 0))
                self._acks_waiting.set()

    async def _trim_loop(self) -> None:
        while True:
            await asyncio.sleep(self._trim_interval_s)
            await self.trim()
            for name in self._groups:
                await self.group_lag(name)


async def _write_per_group(
    pending: dict[str, T], write: Callable[[str, T], Awaitable[None]], what: str
) -> None:
    """Writes each group's share, removing it from ``pending`` once written: what is left
    there when this returns or raises was not written."""
    for group, items in list(pending.items()):
        try:
            await write(group, items)
        except StoreUnavailable:
            # Kept for the next flush; if the process dies first, these events are
            # delivered again after the restart, which at-least-once allows.
            log.warning("bus %s not stored yet, retrying", what, extra={"group": group})
        else:
            del pending[group]
