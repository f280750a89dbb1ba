"""The PostgreSQL store: psycopg 3 on an explicitly opened async connection pool.

Claims lock rows with ``FOR UPDATE SKIP LOCKED`` so any number of replicas can share the
work; migrations serialize on a transaction-scoped advisory lock.
"""

from __future__ import annotations

import functools
import re
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
)
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import psycopg
from psycopg import AsyncPipeline
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg.types.json import Json, Jsonb, set_json_loads
from psycopg_pool import AsyncConnectionPool

from gateway.domain.codec import event_to_dict
from gateway.domain.errors import AlreadyExists, StoreUnavailable
from gateway.domain.events import Event
from gateway.store.base import SqlStore
from gateway.store.migrate import SCHEMA_TABLE, Migration
from gateway.store.rows import Codec, Params, Row
from gateway.store.sqltx import Executor, SqlTx

# Any fixed 63-bit number; it only has to be the same for every Switchboard process.
_MIGRATION_LOCK = 0x5357_4254_4D49_4752

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=1024)
def to_psycopg(sql: str) -> str:
    """Rewrites the shared ``:name`` parameters as psycopg's binary ``%(name)b``: text
    parameters cost several times more on the Python side, arrays (``unnest``) most of all,
    where every element of a JSON array was escaped with a regular expression."""
    return _PARAM.sub(r"%(\1)b", sql.replace("%", "%%"))


def _as_is(encoded: bytes) -> bytes:
    return encoded


class PgCodec:
    """timestamptz and JSONB travel natively (binary where psycopg can)."""

    def ts(self, value: datetime) -> Any:
        return value

    def ts_in(self, value: Any) -> datetime:
        if not isinstance(value, datetime):
            raise TypeError(f"expected a timestamptz, got {type(value).__name__}")
        return value.astimezone(UTC)

    def json(self, value: Any) -> Any:
        return Jsonb(value, dumps=orjson.dumps)

    def json_document(self, raw: bytes) -> Any:
        return Json(raw, dumps=_as_is)

    def json_in(self, value: Any) -> Any:
        return value


# SQLSTATE class 54: psycopg files it under OperationalError with the server's troubles.
_PROGRAM_LIMIT_EXCEEDED = "54"


@contextmanager
def translate_errors() -> Iterator[None]:
    """psycopg errors -> domain errors; the driver's text stays in the chained cause."""
    try:
        yield
    except pg_errors.UniqueViolation as exc:
        constraint = exc.diag.constraint_name or "unique constraint"
        raise AlreadyExists(f"conflicts with an existing row ({constraint})") from exc
    except psycopg.OperationalError as exc:
        if (exc.sqlstate or "").startswith(_PROGRAM_LIMIT_EXCEEDED):
            # A limit one statement went past (an index entry too large, say): that
            # request's error, not the server's. Callers batching it retry each job alone.
            raise
        # Includes the pool's timeout, a lost connection, a server shutting down.
        raise StoreUnavailable(f"PostgreSQL is unavailable ({type(exc).__name__})") from exc


class _Deferred:
    """A statement sent in pipeline mode whose rows are read later (``fetch_deferred``),
    also after its transaction ended: the rows are then those read as it closed."""

    __slots__ = ("_cursor", "_executor", "_rows", "_syncs")

    def __init__(self, executor: PgExecutor, cursor: psycopg.AsyncCursor[Row]) -> None:
        self._executor = executor
        self._cursor = cursor
        self._syncs = executor.syncs
        self._rows: list[Row] | None = None

    async def rows(self) -> list[Row]:
        if self._rows is None:
            with translate_errors():
                if self._executor.syncs == self._syncs:
                    await self._executor._settled()
                await self._read()
        assert self._rows is not None
        return self._rows

    async def _read(self) -> None:
        try:
            self._rows = list(await self._cursor.fetchall())
        finally:
            await self._cursor.close()
            self._executor.unread.discard(self)


