"""Ending background tasks: a stopping component lets its tasks finish the step in hand,
and cancels only those still running after a grace period."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any


async def finish_or_cancel(tasks: Collection[asyncio.Task[Any]], grace_s: float) -> None:
    """Waits up to ``grace_s`` for ``tasks`` to end, cancels those still running, and
    returns once every one has ended. A task's own failure is not raised here: each
    component's loop logs its failures where they happen, and a stop must complete."""
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=grace_s)
    for task in late:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
