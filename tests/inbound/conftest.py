"""An end-to-end stack per backend: the sandbox (Meta), a gateway on real ports, a
connected sandbox account with a sealed credential, and a subscriber.

``postgres+redis`` gets a database of its own per test (so that a test can take it down)
and a Redis key prefix of its own; ``embedded`` is SQLite and the in-process bus.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from channels.instagram.sandbox import (
    RunningSandbox,
    SandboxClient,
    SandboxSettings,
    start_sandbox,
)
from gateway.domain.models import Connection
from tests.gateway_harness import RunningGateway, gateway_environ, run_gateway, store_connection
from tests.helpers import fresh_database
from tests.inbound.subscriber import Subscriber

BACKENDS = ["embedded", pytest.param("postgres+redis", marks=[pytest.mark.postgres])]


@dataclass
class Stack:
    backend: str
    gateway: RunningGateway
    sandbox: RunningSandbox
    control: SandboxClient
    account: dict[str, Any]
    connection: Connection
    database: str

    @property
    def ig_id(self) -> str:
        return str(self.account["ig_id"])

    @property
    def webhook_url(self) -> str:
        return self.gateway.http_url + "/webhooks/instagram"

    def subscriber(self, group: str = "ai") -> Subscriber:
        return Subscriber(self.gateway, group)

    async def connect_account(self, **account: Any) -> tuple[dict[str, Any], Connection]:
        """Another sandbox account, connected to tenant ``t2`` by default."""
        created = await self.control.create_account(**account)
        return created, await connect(self, created, tenant="t2")


async def connect(stack: Stack, account: dict[str, Any], *, tenant: str = "t1") -> Connection:
    """Does what the connect flow would: the connection and its sealed token, in the store."""
    return await store_connection(stack.gateway, stack.control, account, tenant=tenant)


async def connected_stack(
    backend: str,
    gateway: RunningGateway,
    sandbox: RunningSandbox,
    control: SandboxClient,
    database: str,
    webhooks_to: str,
) -> Stack:
    """A sandbox account whose webhooks go to ``webhooks_to``, connected to tenant t1."""
    account = await control.create_account(username="shop")
    await control.set_webhook(webhooks_to + "/webhooks/instagram")
    stack = Stack(
        backend,
        gateway,
        sandbox,
        control,
        account,
        connection=None,  # type: ignore[arg-type]
        database=database,
    )
    stack.connection = await connect(stack, account)
    return stack


@pytest.fixture(params=BACKENDS)
def inbound_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def inbound_database(
    inbound_backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    if inbound_backend == "embedded":
        yield f"sqlite:///{tmp_path}/sb.db"
        return
    request.getfixturevalue("postgres_url")  # fails the run at once when PostgreSQL is down
    admin_url = str(request.getfixturevalue("postgres_admin_url"))
    with fresh_database(admin_url, "inbound") as url:
        yield url


@pytest.fixture
async def stack(
    inbound_backend: str, inbound_database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Stack]:
    sandbox = await start_sandbox(SandboxSettings.generate())
    extra = {"INSTAGRAM_SANDBOX_URL": sandbox.url, **sandbox.settings.credentials()}
    if inbound_backend == "postgres+redis":
        prefix = str(request.getfixturevalue("redis_prefix"))
        extra["SWITCHBOARD_REDIS_URL"] = str(request.getfixturevalue("redis_url"))
        extra["SWITCHBOARD_REDIS_KEY_PREFIX"] = f"{prefix}{secrets.token_hex(3)}:"
    settings = request.node.get_closest_marker("gateway_env")
    if settings is not None:
        extra.update({f"SWITCHBOARD_{k}": str(v) for k, v in settings.kwargs.items()})
    env = gateway_environ(inbound_database, str(tmp_path), **extra)
    try:
        async with run_gateway(env) as running, SandboxClient(sandbox.url) as control:
            yield await connected_stack(
                inbound_backend, running, sandbox, control, inbound_database, running.http_url
            )
    finally:
        await sandbox.aclose()