class PgExecutor:
    def __init__(
        self, conn: psycopg.AsyncConnection[Any], pipeline: AsyncPipeline | None = None
    ) -> None:
        self._conn = conn
        self._pipeline = pipeline
        # Pipeline syncs so far: a deferred statement sent before the last one has its rows.
        self.syncs = 0
        # Deferred statements not read yet: read as the transaction closes, while the
        # connection is still this transaction's.
        self.unread: set[_Deferred] = set()

    async def _settled(self) -> None:
        """In pipeline mode, syncs what was sent: a statement's rows, row count or error
        are known when the call that ran it returns, as without a pipeline, and a failed
        statement leaves no aborted pipeline behind (guard() goes on after one)."""
        if self._pipeline is not None:
            await self._pipeline.sync()
            self.syncs += 1

    async def closed(self) -> None:
        """The pipeline has synced its last (the COMMIT): reads what no one read yet, so
        that deferred statements sent last, with the COMMIT, are answered after it."""
        self._pipeline = None
        for deferred in list(self.unread):
            await deferred._read()

    async def fetch_deferred(self, sql: str, params: Params, *, replan: bool = False) -> _Deferred:
        """Sends a statement without waiting for it: its rows (or its error) come back
        with the next statement that waits, in the same round trip, and are read with
        ``rows()``. Statements that do not depend on each other then cost one round trip
        together (each costs about as much CPU as the statement itself here). One sent
        last travels with the COMMIT, and its rows can be read once the transaction
        ended."""
        cursor = self._conn.cursor(row_factory=dict_row)
        with translate_errors():
            await cursor.execute(to_psycopg(sql), params, prepare=False if replan else None)
        deferred = _Deferred(self, cursor)
        self.unread.add(deferred)
        return deferred

    async def fetch(
        self, sql: str, params: Params | None = None, *, replan: bool = False
    ) -> list[Row]:
        with translate_errors():
            async with self._conn.cursor(row_factory=dict_row) as cur:
                if params is None:
                    await cur.execute(sql)
                else:
                    # Unprepared, PostgreSQL plans the statement for this very call.
                    await cur.execute(to_psycopg(sql), params, prepare=False if replan else None)
                await self._settled()
                return list(await cur.fetchall())

    async def fetch_tuples(self, sql: str, params: Params) -> list[tuple[Any, ...]]:
        """The rows as tuples, in the statement's column order: for hot statements whose
        rows are read once, where a dict per row costs more than the row itself."""
        with translate_errors():
            async with self._conn.cursor() as cur:
                await cur.execute(to_psycopg(sql), params)
                await self._settled()
                return list(await cur.fetchall())

    async def execute(self, sql: str, params: Params | None = None) -> int:
        with translate_errors():
            if params is None:
                cur = await self._conn.execute(sql)
            else:
                cur = await self._conn.execute(to_psycopg(sql), params)
            await self._settled()
            return cur.rowcount

    async def execute_native(self, sql: str, params: Params) -> int:
        """Runs psycopg-specific SQL (``%(name)b`` binary parameters and the like)."""
        with translate_errors():
            cur = await self._conn.execute(sql, params)
            await self._settled()
            return cur.rowcount

    async def executemany(self, sql: str, params: Sequence[Params]) -> None:
        with translate_errors():
            async with self._conn.cursor() as cur:
                await cur.executemany(to_psycopg(sql), params)
                await self._settled()

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        # A nested transaction is a savepoint: a failed statement does not doom the outer one.
        with translate_errors():
            async with self._conn.transaction():
                yield


# One statement per batch, binary arrays: PERFORMANCE.md measures text-formatted arrays
# as six times slower on the Python side. WITH ORDINALITY keeps seq in the caller's order.
_ADD_EVENTS = (
    "INSERT INTO outbox (event_id, event, created_at)"
    " SELECT e.event_id, e.event, %(now)s"
    " FROM unnest(%(ids)b::text[], %(events)b::json[]) WITH ORDINALITY AS e(event_id, event, n)"
    " ORDER BY e.n ON CONFLICT (event_id) DO NOTHING"
)


class PgTx(SqlTx):
    def __init__(self, executor: Executor, codec: Codec, *, lock_clause: str) -> None:
        super().__init__(executor, codec, lock_clause=lock_clause)
        if not isinstance(executor, PgExecutor):
            raise TypeError("PgTx runs on a PgExecutor")
        self._pg = executor

    async def add_events(self, events: Sequence[Event]) -> None:
        if not events:
            return
        await self._pg.execute_native(
            _ADD_EVENTS,
            {
                "now": datetime.now(UTC),
                "ids": [e.event_id for e in events],
                "events": [Json(event_to_dict(e), dumps=orjson.dumps) for e in events],
            },
        )


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    set_json_loads(orjson.loads, conn)


