"""ConnectionActivity on the real stores: touches are written in the background, at most
once per interval, on close, and again after the store failed."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import Any, cast

import pytest

from gateway.domain.errors import StoreUnavailable
from gateway.domain.models import Connection
from gateway.domain.store import Store, Tx
from gateway.services.activity import ConnectionActivity
from tests.store.conftest import AnyStore
from tests.store.factories import connection, now


class FlakyStore:
    """The real store, except that its next ``failures`` transactions cannot start, as
    when the database is down; records when each transaction was asked for."""

    def __init__(self, store: AnyStore) -> None:
        self._store = store
        self.failures = 0
        self.asked: list[float] = []

    def transaction(self, *, pipelined: bool = False) -> AbstractAsyncContextManager[Tx]:
        self.asked.append(time.monotonic())
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("PostgreSQL is unavailable (test)")
        return self._store.transaction(pipelined=pipelined)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def saved(store: AnyStore) -> Connection:
    conn = connection()
    conn.last_event_at = None
    async with store.transaction() as tx:
        await tx.save_connection(conn)
    return conn


async def last_event_at(store: AnyStore, conn: Connection) -> datetime | None:
    async with store.transaction() as tx:
        found = await tx.get_connection(conn.id)
    assert found is not None
    return found.last_event_at


async def eventually(store: AnyStore, conn: Connection, wanted: datetime) -> None:
    deadline = time.monotonic() + 5
    while (got := await last_event_at(store, conn)) != wanted:
        assert time.monotonic() < deadline, f"last_event_at is {got}, not {wanted}"
        await asyncio.sleep(0.02)


async def test_touches_are_written_at_most_once_per_interval(store: AnyStore) -> None:
    a, b = await saved(store), await saved(store)
    flaky = FlakyStore(store)
    activity = ConnectionActivity(cast(Store, flaky), interval_s=0.4)
    await activity.start()
    try:
        t = now()
        # Idle until now: written at once.
        activity.touch(a.id, t)
        await eventually(store, a, t)
        # Several touches inside one interval: one write, with the latest time of each.
        activity.touch(a.id, t + timedelta(seconds=2))
        activity.touch(b.id, t + timedelta(seconds=1))
        activity.touch(a.id, t + timedelta(seconds=1))
        await eventually(store, a, t + timedelta(seconds=2))
        assert await last_event_at(store, b) == t + timedelta(seconds=1)
        assert len(flaky.asked) == 2
        assert flaky.asked[1] - flaky.asked[0] >= 0.4 * 0.9
        assert activity.pending == 0
    finally:
        await activity.aclose()
    assert len(flaky.asked) == 2  # nothing left to write on close


async def test_what_is_pending_is_written_on_close(store: AnyStore) -> None:
    a, b = await saved(store), await saved(store)
    activity = ConnectionActivity(store, interval_s=60)
    await activity.start()
    t = now()
    activity.touch(a.id, t)
    await eventually(store, a, t)
    # Within the interval: not written until the service closes.
    activity.touch(b.id, t)
    await asyncio.sleep(0.1)
    assert await last_event_at(store, b) is None
    await activity.aclose()
    assert await last_event_at(store, b) == t

    # Never started (or already stopped): close still writes.
    idle = ConnectionActivity(store, interval_s=60)
    idle.touch(a.id, t + timedelta(seconds=1))
    await idle.aclose()
    assert await last_event_at(store, a) == t + timedelta(seconds=1)


async def test_a_failed_write_is_logged_and_retried_at_the_next_flush(
    store: AnyStore, caplog: pytest.LogCaptureFixture
) -> None:
    conn = await saved(store)
    flaky = FlakyStore(store)
    flaky.failures = 1
    activity = ConnectionActivity(cast(Store, flaky), interval_s=0.2)
    caplog.set_level(logging.WARNING, logger="gateway.services.activity")
    await activity.start()
    try:
        t = now()
        activity.touch(conn.id, t)
        # Touched again while the first write is failing: the retry carries the latest.
        await asyncio.sleep(0.05)
        activity.touch(conn.id, t + timedelta(seconds=1))
        activity.touch(conn.id, t - timedelta(seconds=1))
        await eventually(store, conn, t + timedelta(seconds=1))
    finally:
        await activity.aclose()
    assert len(flaky.asked) == 2
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "connection activity not saved, retrying at the next flush"


async def test_a_failure_on_close_is_logged_not_raised(
    store: AnyStore, caplog: pytest.LogCaptureFixture
) -> None:
    conn = await saved(store)
    flaky = FlakyStore(store)
    activity = ConnectionActivity(cast(Store, flaky), interval_s=60)
    t = now()
    activity.touch(conn.id, t)
    flaky.failures = 1
    caplog.set_level(logging.WARNING, logger="gateway.services.activity")
    await activity.aclose()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert await last_event_at(store, conn) is None
    # Kept: a later flush (should the service go on) still writes it.
    assert activity.pending == 1
    assert await activity.flush()
    assert await last_event_at(store, conn) == t
