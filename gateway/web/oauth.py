"""``GET /oauth/{channel}/callback``: where the channel's OAuth dialog sends the browser back.

The state is consumed first (unknown, expired or reused: an error page, status 400, nothing
stored). Then the browser goes to the flow's ``return_url`` with ``status=connected``
(and ``connection_id``), ``status=denied`` (the user refused on the channel's dialog) or
``status=error`` (and a machine-readable ``reason``: the channel's dialog reported another
error, or the exchange failed); a flow started without a return_url gets a small page
instead. The query string carries the code and the state, so nothing here logs it. GET
only: a HEAD would spend the state (see ``create_web_app``).
"""

from __future__ import annotations

import html
import logging

from aiohttp import web
from yarl import URL

from gateway.domain.errors import (
    AlreadyExists,
    ChannelError,
    InvalidArgument,
    SwitchboardError,
    Unavailable,
)
from gateway.services.connect import ConnectService

log = logging.getLogger("gateway.web.oauth")

# The callback URL holds a code: the next page must not leak it through Referer or a cache.
_PRIVATE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def page(status: int, title: str, detail: str) -> web.Response:
    body = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(detail)}</p></body></html>\n"
    )
    return web.Response(status=status, text=body, content_type="text/html", headers=_PRIVATE)


def _back(return_url: str, query: dict[str, str], fallback: web.Response) -> web.Response:
    if not return_url:
        return fallback
    target = URL(return_url).update_query(query)
    return web.Response(status=302, headers={**_PRIVATE, "Location": str(target)})


# The error codes of an OAuth 2.0 authorization response (RFC 6749 4.1.2.1), which Meta's
# dialogs use. Another value becomes OAUTH_ERROR: the reason is never the query's own text.
_OAUTH_ERRORS = frozenset(
    {
        "invalid_request",
        "unauthorized_client",
        "access_denied",
        "unsupported_response_type",
        "invalid_scope",
        "server_error",
        "temporarily_unavailable",
    }
)
_CHANNEL_FAULTS = frozenset({"OAUTH_SERVER_ERROR", "OAUTH_TEMPORARILY_UNAVAILABLE"})


def _refused(error: str, error_reason: str) -> bool:
    """The user's own refusal on the dialog: Meta sends ``error=access_denied`` with
    ``error_reason=user_denied`` (or none)."""
    return error == "access_denied" and error_reason in ("", "user_denied")


def _reason_of(error: str) -> str:
    return f"OAUTH_{error.upper()}" if error in _OAUTH_ERRORS else "OAUTH_ERROR"


def _status_of(exc: SwitchboardError) -> int:
    if isinstance(exc, AlreadyExists):
        return 409
    if isinstance(exc, Unavailable):
        return 503
    if isinstance(exc, ChannelError):
        return 502
    return 400


async def handle_callback(
    request: web.Request, channel: str, connect: ConnectService | None
) -> web.Response:
    if connect is None:
        return page(503, "Not available", "Connecting accounts is not enabled on this gateway.")
    query = request.query
    try:
        record = await connect.consume_state(channel, query.get("state", ""))
    except InvalidArgument:
        return page(
            400,
            "This link is no longer valid",
            "The connection request is unknown, expired or was already used. "
            "Start connecting again from your dashboard.",
        )
    context = {"tenant_id": record.tenant_id, "channel": channel, "flow": record.login_flow}
    error = query.get("error", "")
    if error:
        if _refused(error, query.get("error_reason", "")):
            log.info("connect declined on the channel's page", extra=context)
            return _back(
                record.return_url,
                {"status": "denied"},
                page(
                    200, "Not connected", "The authorization was declined; nothing was connected."
                ),
            )
        reason = _reason_of(error)
        log.warning("connect failed on the channel's page", extra={**context, "reason": reason})
        return _back(
            record.return_url,
            {"status": "error", "reason": reason},
            page(
                502 if reason in _CHANNEL_FAULTS else 400,
                "Not connected",
                f"The channel's authorization page reported an error ({reason}); "
                "nothing was connected.",
            ),
        )
    code = query.get("code", "")
    if not code:
        return _back(
            record.return_url,
            {"status": "error", "reason": "MISSING_CODE"},
            page(400, "Not connected", "The channel sent no authorization code."),
        )
    try:
        done = await connect.finish(record, code)
    except SwitchboardError as exc:
        log.warning("connect failed", extra={**context, "reason": exc.reason, "error": exc.message})
        return _back(
            record.return_url,
            {"status": "error", "reason": exc.reason},
            page(_status_of(exc), "Not connected", exc.message),
        )
    conn = done.connection
    name = f"@{conn.account.username}" if conn.account.username else conn.account.external_id
    return _back(
        record.return_url,
        {"status": "connected", "connection_id": conn.id},
        page(200, f"Connected {name}", "You can close this window."),
    )
