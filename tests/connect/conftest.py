"""A whole gateway against a sandbox started for the test, and a browser that walks the
OAuth redirects one by one.

``backend`` runs a test on the embedded default (SQLite, in-process bus, states in the
store) and, for tests that ask for it, on PostgreSQL + Redis (states in Redis).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import grpc.aio
import pytest
from switchboard.v1 import common_pb2, connect_pb2, connect_pb2_grpc

from channels.instagram.sandbox import (
    STATE,
    RunningSandbox,
    SandboxClient,
    SandboxSettings,
    start_sandbox,
)
from gateway.domain.events import Event, EventKind
from tests.gateway_harness import RunningGateway, gateway_environ, run_gateway
from tests.helpers import bearer, free_port, published_events

DASHBOARD = "https://dashboard.example"
RETURN_URL = f"{DASHBOARD}/settings/channels?tab=instagram"

BACKENDS = ["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.redis])]


@pytest.fixture
def tenant() -> str:
    """A tenant of this test alone (PostgreSQL's database is shared by the whole run)."""
    return f"acme-{secrets.token_hex(4)}"


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    async with await start_sandbox(SandboxSettings.generate()) as running:
        yield running


@pytest.fixture
async def control(sandbox: RunningSandbox) -> AsyncIterator[SandboxClient]:
    async with SandboxClient(sandbox.url) as client:
        yield client


def connect_environ(
    sandbox: RunningSandbox, tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> dict[str, str]:
    port = free_port()
    extra = {
        **sandbox.settings.credentials(),
        "INSTAGRAM_SANDBOX_URL": sandbox.url,
        "SWITCHBOARD_HTTP_ADDR": f"127.0.0.1:{port}",
        "SWITCHBOARD_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "SWITCHBOARD_ALLOWED_RETURN_ORIGINS": DASHBOARD,
    }
    if backend == "sqlite":
        return gateway_environ(f"sqlite:///{tmp_path}/sb.db", str(tmp_path), **extra)
    prefix = str(request.getfixturevalue("redis_prefix"))
    return gateway_environ(
        str(request.getfixturevalue("postgres_url")),
        str(tmp_path),
        SWITCHBOARD_REDIS_URL=str(request.getfixturevalue("redis_url")),
        SWITCHBOARD_REDIS_KEY_PREFIX=f"{prefix}connect:{secrets.token_hex(4)}:",
        **extra,
    )


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def gw(
    sandbox: RunningSandbox, tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> AsyncIterator[RunningGateway]:
    async with run_gateway(connect_environ(sandbox, tmp_path, request, backend)) as running:
        yield running


@dataclass
class Landing:
    """Where the browser ended: a redirect to the dashboard, or a page of the sidecar."""

    status: int
    location: str
    text: str

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.location).query).items()}


class Browser:
    """Follows redirects one at a time, as a browser would, but stops at the dashboard."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.visited: list[str] = []

    async def get(self, url: str) -> Landing:
        self.visited.append(url)
        async with self.session.get(url, allow_redirects=False) as reply:
            return Landing(reply.status, reply.headers.get("Location", ""), await reply.text())

    async def authorize(self, authorization_url: str) -> str:
        """The sandbox's dialog: returns the callback URL it redirects to."""
        dialog = await self.get(authorization_url)
        assert dialog.status == 302, dialog.text
        return dialog.location

    async def connect(self, authorization_url: str) -> Landing:
        """Dialog, then the sidecar's callback; the dashboard itself is never fetched."""
        return await self.get(await self.authorize(authorization_url))


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with aiohttp.ClientSession() as session:
        yield Browser(session)


@pytest.fixture
async def stub(gw: RunningGateway) -> AsyncIterator[connect_pb2_grpc.ChannelConnectStub]:
    async with grpc.aio.insecure_channel(gw.grpc_target) as channel:
        yield connect_pb2_grpc.ChannelConnectStub(channel)


class Api:
    """The ChannelConnect calls the tests make, with the gateway's all-tenant token."""

    def __init__(self, stub: connect_pb2_grpc.ChannelConnectStub, token: str) -> None:
        self.stub = stub
        self.meta = bearer(token)

    async def start(
        self, tenant: str, flow: str = "instagram", return_url: str = RETURN_URL
    ) -> connect_pb2.StartConnectResponse:
        return await self.stub.StartConnect(
            connect_pb2.StartConnectRequest(
                tenant_id=tenant, channel="instagram", return_url=return_url, login_flow=flow
            ),
            metadata=self.meta,
        )

    async def get(self, connection_id: str) -> common_pb2.Connection:
        return await self.stub.GetConnection(
            connect_pb2.GetConnectionRequest(connection_id=connection_id), metadata=self.meta
        )

    async def list(self, tenant: str) -> list[common_pb2.Connection]:
        reply = await self.stub.ListConnections(
            connect_pb2.ListConnectionsRequest(tenant_id=tenant), metadata=self.meta
        )
        return list(reply.connections)

    async def complete(
        self, code: str, state: str, account: str = ""
    ) -> connect_pb2.CompleteConnectResponse:
        return await self.stub.CompleteConnect(
            connect_pb2.CompleteConnectRequest(
                channel="instagram", code=code, state=state, account_external_id=account
            ),
            metadata=self.meta,
        )

    async def disconnect(self, connection_id: str) -> common_pb2.Connection:
        return await self.stub.Disconnect(
            connect_pb2.DisconnectRequest(connection_id=connection_id), metadata=self.meta
        )


@pytest.fixture
def api(stub: connect_pb2_grpc.ChannelConnectStub, gw: RunningGateway) -> Api:
    return Api(stub, gw.token)


async def connect_account(
    api: Api, browser: Browser, tenant: str, flow: str = "instagram"
) -> common_pb2.Connection:
    """The whole flow through the sidecar; the connection it made."""
    started = await api.start(tenant, flow)
    landing = await browser.connect(started.authorization_url)
    assert landing.status == 302, landing.text
    assert landing.query["status"] == "connected", landing.location
    return await api.get(landing.query["connection_id"])


def code_and_state(callback_url: str) -> tuple[str, str]:
    query = parse_qs(urlsplit(callback_url).query)
    return query["code"][0], query["state"][0]


async def connection_events(gw: RunningGateway, connection_id: str, count: int = 1) -> list[Event]:
    """The ConnectionChanged events of a connection, once the relay has published them."""
    assert gw.gateway.bus is not None
    return await published_events(
        gw.gateway.bus,
        lambda e: e.connection_id == connection_id,
        kinds=[EventKind.CONNECTION_CHANGED],
        count=count,
        timeout_s=5.0,
    )


async def wait_for_events(
    gw: RunningGateway, connection_id: str, count: int
) -> list[dict[str, Any]]:
    events = await connection_events(gw, connection_id, count)
    if len(events) < count:
        raise AssertionError(f"fewer than {count} ConnectionChanged events for {connection_id}")
    return [e.payload for e in events]


def sandbox_secrets(sandbox: RunningSandbox) -> list[str]:
    """Every token and code the sandbox issued, and both app secrets."""
    state = sandbox.app[STATE]
    return [
        *state.tokens,
        *state.codes,
        sandbox.settings.instagram_app_secret,
        sandbox.settings.facebook_app_secret,
    ]
