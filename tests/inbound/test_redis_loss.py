"""Losing Redis may delay delivery; it must never lose an accepted message (DESIGN.md §1).

The AI backend is away (its group exists, nobody reads it) while customers write; then
Redis restarts without its data, as one started without persistence does (or a failover
to a replica that lagged). When the AI backend subscribes again, it gets every message
accepted meanwhile: the outbox kept them until the group acked them. In one process
(``serve``) and as deployed (``serve http`` publishing what it commits, ``serve grpc``
serving Subscribe).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import psycopg
import pytest
import redis.asyncio

from channels.instagram.sandbox import SandboxClient, SandboxSettings, start_sandbox
from gateway.app import Role
from gateway.bus import RedisBus
from gateway.security.keyring import generate_key_spec
from tests.gateway_harness import gateway_environ, run_gateway
from tests.helpers import RedisNode, fresh_database, redis_node
from tests.inbound.conftest import Stack, connected_stack

pytestmark = pytest.mark.postgres


@asynccontextmanager
async def _stack(
    database: str, node: RedisNode, tmp_path: Path, *, split: bool
) -> AsyncIterator[Stack]:
    sandbox = await start_sandbox(SandboxSettings.generate())
    shared = {
        "INSTAGRAM_SANDBOX_URL": sandbox.url,
        **sandbox.settings.credentials(),
        "SWITCHBOARD_REDIS_URL": node.url,
        # One key ring for both processes, as replicas of one deployment share it.
        "SWITCHBOARD_ENCRYPTION_KEYS": generate_key_spec("loss"),
    }
    try:
        async with AsyncExitStack() as processes:
            env = gateway_environ(database, str(tmp_path / "grpc"), **shared)
            running = await processes.enter_async_context(
                run_gateway(env, Role.GRPC if split else Role.ALL)
            )
            webhooks = running
            if split:
                env = gateway_environ(database, str(tmp_path / "http"), **shared)
                webhooks = await processes.enter_async_context(run_gateway(env, Role.HTTP))
            control = await processes.enter_async_context(SandboxClient(sandbox.url))
            yield await connected_stack(
                "postgres+redis", running, sandbox, control, database, webhooks.http_url
            )
    finally:
        await sandbox.aclose()


async def _group_made_again(stack: Stack, url: str, group: str) -> None:
    bus = stack.gateway.gateway.bus
    assert isinstance(bus, RedisBus)
    client = redis.asyncio.Redis.from_url(url)
    try:
        async with asyncio.timeout(10):
            while True:
                groups = await client.smembers(bus.keys.groups())
                if group.encode() in groups:
                    return
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def _outbox_emptied(database: str) -> None:
    async with asyncio.timeout(10):
        while _outbox_size(database):  # noqa: ASYNC110 - the gateway's relay empties it
            await asyncio.sleep(0.05)


def _outbox_size(database: str) -> int:
    with psycopg.connect(database) as conn:
        row = conn.execute("SELECT count(*) FROM outbox").fetchone()
        assert row is not None
        return int(row[0])


@pytest.mark.parametrize("split", [False, True], ids=["one-process", "http+grpc"])
async def test_messages_accepted_before_redis_lost_its_data_reach_the_group_after(
    postgres_admin_url: str, tmp_path: Path, split: bool
) -> None:
    with fresh_database(postgres_admin_url, "redisloss") as database, redis_node() as node:
        async with _stack(database, node, tmp_path, split=split) as stack:
            async with stack.subscriber("ai") as sub:
                await stack.control.send_dm(stack.ig_id, "before")
                (first,) = await sub.take(1)
                assert first.payload["message"]["text"] == "before"
                # Acked by the only group: the outbox lets it go.
                await _outbox_emptied(database)

            # The AI backend is away; five messages are accepted (200) meanwhile.
            sent = [await stack.control.send_dm(stack.ig_id, f"m{n}") for n in range(5)]
            assert [s["status"] for s in sent] == [200] * 5
            assert _outbox_size(database) == 5  # published, but no group acked them

            node.stop()
            node.start()  # empty
            # The relay sees the loss, makes the group again and publishes the five again;
            # they wait in the outbox for the group, whose consumer is still away.
            await _group_made_again(stack, node.url, "ai")
            await asyncio.sleep(0.5)
            assert _outbox_size(database) == 5

            async with stack.subscriber("ai") as sub:
                got = await sub.take(5)
                assert sorted(g.payload["message"]["external_id"] for g in got) == sorted(
                    s["mid"] for s in sent
                )
                await _outbox_emptied(database)
