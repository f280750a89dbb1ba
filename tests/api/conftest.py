from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc.aio
import pytest

from tests.gateway_harness import RunningGateway, run_gateway, gateway_environ


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    env = gateway_environ(f"sqlite:///{tmp_path}/sb.db", str(tmp_path))
    async with run_gateway(env) as running:
        yield running


@pytest.fixture
async def channel(embedded: RunningGateway) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(embedded.grpc_target) as ch:
        yield ch


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
