"""Shared fixtures: the real PostgreSQL and Redis servers, one fresh database and one key
prefix per test run, removed afterwards.

``SWITCHBOARD_TEST_DATABASE_URL`` names a PostgreSQL database to connect to for creating
the per-run database; ``SWITCHBOARD_TEST_REDIS_URL`` the Redis server. When either does not
answer the run fails at once, naming the URL: these tests never fall back to a mock.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc.aio
import psycopg
import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster

from gateway.redis_client import open_redis
from tests.gateway_harness import RunningGateway, gateway_environ, run_gateway
from tests.helpers import RedisClusterUnavailable, shared_redis_cluster, with_database
from tests.store.conftest import BACKENDS, AnyStore, new_store

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"

RUN_ID = secrets.token_hex(4)


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc and ":" in netloc.split("@", 1)[0]:
        user = netloc.split("@", 1)[0].split(":", 1)[0]
        netloc = f"{user}:***@{netloc.split('@', 1)[1]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    return os.environ.get("SWITCHBOARD_TEST_DATABASE_URL", DEFAULT_PG)


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A database created for this test run and dropped after it."""
    name = f"switchboard_test_{RUN_ID}"
    try:
        admin = psycopg.connect(postgres_admin_url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL does not answer at {_redacted(postgres_admin_url)} "
            f"(SWITCHBOARD_TEST_DATABASE_URL): {exc}",
            pytrace=False,
        )
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(postgres_admin_url, name)
    finally:
        with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("SWITCHBOARD_TEST_REDIS_URL", DEFAULT_REDIS)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis does not answer at {_redacted(url)} (SWITCHBOARD_TEST_REDIS_URL): {exc}",
            pytrace=False,
        )
    return url


@pytest.fixture(scope="session")
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test run; every key under it is deleted afterwards."""
    prefix = f"sbtest:{RUN_ID}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        # Hash-tagged keys start with "{", so the prefix may sit inside the braces.
        for key in client.scan_iter(match=f"{{{prefix}*", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AnyStore]:
    """A migrated store on each backend: a SQLite file of the test's own, or the run's
    PostgreSQL database (tests/store overrides it with one that also empties the tables)."""
    backend = str(request.param)
    if backend == "sqlite":
        database = str(tmp_path / "store.db")
    else:
        database = str(request.getfixturevalue("postgres_url"))
    async with new_store(backend, database) as opened:
        await opened.migrate()
        yield opened


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    """A whole gateway on its embedded default (SQLite, in-process bus)."""
    env = gateway_environ(f"sqlite:///{tmp_path}/sb.db", str(tmp_path))
    async with run_gateway(env) as running:
        yield running


@pytest.fixture
async def channel(embedded: RunningGateway) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(embedded.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A ``redis+cluster://`` URL of a Redis Cluster started once for the whole run."""
    try:
        with shared_redis_cluster() as url:
            yield url
    except RedisClusterUnavailable as exc:
        pytest.skip(f"no Redis Cluster: {exc}")


@pytest.fixture
async def redis_cluster(redis_cluster_url: str) -> AsyncIterator[RedisCluster]:
    """A client of that cluster that already knows which node serves which slot."""
    client = open_redis(redis_cluster_url)
    assert isinstance(client, RedisCluster)
    await client.initialize()
    try:
        yield client
    finally:
        await client.aclose()
