"""A small client for Meta's hosts (Graph API, Instagram API, OAuth endpoints).

One ``aiohttp.ClientSession`` per plugin, opened in ``start`` and closed in ``aclose``.
Base URLs are looked up per call, by setting name (``INSTAGRAM_GRAPH_URL``, ...), so that a
plugin whose settings change after start (the embedded sandbox) needs no rebuild.

Meta's error bodies become the gateway's channel errors here, in one place
(:func:`error_from_body`). Nothing this module logs carries a query string, a form body or
a token: tokens go in the ``Authorization`` header whenever Meta accepts it there.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson

from channels.instagram.settings import DEFAULT_API_TIMEOUT_S
from channels.instagram.usage import parse_usage, regain_at, retry_after
from gateway.config import Secret
from gateway.domain.errors import (
    ChannelAuthError,
    ChannelError,
    ChannelRateLimited,
    ChannelRequestError,
    ChannelTransientError,
)
from gateway.observability.outbound_metrics import CHANNEL_API_SECONDS

log = logging.getLogger(__name__)

# 1200: the Send API's "temporary send message failure, please try again later".
TRANSIENT_CODES = frozenset({1, 2, 1200})
THROTTLE_CODES = frozenset({4, 17, 32, 613, 80002, 80006})
AUTH_CODES = frozenset({102, 190})
POLICY_BLOCK_CODE = 368
# Outside the 24-hour messaging window: code 10 with subcode 2018278 or 2018065
# (graph.facebook.com) or 2534022 (graph.instagram.com); 2534022 has also been seen as the
# code itself.
OUTSIDE_WINDOW_SUBCODES = frozenset({2018278, 2018065, 2534022})
OUTSIDE_WINDOW_CODE = 2534022
# "This person isn't receiving messages from you right now", under code 551, 10 or 200:
# one customer's choice, not the account's, so it fails that message alone.
RECIPIENT_UNAVAILABLE_SUBCODES = frozenset({1545041, 2018108})
# Code 200 for a recipient who is not an admin, developer or tester of an app not yet
# reviewed and live: a new login would not change that, and the app's testers can still
# be written to.
APP_NOT_LIVE_SUBCODES = frozenset({2018021, 2018027, 2018028})
_POLICY_PAUSE = timedelta(hours=1)
_TOO_MANY_REQUESTS = 429
_MAX_MESSAGE = 300

Params = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class GraphResponse:
    status: int
    data: dict[str, Any]
    headers: Mapping[str, str]


class GraphClient:
    """``request(method, host_setting, path, ...)`` against the host ``base_url`` names."""

    def __init__(
        self, base_url: Callable[[str], str], *, timeout_s: float = DEFAULT_API_TIMEOUT_S
    ) -> None:
        self._base_url = base_url
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        host_setting: str,
        path: str,
        *,
        params: Params | None = None,
        data: Params | None = None,
        json: Any = None,
        token: Secret | None = None,
    ) -> dict[str, Any]:
        """The parsed JSON object of a 2xx answer; a channel error otherwise."""
        reply = await self.call(
            method, host_setting, path, params=params, data=data, json=json, token=token
        )
        return reply.data

    async def call(
        self,
        method: str,
        host_setting: str,
        path: str,
        *,
        params: Params | None = None,
        data: Params | None = None,
        json: Any = None,
        token: Secret | None = None,
        timed: bool = True,
    ) -> GraphResponse:
        """Like :meth:`request`, with the status and headers (Meta's usage headers).
        ``timed``: observed in switchboard_channel_api_seconds by endpoint (a send is not:
        the core times every channel's sends itself)."""
        if self._session is None:
            raise RuntimeError("the Graph client is not started")
        url = self._base_url(host_setting).rstrip("/") + "/" + path.lstrip("/")
        headers = {"Authorization": f"Bearer {token.reveal()}"} if token else {}
        body: Any = data
        if json is not None:
            # orjson, not aiohttp's json.dumps: this is every send's body.
            body = orjson.dumps(json)
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        try:
            async with self._session.request(
                method, url, params=params, data=body, headers=headers
            ) as response:
                raw = await response.read()
                status = response.status
                # Case-insensitive already, and read-only: no copy per call.
                reply_headers: Mapping[str, str] = response.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The exception's text may quote the URL, query string included: keep its type only.
            log.warning(
                "meta call failed",
                extra={"host": host_setting, "path": path, "error": type(exc).__name__},
            )
            maybe = _maybe_delivered(exc)
            raise ChannelTransientError(
                f"{host_setting} could not be reached ({type(exc).__name__})"
                if not maybe
                else f"{host_setting} did not answer ({type(exc).__name__});"
                " the request may have been carried out",
                maybe_delivered=maybe,
            ) from None
        if timed:
            _api_seconds(_endpoint(path)).observe(time.perf_counter() - started)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "meta call",
                extra={
                    "method": method,
                    "host": host_setting,
                    "path": path,
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )
        body = _parse(raw)
        if 200 <= status < 300 and body is not None and not _is_error(body):
            return GraphResponse(status, body, reply_headers)
        raise error_from_body(status, body, reply_headers)


# Failures that happen before a request can leave: Meta cannot have acted on it.
_NOT_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL)


def _maybe_delivered(exc: BaseException) -> bool:
    """Whether Meta may have received the request and acted on it: every failure once the
    connection was made (a timeout waiting for the answer, a connection dropped or reset
    under the request), since we cannot tell how far the request got."""
    return not isinstance(exc, _NOT_SENT)


# The Graph paths the channel calls, by their last segment: a bounded label. A path that
# ends in an id is a user's profile.
_ENDPOINTS = frozenset(
    {"access_token", "refresh_access_token", "me", "accounts", "subscribed_apps", "messages"}
)


def _endpoint(path: str) -> str:
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if last in _ENDPOINTS:
        return last
    return "profile" if last.isdigit() else "other"


@functools.cache
def _api_seconds(endpoint: str) -> Any:
    return CHANNEL_API_SECONDS.labels("instagram", endpoint)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _is_error(body: dict[str, Any]) -> bool:
    return "error" in body or "error_type" in body


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _short(message: Any) -> str:
    text = str(message or "").strip()
    return text[:_MAX_MESSAGE]


def error_from_body(
    status: int, body: dict[str, Any] | None, headers: Mapping[str, str]
) -> ChannelError:
    """Meta's error (Graph's ``{"error": {...}}`` or Instagram Login's flat shape) as a
    channel error; the code and subcode land in its metadata."""
    if body is None:
        if status == _TOO_MANY_REQUESTS:
            return _throttled(f"Meta answered HTTP {status}", 0, 0, headers)
        if status >= 500 or status == 408:
            return ChannelTransientError(f"Meta answered HTTP {status}")
        return ChannelRequestError(f"Meta answered HTTP {status} without an error body")
    if isinstance(body.get("error"), dict):
        err = body["error"]
        code, subcode = _int(err.get("code")), _int(err.get("error_subcode"))
        message = _short(err.get("message")) or f"Meta error {code}"
        transient = bool(err.get("is_transient"))
    elif "error_type" in body or "error_message" in body:
        # Instagram Login's OAuth endpoints: "code" is the HTTP status, not a Graph code.
        code, subcode = 0, 0
        message = _short(body.get("error_message")) or "Instagram refused the request"
        transient = status >= 500
    else:
        return ChannelTransientError(f"Meta answered HTTP {status} with an unexpected body")
    return _classify(status, code, subcode, message, transient, headers)


def _classify(
    status: int,
    code: int,
    subcode: int,
    message: str,
    transient: bool,
    headers: Mapping[str, str],
) -> ChannelError:
    kw: dict[str, Any] = {"code": code, "subcode": subcode}
    if code == OUTSIDE_WINDOW_CODE or (code == 10 and subcode in OUTSIDE_WINDOW_SUBCODES):
        return ChannelRequestError(message, reason="OUTSIDE_MESSAGING_WINDOW", **kw)
    if code in AUTH_CODES:
        return ChannelAuthError(message, **kw)
    if subcode in RECIPIENT_UNAVAILABLE_SUBCODES:
        return ChannelRequestError(message, reason="RECIPIENT_UNAVAILABLE", **kw)
    if code == 200 and subcode in APP_NOT_LIVE_SUBCODES:
        return ChannelRequestError(message, **kw)
    # Any other code 10 or 200-299 is a permission the account's login lacks.
    if code == 10 or 200 <= code <= 299:
        return ChannelAuthError(message, reason="PERMISSION_MISSING", **kw)
    if code in THROTTLE_CODES:
        return _throttled(message, code, subcode, headers)
    if code == POLICY_BLOCK_CODE:
        return ChannelRateLimited(
            message, retry_at=datetime.now(UTC) + _POLICY_PAUSE, reason="POLICY_BLOCKED", **kw
        )
    if transient or code in TRANSIENT_CODES or (status >= 500 and code == 0):
        return ChannelTransientError(message, **kw)
    if status == _TOO_MANY_REQUESTS:
        # A 429 whose code says nothing more (an edge in front of the Graph API answers
        # these): the account is throttled, not the message wrong.
        return _throttled(message, code, subcode, headers)
    if code == 551:
        return ChannelRequestError(message, reason="RECIPIENT_UNAVAILABLE", **kw)
    return ChannelRequestError(message, **kw)


def _throttled(
    message: str, code: int, subcode: int, headers: Mapping[str, str]
) -> ChannelRateLimited:
    now = datetime.now(UTC)
    retry_at = regain_at(parse_usage(headers), now, retry_after(headers, now))
    return ChannelRateLimited(message, retry_at=retry_at, code=code, subcode=subcode)
