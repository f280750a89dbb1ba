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

        # Cancelled right as BEGIN is queued: the next session must still start cleanly.
        for _ in range(20):
            task = asyncio.create_task(slow_writer())
            await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        async with store.transaction() as tx:
            await tx.create_api_token(make_token("kept"), "hash-kept")
        async with store.transaction() as tx:
            names = [t.name for t in await tx.list_api_tokens()]
            assert await tx.find_api_token("hash-cancelled") is None
        assert names == ["kept"]