class _RecentUseCheck:
    """The pool's check on checkout, skipped for a connection returned healthy moments ago.

    Checking every checkout costs a round trip per transaction (about 100 µs of CPU here,
    a quarter of a small transaction); what it guards against, connections an outage
    killed, only happens to connections that sat in the pool through that outage.
    """

    def __init__(self, fresh_s: float = 1.0) -> None:
        self._fresh_s = fresh_s
        self._returned: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary()
        )

    async def check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        returned = self._returned.pop(conn, None)
        if returned is not None and time.monotonic() - returned < self._fresh_s:
            return
        await AsyncConnectionPool.check_connection(conn)

    def used(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The connection just completed a transaction."""
        self._returned[conn] = time.monotonic()


class PostgresStore(SqlStore):
    backend = "postgres"
    codec = PgCodec()
    lock_clause = " FOR UPDATE SKIP LOCKED"
    timestamp_type = "timestamptz"
    tx_class = PgTx

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout_s: float = 10.0,
        connect_timeout_s: int = 5,
    ) -> None:
        kwargs: dict[str, Any] = {"autocommit": True}
        self._recent = _RecentUseCheck()
        if "connect_timeout" not in parse_qs(urlsplit(url).query):
            kwargs["connect_timeout"] = connect_timeout_s
        self._pool = AsyncConnectionPool(
            url,
            open=False,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout_s,
            kwargs=kwargs,
            configure=_configure,
            # After an outage the pool would otherwise hand out connections the outage
            # killed, failing the first call of each.
            check=self._recent.check,
            name="switchboard-store",
        )

    @property
    def pool_size(self) -> int:
        """The connections this store may hold at once."""
        return self._pool.max_size

    async def open(self) -> None:
        # Not waiting lets the process start (and report not-ready) while PostgreSQL is down.
        await self._pool.open(wait=False)

    async def aclose(self) -> None:
        await self._pool.close()

    def _session(self) -> AbstractAsyncContextManager[Executor]:
        # Each statement in its own round trip (BEGIN and COMMIT included). Measured here,
        # a transaction of five statements costs ~400 µs of client CPU this way and ~590 µs
        # in pipeline mode, where each statement that waits takes a send for itself and one
        # for its sync: pipeline mode only pays for blocks built around deferred statements.
        # A statement without parameters goes as a simple query, so a migration's script of
        # several statements runs in this session too (SqlStore.migrate).
        return self._transaction(pipelined=False)

    def _pipelined_session(self) -> AbstractAsyncContextManager[Executor]:
        # Pipeline mode: BEGIN goes out with the transaction's first statement and COMMIT
        # is read back when the pipeline closes, and statements sent with fetch_deferred
        # share the round trip of the next one that waits. Every other statement still
        # waits for its own result (PgExecutor), so errors surface where they did. A failed
        # COMMIT raises here, before the caller takes the transaction for done.
        return self._transaction(pipelined=True)

    @asynccontextmanager
    async def _transaction(self, *, pipelined: bool) -> AsyncIterator[Executor]:
        with translate_errors():
            async with self._pool.connection() as conn:
                async with AsyncExitStack() as stack:
                    # Entered first, left last: the COMMIT is read back as the pipeline closes.
                    pipeline = (
                        await stack.enter_async_context(conn.pipeline()) if pipelined else None
                    )
                    async with conn.transaction():
                        executor = PgExecutor(conn, pipeline)
                        yield executor
                if executor.unread:
                    await executor.closed()
                self._recent.used(conn)

    async def _lock_migrations(self, ex: Executor) -> None:
        await ex.fetch("SELECT pg_advisory_xact_lock(:key)", {"key": _MIGRATION_LOCK})

    async def _run_migration(self, ex: Executor, migration: Migration) -> None:
        # No parameters: psycopg sends the whole script as one simple query.
        await ex.execute(migration.sql)

    async def _schema_table_exists(self, ex: Executor) -> bool:
        found = await ex.fetch(
            "SELECT to_regclass(:name) IS NOT NULL AS present", {"name": SCHEMA_TABLE}
        )
        return bool(found[0]["present"])
