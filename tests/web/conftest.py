"""The sidecar of a whole embedded gateway, with Instagram credentials of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tests.gateway_harness import RunningGateway, gateway_environ, run_gateway

SECRET = "It's a Secret to Everybody"
VERIFY = "verify-token-for-tests"


@asynccontextmanager
async def running_sidecar(tmp_path: Path, **extra: str) -> AsyncIterator[RunningGateway]:
    env = gateway_environ(
        f"sqlite:///{tmp_path}/sb.db",
        str(tmp_path),
        INSTAGRAM_APP_ID="1234567890",
        INSTAGRAM_APP_SECRET=SECRET,
        INSTAGRAM_WEBHOOK_VERIFY_TOKEN=VERIFY,
        **extra,
    )
    async with run_gateway(env) as running:
        yield running
