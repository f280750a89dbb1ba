"""One round of a background loop (relay, send worker) that must outlive its failures.

Work in those loops is claimed under a lease in the store, so a failed round loses
nothing: what it held is claimed again once the lease lapses. The loop only has to log
why, pause a little longer after each consecutive failure, and carry on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from gateway.domain.errors import Unavailable

FIRST_PAUSE_S = 0.1
MAX_PAUSE_S = 5.0


class Rounds:
    def __init__(self, name: str, log: logging.Logger) -> None:
        self._name = name
        self._log = log
        self._pause = FIRST_PAUSE_S

    async def run(self, step: Callable[[], Awaitable[object]]) -> bool:
        """Runs ``step``; False (after logging and pausing) when it failed."""
        try:
            await step()
        except Unavailable:
            self._log.warning(
                f"{self._name} cannot reach the store or bus, retrying", exc_info=True
            )
        except Exception:  # a bug must not stop the loop for every tenant; logged with traceback
            self._log.exception("%s failed, retrying", self._name)
        else:
            self._pause = FIRST_PAUSE_S
            return True
        await asyncio.sleep(self._pause)
        self._pause = min(self._pause * 2, MAX_PAUSE_S)
        return False
