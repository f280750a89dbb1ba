"""Ending background tasks: a stopping component lets its tasks finish the step in hand,
and cancels only those still running after a grace period."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from typing import Any

log = logging.getLogger(__name__)


async def finish_or_cancel(tasks: Collection[asyncio.Task[Any]], grace_s: float) -> None:
    """Waits up to ``grace_s`` for ``tasks`` to end, cancels those still running, and
    returns once every one has ended. A task's own failure is logged, not raised: a stop
    must complete, and a failure nobody awaited would otherwise go unseen."""
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=grace_s)
    for task in late:
        task.cancel()
    ended = await asyncio.gather(*tasks, return_exceptions=True)
    for task, outcome in zip(tasks, ended, strict=True):
        if isinstance(outcome, Exception):
            log.warning(
                "task ended with an error",
                extra={"task": task.get_name(), "error": type(outcome).__name__},
                exc_info=outcome,
            )


def leave_if_cancelled() -> None:
    """Raises CancelledError when the running task is being cancelled.

    For loops whose steps call redis-py: it may finish reading a command when the
    cancellation comes and return the answer, the CancelledError spent, and a loop that
    goes on waits for work that never comes while whoever cancelled it waits for it to end.
    Called between steps, it ends the loop all the same."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
