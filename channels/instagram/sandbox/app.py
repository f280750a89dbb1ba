"""The sandbox application: the factory, its lifetime, and ways to run it."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from . import control, graph, oauth, send
from .common import (
    CLIENT_SESSION,
    SENDER,
    STATE,
    graph_error_response,
    sandbox_base_urls,
)
from .errors import GraphError, InstagramOAuthError
from .settings import SandboxSettings
from .state import SandboxState
from .webhooks import WebhookSender

log = logging.getLogger(__name__)


@web.middleware
async def meta_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Latency first, then every sandbox exception rendered in the shape its host uses."""
    state = request.app[STATE]
    is_control = request.path.startswith(control.PREFIX)
    if state.latency_ms > 0 and not is_control:
        # The request has reached Meta before it is slow to answer: a caller that gives up
        # meanwhile does not take it back (its send is carried out all the same).
        await request.read()
        await asyncio.sleep(state.latency_ms / 1000)
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        if not request.path.startswith(("/graph-facebook", "/graph-instagram")):
            raise
        unknown = GraphError(2500, f"Unknown path components: {request.path}")
        return graph_error_response(unknown)
    except GraphError as error:
        return graph_error_response(error)
    except InstagramOAuthError as error:
        return web.json_response(error.body(), status=error.http_status)
    except control.ControlError as error:
        return web.json_response({"error": error.message}, status=error.status)


async def _webhook_client(app: web.Application) -> AsyncIterator[None]:
    session = aiohttp.ClientSession()
    sender = WebhookSender(app[STATE], session)
    app[CLIENT_SESSION] = session
    app[SENDER] = sender
    try:
        yield
    finally:
        await sender.aclose()
        await session.close()


def create_sandbox_app(settings: SandboxSettings | None = None) -> web.Application:
    """A fresh sandbox with its own state; ``None`` generates credentials."""
    app = web.Application(middlewares=[meta_errors])
    app[STATE] = SandboxState(settings or SandboxSettings.generate())
    app.cleanup_ctx.append(_webhook_client)
    oauth.add_routes(app)
    graph.add_routes(app)
    send.add_routes(app)
    control.add_routes(app)
    return app


def _split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address must be HOST:PORT with a port from 0 to 65535, got {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class RunningSandbox:
    """A sandbox listening on a real socket; ``url`` is its root, ``state`` its memory."""

    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def state(self) -> SandboxState:
        return self.app[STATE]

    @property
    def settings(self) -> SandboxSettings:
        return self.app[STATE].settings

    def base_urls(self) -> dict[str, str]:
        return sandbox_base_urls(self.url)

    async def drain_echoes(self) -> None:
        await self.app[SENDER].drain()

    async def aclose(self) -> None:
        await self.runner.cleanup()

    async def __aenter__(self) -> RunningSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def start_sandbox(
    settings: SandboxSettings | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> RunningSandbox:
    """Start a sandbox in this event loop (port 0 lets the OS choose); close it with ``aclose``."""
    app = create_sandbox_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1]) if runner.addresses else port
    shown = f"[{host}]" if ":" in host else host
    return RunningSandbox(url=f"http://{shown}:{bound}", app=app, runner=runner)


async def _serve(addr: str, settings: SandboxSettings) -> None:
    host, port = _split_addr(addr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    sandbox = await start_sandbox(settings, host=host, port=port)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        log.info(
            "instagram sandbox listening on %s (generated credentials: %s; GET %s/_sandbox/config)",
            sandbox.url,
            settings.instagram_generated or settings.facebook_generated,
            sandbox.url,
        )
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await sandbox.aclose()
        log.info("instagram sandbox stopped")


def run_sandbox(addr: str, environ: Mapping[str, str]) -> None:
    """Serve a sandbox at ``HOST:PORT`` until SIGINT or SIGTERM (``switchboard sandbox``).

    Raises ``SandboxSettingsError`` or ``ValueError`` for bad configuration, ``OSError`` when
    the address cannot be bound.
    """
    settings = SandboxSettings.from_environ(environ)
    _split_addr(addr)
    asyncio.run(_serve(addr, settings))
