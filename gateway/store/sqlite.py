"""The SQLite store, the embedded default: aiosqlite on one connection, WAL mode.

Every transaction starts with ``BEGIN IMMEDIATE`` under an asyncio lock, so writers are
serialized (within the process by the lock, across processes by SQLite's write lock and
``busy_timeout``); claiming needs no row locks here.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from gateway.domain.errors import AlreadyExists, StoreUnavailable
from gateway.store.base import SqlStore
from gateway.store.migrate import SCHEMA_TABLE, Migration
from gateway.store.rows import Params, Row
from gateway.store.sqltx import Executor

MEMORY = ":memory:"

# sqlite3.OperationalError covers SQL mistakes too; only these mean "cannot reach the data".
_UNAVAILABLE = ("locked", "busy", "unable to open", "disk i/o", "readonly", "disk is full")


class SqliteCodec:
    """Times as fixed-width UTC ISO 8601 text, so that text order is time order."""

    def ts(self, value: datetime) -> Any:
        return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"

    def ts_in(self, value: Any) -> datetime:
        return datetime.fromisoformat(str(value).removesuffix("Z")).replace(tzinfo=UTC)

    def json(self, value: Any) -> Any:
        return orjson.dumps(value).decode()

    def json_document(self, raw: bytes) -> Any:
        return raw.decode()

    def json_in(self, value: Any) -> Any:
        return orjson.loads(value)


@contextmanager
def translate_errors() -> Iterator[None]:
    try:
        yield
    except sqlite3.IntegrityError as exc:
        if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
            raise AlreadyExists("conflicts with an existing row") from exc
        raise
    except sqlite3.OperationalError as exc:
        if any(marker in str(exc).lower() for marker in _UNAVAILABLE):
            raise StoreUnavailable(f"SQLite is unavailable ({exc})") from exc
        raise


class SqliteExecutor:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    # Each call is one trip to aiosqlite's thread: a cursor used as a context manager costs
    # a second trip to close it (and a third to fetch), all under the store's write lock.
    async def fetch(
        self, sql: str, params: Params | None = None, *, replan: bool = False
    ) -> list[Row]:
        # ``replan`` is moot: without ANALYZE, SQLite's planner ignores tables' sizes.
        with translate_errors():
            found = await self._db.execute_fetchall(sql, params or {})
        return [dict(zip(row.keys(), row, strict=True)) for row in found]

    async def execute(self, sql: str, params: Params | None = None) -> int:
        with translate_errors():
            cursor = await self._db.execute(sql, params or {})
        # sqlite3 releases an unclosed cursor when it is collected; nothing stays pending.
        return int(cursor.rowcount)

    async def executemany(self, sql: str, params: Sequence[Params]) -> None:
        with translate_errors():
            await self._db.executemany(sql, params)

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        # SQLite undoes only the failed statement; the transaction stays usable as is.
        yield


class SqliteStore(SqlStore):
    backend = "sqlite"
    codec = SqliteCodec()
    lock_clause = ""
    timestamp_type = "TEXT"

    def __init__(self, path: str, *, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._dirty = False

    async def open(self) -> None:
        if self._db is not None:
            return
        if self.path != MEMORY:
            await asyncio.to_thread(Path(self.path).parent.mkdir, parents=True, exist_ok=True)
        with translate_errors():
            db = await aiosqlite.connect(self.path, isolation_level=None)
            db.row_factory = sqlite3.Row
            try:
                await db.execute("PRAGMA journal_mode = WAL")
                # FULL: a commit is on disk before it returns. Webhooks are answered 200
                # after their commit, and Meta does not send again what it got a 200 for;
                # NORMAL could lose the last commits on a power cut. Group commit keeps it to
                # one fsync per batch.
                await db.execute("PRAGMA synchronous = FULL")
                await db.execute("PRAGMA foreign_keys = ON")
                await db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            except BaseException:
                await db.close()
                raise
        self._db = db

    async def aclose(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[Executor]:
        async with self._lock:
            db = self._db
            if db is None:
                raise StoreUnavailable("SQLite store is not open")
            with translate_errors():
                if self._dirty:
                    await self._recover(db)
                # Until COMMIT or ROLLBACK has run, a cancelled caller may leave statements
                # queued on aiosqlite's thread; the next session cleans up after it.
                self._dirty = True
                await db.execute("BEGIN IMMEDIATE")
            try:
                yield SqliteExecutor(db)
                with translate_errors():
                    await db.execute("COMMIT")
            except Exception:
                # The failed statement has finished on aiosqlite's thread: safe to roll back.
                if db.in_transaction:
                    await db.execute("ROLLBACK")
                raise
            # Cancellation (a BaseException) may leave BEGIN, a statement or COMMIT still
            # queued; a ROLLBACK queued now could run after that COMMIT and fail. The next
            # session recovers instead (_dirty stays set).
            self._dirty = False

    async def _recover(self, db: aiosqlite.Connection) -> None:
        """Rolls back what a cancelled session left open. aiosqlite runs statements in
        order on one thread, so a no-op statement waits for everything queued before it."""
        await db.execute("SELECT 1")
        if db.in_transaction:
            await db.execute("ROLLBACK")
        self._dirty = False

    async def _lock_migrations(self, ex: Executor) -> None:
        # BEGIN IMMEDIATE already holds the database's write lock.
        return

    async def _run_migration(self, ex: Executor, migration: Migration) -> None:
        # executescript would commit behind our back; run the statements one by one.
        for statement in migration.statements():
            await ex.execute(statement)

    async def _schema_table_exists(self, ex: Executor) -> bool:
        found = await ex.fetch(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = :name",
            {"name": SCHEMA_TABLE},
        )
        return bool(found)
