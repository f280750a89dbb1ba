from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.domain.errors import ConfigError, StoreUnavailable
from gateway.store import PostgresStore, SqliteStore, open_store, sqlite_path
from gateway.store.migrate import load_migrations
from tests.helpers import free_port
from tests.store.conftest import AnyStore, new_store


def versions(backend: str) -> list[str]:
    """Every shipped migration, in order (0001_init first)."""
    return [m.version for m in load_migrations(backend)]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h:5432/db", PostgresStore),
        ("postgres://u@h/db", PostgresStore),
        ("sqlite:///var/x.db", SqliteStore),
        ("sqlite:////abs/x.db", SqliteStore),
        ("sqlite://:memory:", SqliteStore),
    ],
)
def test_open_store_picks_the_backend_from_the_url_scheme(url: str, expected: type) -> None:
    assert isinstance(open_store(url), expected)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///var/x.db", "var/x.db"),
        ("sqlite:////abs/x.db", "/abs/x.db"),
        ("sqlite://:memory:", ":memory:"),
        ("sqlite:///:memory:", ":memory:"),
    ],
)
def test_sqlite_urls_name_relative_absolute_and_memory_paths(url: str, path: str) -> None:
    assert sqlite_path(url) == path


@pytest.mark.parametrize(
    "url", ["mysql://root:hunter2@db/x", "hunter2", "sqlite:relative.db", "sqlite://"]
)
def test_unsupported_database_url_is_a_config_error_that_hides_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_store(url)
    assert "SWITCHBOARD_DATABASE_URL" in str(caught.value)
    assert "hunter2" not in str(caught.value)


async def test_in_memory_sqlite_store_migrates_and_answers() -> None:
    async with open_store("sqlite://:memory:") as store:
        assert await store.migrate() == versions("sqlite")
        await store.ping()


async def test_sqlite_store_creates_the_missing_parent_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "store.db"
    async with open_store(f"sqlite:///{path}") as store:
        await store.ping()
    assert path.exists()


async def test_postgres_on_a_closed_port_raises_store_unavailable() -> None:
    url = f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/nope?connect_timeout=1"
    async with PostgresStore(url, timeout_s=1.0) as store:
        with pytest.raises(StoreUnavailable) as caught:
            await store.ping()
        assert "s3cret" not in str(caught.value)
        with pytest.raises(StoreUnavailable):
            async with store.transaction() as tx:
                await tx.get_connection("conn_x")


async def test_sqlite_store_that_cannot_open_its_file_raises_store_unavailable(
    tmp_path: Path,
) -> None:
    # A directory where the database file should be.
    (tmp_path / "store.db").mkdir()
    with pytest.raises(StoreUnavailable):
        await SqliteStore(str(tmp_path / "store.db")).open()


async def test_closed_sqlite_store_raises_store_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "store.db"))
    with pytest.raises(StoreUnavailable):
        await store.ping()


async def test_migrate_applies_every_version_once_and_then_nothing(
    backend: str, blank_database: str
) -> None:
    async with new_store(backend, blank_database) as store:
        assert await store.applied_migrations() == []
        assert await store.migrate() == versions(backend)
        assert await store.migrate() == []
        assert await store.applied_migrations() == versions(backend)
        await store.ping()


async def test_concurrent_migrations_apply_each_version_exactly_once(
    backend: str, blank_database: str
) -> None:
    stores: list[AnyStore] = [new_store(backend, blank_database) for _ in range(4)]
    for store in stores:
        await store.open()
    try:
        results = await asyncio.gather(*(store.migrate() for store in stores))
        assert sorted(v for applied in results for v in applied) == versions(backend)
        assert await stores[0].applied_migrations() == versions(backend)
    finally:
        for store in stores:
            await store.aclose()
