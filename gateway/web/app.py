"""The aiohttp sidecar application (app factory; resources tied to ``cleanup_ctx``)."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.web_exceptions import HTTPException

from gateway.domain.channel import HttpRequest
from gateway.domain.errors import StoreUnavailable
from gateway.domain.store import Store
from gateway.observability import inbound_metrics, metrics
from gateway.observability.logging import is_request_id, request_id_var
from gateway.plugins import ChannelRegistry
from gateway.services.connect import ConnectService
from gateway.services.inbound import InboundService
from gateway.web.oauth import handle_callback as handle_oauth_callback

log = logging.getLogger("gateway.web")


@dataclass(frozen=True, slots=True)
class WebDeps:
    store: Store
    channels: ChannelRegistry
    max_body_bytes: int
    # The OAuth callback's core path; None answers the callback 503.
    connect: ConnectService | None = None
    # Webhook ingestion; None answers deliveries 503 so that the channel retries them.
    inbound: InboundService | None = None


DEPS = web.AppKey("deps", WebDeps)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class PathOnlyAccessLogger(AbstractAccessLogger):
    """Access log without query strings: OAuth codes and states travel there."""

    @property
    def enabled(self) -> bool:
        # Asked once per connection: below INFO, requests skip building the line at all.
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "http request",
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_ms": round(time * 1000, 2),
                "remote": request.remote,
            },
        )


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id for log lines, and request metrics labelled by route (not raw path)."""
    given = request.headers.get("X-Request-Id", "")
    request_id = given if is_request_id(given) else _request_ids.next()
    request_id_var.set(request_id)
    route = (
        request.match_info.route.resource.canonical
        if request.match_info.route.resource
        else "unmatched"
    )
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-Id"] = request_id
        return response
    except HTTPException as exc:
        status = exc.status
        raise
    finally:
        method = request.method if request.method in _METHODS else "OTHER"
        _requests(route, method, status).inc()
        _request_seconds(route, method).observe(time.perf_counter() - start)


class _RequestIds:
    """Request ids unique across processes without a system call each: a random part per
    process (drawn again in a forked child) and a counter."""

    def __init__(self) -> None:
        self._start()
        os.register_at_fork(after_in_child=self._start)

    def _start(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._count = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFFFFFF:08x}"


_request_ids = _RequestIds()


# The parser takes some thirty methods (WebDAV's and others): the label keeps to these.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# Labelled children cached (routes and methods are fixed sets): labels() costs more than the
# update it serves, on every request.
@functools.cache
def _requests(route: str, method: str, status: int) -> Any:
    return metrics.http_requests_total.labels(route, method, str(status))


@functools.cache
def _request_seconds(route: str, method: str) -> Any:
    return metrics.http_request_seconds.labels(route, method)


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    try:
        await request.app[DEPS].store.ping()
    except StoreUnavailable:
        return web.json_response({"status": "unavailable", "store": "down"}, status=503)
    return web.json_response({"status": "ready"})


def _channel(request: web.Request) -> str:
    name = request.match_info["channel"]
    if name not in request.app[DEPS].channels:
        raise web.HTTPNotFound(text=f"no channel named {name!r} is installed\n")
    return name


async def webhook(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    name = _channel(request)
    if deps.inbound is None:
        # This process does not ingest (a 5xx keeps the delivery at Meta, retried later).
        return web.Response(status=503, text="webhooks are not served here\n")
    try:
        # read() enforces client_max_size and raises 413 past it, before any parsing.
        body = await request.read() if request.method == "POST" else b""
    except web.HTTPRequestEntityTooLarge:
        inbound_metrics.WEBHOOK_DELIVERIES.labels(name, "too_large").inc()
        raise
    except web.RequestPayloadError as exc:
        # A body that does not decode as its Content-Encoding (or its chunking) says: the
        # sender's fault, seen before any signature check, so nothing of it is stored.
        inbound_metrics.WEBHOOK_DELIVERIES.labels(name, "bad_encoding").inc()
        log.warning(
            "webhook body does not decode",
            extra={"channel": name, "error": type(exc.__cause__ or exc).__name__},
        )
        # The parser stopped at the error and reads nothing more of this connection: close
        # it, and end the payload, which aiohttp would otherwise drain after the answer
        # (meeting the same error, logged as an unhandled exception).
        request.content.feed_eof()
        encoding = isinstance(exc.__cause__, ContentEncodingError)
        what = "its Content-Encoding" if encoding else "its framing"
        refused = web.Response(status=400, text=f"the body does not decode as {what} says\n")
        refused.force_close()
        return refused
    reply = await deps.inbound.receive(
        name,
        deps.channels[name].inbound,
        HttpRequest(
            method=request.method,
            path=request.path,
            query=request.query,
            headers=request.headers,
            body=body,
        ),
    )
    # The reply may echo what the caller sent (hub.challenge, as text/plain): a browser must
    # not sniff it into HTML.
    headers = {**reply.headers, "X-Content-Type-Options": "nosniff"}
    return web.Response(
        status=reply.status, body=reply.body, content_type=reply.content_type, headers=headers
    )


async def oauth_callback(request: web.Request) -> web.Response:
    return await handle_oauth_callback(request, _channel(request), request.app[DEPS].connect)


def create_web_app(deps: WebDeps) -> web.Application:
    app = web.Application(client_max_size=deps.max_body_bytes, middlewares=[observe])
    app[DEPS] = deps
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    # GET only: a HEAD (link scanners, previews) would spend the state and the code.
    app.router.add_get("/oauth/{channel}/callback", oauth_callback, allow_head=False)
    app.router.add_route("GET", "/webhooks/{channel}", webhook)
    app.router.add_route("POST", "/webhooks/{channel}", webhook)
    return app
