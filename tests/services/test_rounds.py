from __future__ import annotations

import logging
import time

import pytest

from gateway.domain.errors import StoreUnavailable
from gateway.services.rounds import FIRST_PAUSE_S, Rounds


async def test_a_failed_round_is_logged_and_paused_and_success_resets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("tests.rounds")
    rounds = Rounds("worker", log)
    outcomes: list[BaseException | None] = [StoreUnavailable("down"), RuntimeError("bug"), None]

    async def step() -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    caplog.set_level(logging.WARNING, logger="tests.rounds")
    started = time.monotonic()
    assert not await rounds.run(step)
    assert not await rounds.run(step)
    # The second failure waits twice as long as the first.
    assert time.monotonic() - started >= FIRST_PAUSE_S * 3 * 0.9
    assert await rounds.run(step)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "worker cannot reach the store or bus, retrying",
        "worker failed, retrying",
    ]
    assert caplog.records[1].exc_info is not None


async def test_cancellation_is_not_swallowed() -> None:
    import asyncio

    async def step() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await Rounds("worker", logging.getLogger("tests.rounds")).run(step)
