"""A caller cancelled in the middle of a transaction must not wedge the store."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.domain.ids import new_id
from gateway.domain.models import ApiToken, Scope
from gateway.store import SqliteStore
from tests.store.factories import now


def make_token(name: str) -> ApiToken:
    return ApiToken(
        id=new_id("tok"),
        name=name,
        tenants=("*",),
        scopes=frozenset({Scope.READ}),
        created_at=now(),
    )


async def test_a_transaction_cancelled_midway_leaves_the_sqlite_store_usable(
    tmp_path: Path,
) -> None:
    async with SqliteStore(str(tmp_path / "cancel.db")) as store:
        await store.migrate()
        started = asyncio.Event()

        async def slow_writer() -> None:
            async with store.transaction() as tx:
                await tx.create_api_token(make_token("cancelled"), "hash-cancelled")
                started.set()
                await asyncio.sleep(10)

        for _ in range(3):
            started.clear()
            task = asyncio.create_task(slow_writer())
            await started.wait()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        async def quick_writer(n: int) -> None:
            async with store.transaction() as tx:
                await tx.create_api_token(make_token(f"quick-{n}"), f"hash-quick-{n}")

        # Cancelled at every point of a short transaction: while BEGIN, the statement or
        # COMMIT is queued. Nothing but the cancellation (or success) may come out of it.
        for n in range(300):
            task = asyncio.create_task(quick_writer(n))
            # Real time, not loop turns: the statements run on aiosqlite's thread.
            await asyncio.sleep((n % 30) * 0.0001)
            task.cancel()
            (outcome,) = await asyncio.gather(task, return_exceptions=True)
            assert outcome is None or isinstance(outcome, asyncio.CancelledError), outcome

        async with store.transaction() as tx:
            await tx.create_api_token(make_token("kept"), "hash-kept")
        async with store.transaction() as tx:
            names = {t.name for t in await tx.list_api_tokens()}
            assert await tx.find_api_token("hash-cancelled") is None
        assert "kept" in names
        assert "cancelled" not in names
