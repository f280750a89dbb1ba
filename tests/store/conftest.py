"""The ``store`` fixture: every contract test runs against SQLite and PostgreSQL.

SQLite gets a fresh file per test under tmp_path. PostgreSQL shares the run's database
(migrated on first use) and every table is truncated before each test; tests that need
an unmigrated database use ``blank_database``, which creates a database of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from gateway.store import PostgresStore, SqliteStore
from tests.helpers import fresh_database

AnyStore = SqliteStore | PostgresStore

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]

TABLES = (
    "api_tokens, oauth_states, connections, credentials, participants, conversations,"
    " messages, outbox, bus_groups, bus_acks"
)

_migrated: set[str] = set()


def new_store(backend: str, database: str) -> AnyStore:
    """A store (not open) on a SQLite path or a PostgreSQL URL."""
    if backend == "sqlite":
        return SqliteStore(database)
    return PostgresStore(database)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The test's database: a SQLite file in a directory that does not exist yet, or
    the run's PostgreSQL database."""
    if backend == "sqlite":
        return str(tmp_path / "var" / "store.db")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def store(backend: str, database: str) -> AsyncIterator[AnyStore]:
    async with new_store(backend, database) as opened:
        if database not in _migrated:
            await opened.migrate()
            if backend == "postgres":
                _migrated.add(database)
        if backend == "postgres":
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
                await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
        yield opened


@pytest.fixture
async def store_factory(
    store: AnyStore, backend: str, database: str
) -> AsyncIterator[Callable[[], Awaitable[AnyStore]]]:
    """More open stores on the database of ``store``, as other processes would have."""
    opened: list[AnyStore] = []

    async def make() -> AnyStore:
        another = new_store(backend, database)
        await another.open()
        opened.append(another)
        return another

    try:
        yield make
    finally:
        for another in opened:
            await another.aclose()


@pytest.fixture
def blank_database(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """An empty database nobody has migrated."""
    if backend == "sqlite":
        yield str(tmp_path / "blank" / "store.db")
        return
    request.getfixturevalue("postgres_url")  # fails the run at once if PostgreSQL is down
    admin_url = str(request.getfixturevalue("postgres_admin_url"))
    with fresh_database(admin_url, "blank") as url:
        yield url
