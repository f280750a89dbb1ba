"""The Kubernetes topology: webhooks served by an ``http`` process, Subscribe by a ``grpc``
one, on a shared PostgreSQL and Redis. The webhook process publishes what it commits
itself, at once, rather than leaving it to the other process's outbox sweep."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from channels.instagram.sandbox import SandboxClient, SandboxSettings, start_sandbox
from gateway.app import Role
from gateway.security.keyring import generate_key_spec
from tests.gateway_harness import RunningGateway, gateway_environ, run_gateway
from tests.helpers import fresh_database
from tests.inbound.conftest import Stack, connected_stack


@pytest.fixture
async def split(
    tmp_path: Path, postgres_url: str, postgres_admin_url: str, redis_url: str, redis_prefix: str
) -> AsyncIterator[tuple[Stack, RunningGateway]]:
    """A stack whose gateway serves gRPC only, and the webhook process beside it."""
    sandbox = await start_sandbox(SandboxSettings.generate())
    shared = {
        "INSTAGRAM_SANDBOX_URL": sandbox.url,
        **sandbox.settings.credentials(),
        "SWITCHBOARD_REDIS_URL": redis_url,
        "SWITCHBOARD_REDIS_KEY_PREFIX": f"{redis_prefix}{secrets.token_hex(3)}:",
        # One key ring for both, as replicas of one deployment share their secret.
        "SWITCHBOARD_ENCRYPTION_KEYS": generate_key_spec("split"),
    }
    try:
        with fresh_database(postgres_admin_url, "split") as database:
            grpc_env = gateway_environ(database, str(tmp_path / "grpc"), **shared)
            http_env = gateway_environ(database, str(tmp_path / "http"), **shared)
            async with (
                run_gateway(grpc_env, Role.GRPC) as grpc_side,
                run_gateway(http_env, Role.HTTP) as http_side,
                SandboxClient(sandbox.url) as control,
            ):
                stack = await connected_stack(
                    "postgres+redis", grpc_side, sandbox, control, database, http_side.http_url
                )
                yield stack, http_side
    finally:
        await sandbox.aclose()


async def test_the_webhook_process_publishes_what_it_commits(
    split: tuple[Stack, RunningGateway],
) -> None:
    stack, http_side = split
    assert stack.gateway.listening.http is None
    assert http_side.listening.grpc is None
    async with stack.subscriber() as sub:
        sent = await stack.control.send_dm(stack.ig_id, "anyone there?")
        assert sent["status"] == 200
        (event,) = await sub.take(1)
    assert event.kind == "message_received"
    assert event.connection_id == stack.connection.id
    relay = http_side.gateway.relay
    assert relay is not None
    assert relay.published >= 1
