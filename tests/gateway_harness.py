"""Runs a whole gateway in the test's event loop on OS-chosen ports."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from channels.instagram.sandbox import SandboxClient
from gateway.app import Gateway, Listening, Role
from gateway.config import Config, Secret
from gateway.domain.connect import AccessToken
from gateway.domain.ids import new_id
from gateway.domain.models import Account, Connection, ConnectionStatus
from gateway.security.keyring import generate_key_spec
from gateway.security.tokens import create_token
from gateway.services.credentials import seal


@dataclass
class RunningGateway:
    gateway: Gateway
    listening: Listening
    token: str

    @property
    def grpc_target(self) -> str:
        assert self.listening.grpc is not None
        return f"127.0.0.1:{self.listening.grpc.port}"

    @property
    def http_url(self) -> str:
        assert self.listening.http is not None
        return f"http://127.0.0.1:{self.listening.http.port}"

    @property
    def metrics_url(self) -> str:
        assert self.listening.metrics is not None
        return f"http://127.0.0.1:{self.listening.metrics.port}/metrics"


def gateway_environ(database_url: str, data_dir: str, **extra: str) -> dict[str, str]:
    env = {
        "SWITCHBOARD_DATABASE_URL": database_url,
        "SWITCHBOARD_GRPC_ADDR": "127.0.0.1:0",
        "SWITCHBOARD_HTTP_ADDR": "127.0.0.1:0",
        "SWITCHBOARD_METRICS_ADDR": "127.0.0.1:0",
        "SWITCHBOARD_ENCRYPTION_KEYS": generate_key_spec("test1"),
        "SWITCHBOARD_DATA_DIR": data_dir,
        "SWITCHBOARD_LOG_FORMAT": "json",
        "SWITCHBOARD_SHUTDOWN_GRACE_SECONDS": "1",
    }
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def run_gateway(
    environ: Mapping[str, str], role: Role = Role.ALL
) -> AsyncIterator[RunningGateway]:
    config = Config.from_environ(environ)
    stop = asyncio.Event()
    up: asyncio.Future[Listening] = asyncio.get_running_loop().create_future()
    async with Gateway(config) as gateway:
        await gateway.store.migrate()
        token, _ = await create_token(gateway.store, name="test", tenants=["*"], scopes=[])
        task = asyncio.create_task(gateway.serve(role, stop=stop, on_listening=up.set_result))
        try:
            listening = await asyncio.wait_for(asyncio.shield(up), 20)
            yield RunningGateway(gateway=gateway, listening=listening, token=token)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


async def store_connection(
    gateway: RunningGateway,
    control: SandboxClient,
    account: dict[str, Any],
    *,
    tenant: str,
    flow: str = "instagram",
) -> Connection:
    """What the connect flow stores for a sandbox account: the connection and its sealed
    token (a page token for Facebook Login)."""
    now = datetime.now(UTC)
    conn = Connection(
        id=new_id("conn"),
        tenant_id=tenant,
        channel="instagram",
        status=ConnectionStatus.CONNECTED,
        account=Account(
            external_id=str(account["ig_id"]),
            username=str(account.get("username", "")),
            page_id=str(account.get("page_id") or ""),
        ),
        login_flow=flow,
        connected_at=now,
    )
    kind = "page" if flow == "facebook" else "instagram_long"
    token = await control.issue_token(conn.account.external_id, kind)
    keyring = gateway.gateway.keyring
    assert keyring is not None
    credential = seal(
        keyring, conn.id, AccessToken(value=Secret(token["access_token"]), issued_at=now)
    )
    async with gateway.gateway.store.transaction() as tx:
        await tx.save_connection(conn)
        await tx.put_credential(credential)
    return conn
