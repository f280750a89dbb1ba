"""Group commit: the work of concurrent requests goes into one transaction.

Each request ``submit``s a job and waits; a worker takes every job queued (up to
``max_items``, lingering at most ``max_wait_s`` for more while jobs come in numbers), hands
them to ``flush`` in one call, and resolves every waiting request with its result once
that call returns (after the commit). PERFORMANCE.md: per-row commits are CPU-bound here,
batching is the lever.

A job nobody waits on closely may be submitted with a patience: a batch made only of such
jobs is held up to that long for company, and the first job that cannot wait takes them
along into its commit, in the order they came.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gateway.domain.errors import ShuttingDown, Unavailable
from gateway.observability import metrics
from gateway.tasks import leave_if_cancelled

log = logging.getLogger(__name__)

J = TypeVar("J")
R = TypeVar("R")


@dataclass(slots=True)
class _Pending(Generic[J, R]):
    job: J
    future: asyncio.Future[R]
    queued_at: float
    # perf_counter() time until which the job may wait for company; 0: it may not.
    patient_until: float = 0.0


class Closed(ShuttingDown):
    """The batcher is shutting down; the job was not processed."""


class GroupCommitter(Generic[J, R]):
    def __init__(
        self,
        flush: Callable[[Sequence[J]], Awaitable[Sequence[R]]],
        *,
        size: Callable[[J], int] = lambda _: 1,
        max_items: int = 1000,
        max_wait_s: float = 0.001,
        workers: int = 1,
        name: str = "group-commit",
    ) -> None:
        self._flush = flush
        self._size = size
        self._max_items = max_items
        self._max_wait_s = max_wait_s
        self._workers = workers
        self._name = name
        # Observed once per batch, not per job: the hot paths submit thousands per second.
        self._commit_seconds = metrics.group_commit_seconds.labels(name)
        self._wait_seconds = metrics.group_commit_wait_seconds.labels(name)
        self._failures = metrics.group_commit_failures.labels(name)
        self._queue: asyncio.Queue[_Pending[J, R]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        # Size of the last batch collected: lingering only pays while jobs come in numbers.
        self._last_count = 0
        # Batches of patient jobs being held: resolved when company comes (see _hold).
        self._holds: list[asyncio.Future[None]] = []
        # The batch being held, if any: patient jobs another worker collects meanwhile join
        # it rather than wait in a hold of their own, which could be released after a
        # later job was committed.
        self._held: list[_Pending[J, R]] | None = None

    async def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._run(), name=f"{self._name}-{n}")
                for n in range(self._workers)
            ]

    async def aclose(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        # gather, not a suppressed await of each: a cancellation of this very wait (a
        # timeout around the close) must reach the caller, not be taken for the workers'.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(Closed("shutting down"))

    async def submit(self, job: J, *, timeout_s: float | None = None, patience_s: float = 0.0) -> R:
        """The job's result once its batch committed; the flush's error otherwise.

        After ``timeout_s`` the wait ends with TimeoutError, but the job stays queued (or
        in its batch) and may still commit: callers must make a retry of it harmless.

        A job with ``patience_s`` is one nobody waits on closely: a batch of such jobs
        alone is held up to that long for company (a job without patience, whose commit
        it then shares, or a full batch), so that they cost one commit for many rather
        than one each.
        """
        if self._closed or not self._tasks:
            raise Closed("not accepting work")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        now = time.perf_counter()
        patient_until = now + patience_s if patience_s > 0 else 0.0
        if self._holds and (not patient_until or self._queue.qsize() + 1 >= self._max_items):
            # Released before the job is queued, so that a held batch's worker wakes ahead
            # of an idle one and takes this job into its batch: a patient job is then never
            # committed after a later one that could not wait.
            for hold in self._holds:
                if not hold.done():
                    hold.set_result(None)
            self._holds.clear()
        self._queue.put_nowait(_Pending(job, future, now, patient_until))
        if timeout_s is None:
            return await future
        # One timer on the future rather than asyncio.timeout(), whose scope costs several
        # times as much on a path taken once per webhook request.
        timer = loop.call_later(timeout_s, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue  # joined the batch another worker holds
            started = time.perf_counter()
            # The first job is the oldest: the queue is first in, first out.
            self._wait_seconds.observe(started - batch[0].queued_at)
            await self._commit(batch)
            self._commit_seconds.observe(time.perf_counter() - started)
            # A flush on Redis (the rate limiter's) may have spent a cancellation.
            leave_if_cancelled()

    async def _collect(self) -> list[_Pending[J, R]]:
        first = await self._queue.get()
        batch = [first]
        count = self._size(first.job)
        count = self._take_queued(batch, count)
        try:
            if count < self._max_items and all(p.patient_until for p in batch):
                if self._held is not None:
                    self._held.extend(batch)
                    return []
                count = await self._hold(batch, count)
            elif count < self._max_items and self._max_wait_s > 0 and self._busy(count):
                # Linger once, on one timer: requests arriving together share one commit.
                # (A loop of sub-millisecond sleeps spins on event loops whose timers have
                # millisecond resolution, such as uvloop's, burning the CPU the requests
                # need.)
                await asyncio.sleep(self._max_wait_s)
                count = self._take_queued(batch, count)
        except asyncio.CancelledError:
            # Closing: the jobs taken off the queue are answered like those still on it.
            for p in batch:
                _fail(p, Closed("shutting down"))
            raise
        self._last_count = count
        return batch

    async def _hold(self, batch: list[_Pending[J, R]], count: int) -> int:
        """Holds a batch of patient jobs until company comes or the most pressed of them
        has waited its patience out, then takes whatever queued meanwhile. Patient jobs
        other workers collect meanwhile join the batch (``_held``), in the order they came.
        """
        remaining = min(p.patient_until for p in batch) - time.perf_counter()
        if remaining > 0:
            loop = asyncio.get_running_loop()
            hold: asyncio.Future[None] = loop.create_future()
            self._holds.append(hold)
            self._held = batch
            timer = loop.call_later(remaining, _release, hold)
            try:
                await hold
            finally:
                self._held = None
                timer.cancel()
                if hold in self._holds:
                    self._holds.remove(hold)
            count = sum(self._size(p.job) for p in batch)
        return self._take_queued(batch, count)

    def _busy(self, count: int) -> bool:
        """Whether more jobs are likely to come within the linger: several are queued
        already, or the last batch had several. A lone job in a quiet stretch is flushed at
        once rather than made to wait for company that is not coming."""
        return count > 1 or self._last_count > 1

    def _take_queued(self, batch: list[_Pending[J, R]], count: int) -> int:
        while count < self._max_items and not self._queue.empty():
            pending = self._queue.get_nowait()
            batch.append(pending)
            count += self._size(pending.job)
        return count

    async def _commit(self, batch: list[_Pending[J, R]]) -> None:
        try:
            results = await self._flush([p.job for p in batch])
        except Unavailable as exc:
            self._failures.inc()
            for p in batch:
                _fail(p, exc)
            return
        except Exception as exc:
            self._failures.inc()
            # Not the store being down: maybe one job the flush cannot take. Retry each
            # alone so that one bad job fails alone instead of its whole batch.
            if len(batch) == 1:
                log.exception("group commit failed", extra={"batcher": self._name})
                _fail(batch[0], exc)
                return
            for p in batch:
                await self._commit([p])
            return
        for p, result in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)


def _release(hold: asyncio.Future[None]) -> None:
    if not hold.done():
        hold.set_result(None)


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _fail(pending: _Pending[J, R], exc: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(exc)
