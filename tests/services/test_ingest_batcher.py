"""The group committer: concurrent jobs share one flush; a wait may end before its commit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Generic, TypeVar

import pytest
from prometheus_client import REGISTRY

from gateway.services.ingest_batcher import Closed, GroupCommitter

T = TypeVar("T")


class Recorder(Generic[T]):
    """A flush that answers each job with itself and remembers every batch it was given."""

    def __init__(self) -> None:
        self.flushed: list[list[T]] = []

    async def __call__(self, jobs: Sequence[T]) -> list[T]:
        self.flushed.append(list(jobs))
        return list(jobs)


async def test_jobs_submitted_together_share_one_flush() -> None:
    flushed: list[list[int]] = []

    async def flush(jobs: Sequence[int]) -> list[int]:
        flushed.append(list(jobs))
        return [j * 10 for j in jobs]

    committer: GroupCommitter[int, int] = GroupCommitter(flush, max_wait_s=0.01)
    await committer.start()
    try:
        results = await asyncio.gather(*(committer.submit(j) for j in range(5)))
    finally:
        await committer.aclose()
    assert results == [0, 10, 20, 30, 40]
    assert flushed == [[0, 1, 2, 3, 4]]


async def test_a_wait_that_times_out_leaves_its_job_to_commit() -> None:
    release = asyncio.Event()
    committed: list[str] = []

    async def flush(jobs: Sequence[str]) -> list[None]:
        await release.wait()
        committed.extend(jobs)
        return [None] * len(jobs)

    committer: GroupCommitter[str, None] = GroupCommitter(flush, max_wait_s=0.0)
    await committer.start()
    try:
        with pytest.raises(TimeoutError):
            await committer.submit("slow", timeout_s=0.05)
        assert committed == []
        release.set()
        # A later job commits after the one whose caller stopped waiting.
        await committer.submit("next", timeout_s=5)
    finally:
        await committer.aclose()
    assert committed == ["slow", "next"]


async def test_one_job_the_flush_cannot_take_fails_alone() -> None:
    async def flush(jobs: Sequence[int]) -> list[int]:
        if any(j < 0 for j in jobs):
            raise ValueError("negative")
        return list(jobs)

    name = "test-bad-job-batcher"
    committer: GroupCommitter[int, int] = GroupCommitter(flush, max_wait_s=0.01, name=name)
    await committer.start()
    try:
        results = await asyncio.gather(
            *(committer.submit(j) for j in (1, -1, 2)), return_exceptions=True
        )
    finally:
        await committer.aclose()
    assert results[0] == 1
    assert results[2] == 2
    assert isinstance(results[1], ValueError)
    # The batch of three failed, then the bad job alone: each is counted.
    failures = REGISTRY.get_sample_value(
        "switchboard_group_commit_failures_total", {"batcher": name}
    )
    assert failures == 2


async def test_a_lone_job_is_flushed_without_lingering() -> None:
    flush: Recorder[int] = Recorder()
    flushed = flush.flushed

    # A linger far longer than the test's timeout: only a flush that skips it answers.
    committer: GroupCommitter[int, int] = GroupCommitter(flush, max_wait_s=3600)
    await committer.start()
    try:
        assert await asyncio.wait_for(committer.submit(1), 5) == 1
        assert await asyncio.wait_for(committer.submit(2), 5) == 2
    finally:
        await committer.aclose()
    assert flushed == [[1], [2]]


async def test_each_batch_reports_its_commit_time_and_its_oldest_wait() -> None:
    name = "test-metrics-batcher"
    release = asyncio.Event()

    async def flush(jobs: Sequence[int]) -> list[int]:
        await release.wait()
        return list(jobs)

    def sample(metric: str, suffix: str) -> float:
        return REGISTRY.get_sample_value(f"{metric}_{suffix}", {"batcher": name}) or 0.0

    committer: GroupCommitter[int, int] = GroupCommitter(flush, max_wait_s=0.0, name=name)
    await committer.start()
    try:
        first = asyncio.ensure_future(committer.submit(1))
        await asyncio.sleep(0.01)  # the first batch is in its flush, held there
        second = asyncio.ensure_future(committer.submit(2))
        await asyncio.sleep(0.05)  # the second job waits for the worker meanwhile
        release.set()
        assert await asyncio.gather(first, second) == [1, 2]
    finally:
        await committer.aclose()
    assert sample("switchboard_group_commit_seconds", "count") == 2
    # The first flush was held for about 60 ms; the second job queued for about 50 ms.
    assert sample("switchboard_group_commit_seconds", "sum") >= 0.05
    assert sample("switchboard_group_commit_wait_seconds", "count") == 2
    assert sample("switchboard_group_commit_wait_seconds", "sum") >= 0.04


async def test_patient_jobs_wait_for_each_other_then_commit_together() -> None:
    flush: Recorder[str] = Recorder()
    flushed = flush.flushed

    committer: GroupCommitter[str, str] = GroupCommitter(flush, max_wait_s=0.0)
    await committer.start()
    try:
        first = asyncio.ensure_future(committer.submit("echo-1", patience_s=0.2))
        await asyncio.sleep(0.02)
        # Held for company meanwhile: nothing committed yet.
        assert flushed == []
        second = asyncio.ensure_future(committer.submit("echo-2", patience_s=0.2))
        assert await asyncio.gather(first, second) == ["echo-1", "echo-2"]
    finally:
        await committer.aclose()
    # The first one's patience ran out and took the second along.
    assert flushed == [["echo-1", "echo-2"]]


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_job_that_cannot_wait_ends_the_hold_and_commits_after_the_patient_ones(
    workers: int,
) -> None:
    flush: Recorder[str] = Recorder()
    flushed = flush.flushed

    committer: GroupCommitter[str, str] = GroupCommitter(flush, max_wait_s=0.0, workers=workers)
    await committer.start()
    try:
        echo = asyncio.ensure_future(committer.submit("echo", patience_s=3600))
        await asyncio.sleep(0.02)
        # Answered long before the echo's patience: the customer's message released it,
        # and the held worker took the message into its batch, behind the echo (an idle
        # second worker does not commit it on its own, ahead of the echo).
        assert await asyncio.wait_for(committer.submit("customer"), 5) == "customer"
        assert await asyncio.wait_for(echo, 5) == "echo"
    finally:
        await committer.aclose()
    assert flushed == [["echo", "customer"]]


async def test_patient_jobs_held_by_two_workers_all_commit_before_a_later_job() -> None:
    flush: Recorder[str] = Recorder()
    flushed = flush.flushed

    committer: GroupCommitter[str, str] = GroupCommitter(flush, max_wait_s=0.0, workers=2)
    await committer.start()
    try:
        # The second echo comes while the first is held: an idle worker takes it.
        first = asyncio.ensure_future(committer.submit("echo-1", patience_s=3600))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(committer.submit("echo-2", patience_s=3600))
        await asyncio.sleep(0.02)
        assert flushed == []
        assert await asyncio.wait_for(committer.submit("customer"), 5) == "customer"
        assert await asyncio.wait_for(asyncio.gather(first, second), 5) == ["echo-1", "echo-2"]
    finally:
        await committer.aclose()
    # One batch, in the order they came: no echo committed after the message that followed.
    assert flushed == [["echo-1", "echo-2", "customer"]]


async def test_jobs_held_when_the_committer_closes_are_answered_closed() -> None:
    committer: GroupCommitter[str, str] = GroupCommitter(Recorder[str](), max_wait_s=0.0)
    await committer.start()
    held = asyncio.ensure_future(committer.submit("echo", patience_s=3600))
    await asyncio.sleep(0.02)
    await committer.aclose()
    with pytest.raises(Closed):
        await asyncio.wait_for(held, 5)


async def test_a_flush_that_spends_a_cancellation_still_lets_the_committer_close() -> None:
    """redis-py may finish a command it was reading when the cancellation came and return
    its answer (the rate limiter flushes on Redis): the worker must end all the same."""
    entered = asyncio.Event()

    async def flush(jobs: Sequence[int]) -> list[int]:
        entered.set()
        with contextlib.suppress(asyncio.CancelledError):  # the client answers anyway
            await asyncio.sleep(0.2)
        return list(jobs)

    committer: GroupCommitter[int, int] = GroupCommitter(flush, max_wait_s=0)
    await committer.start()
    job = asyncio.create_task(committer.submit(1))
    await entered.wait()
    async with asyncio.timeout(5):
        await committer.aclose()
    assert await job == 1
