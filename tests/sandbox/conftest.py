"""Fixtures: a sandbox on a real loopback port, its control client, and a webhook receiver."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from channels.instagram.sandbox import (
    RunningSandbox,
    SandboxClient,
    SandboxSettings,
    start_sandbox,
)


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    settings = SandboxSettings.generate(echo_retry_delays_s=(0.05, 0.05))
    async with await start_sandbox(settings) as running:
        yield running


@pytest.fixture
async def control(sandbox: RunningSandbox) -> AsyncIterator[SandboxClient]:
    async with SandboxClient(sandbox.url) as client:
        yield client


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def urls(sandbox: RunningSandbox) -> dict[str, str]:
    return sandbox.base_urls()


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]


@dataclass
class Receiver:
    """A tiny webhook endpoint: records each POST, answers from ``statuses`` then 200."""

    url: str = ""
    verify_token: str = ""
    posts: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


@pytest.fixture
async def receiver(sandbox: RunningSandbox) -> AsyncIterator[Receiver]:
    state = Receiver(verify_token=sandbox.settings.webhook_verify_token)

    async def post(request: web.Request) -> web.Response:
        state.posts.append(Received(await request.read(), dict(request.headers)))
        return web.Response(status=state.statuses.pop(0) if state.statuses else 200)

    async def get(request: web.Request) -> web.Response:
        q = request.query
        if q.get("hub.mode") == "subscribe" and q.get("hub.verify_token") == state.verify_token:
            return web.Response(text=q.get("hub.challenge", ""))
        return web.Response(status=403)

    app = web.Application()
    app.router.add_post("/webhooks/instagram", post)
    app.router.add_get("/webhooks/instagram", get)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}/webhooks/instagram"
    try:
        yield state
    finally:
        await runner.cleanup()
