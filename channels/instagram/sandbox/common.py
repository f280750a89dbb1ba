"""What the Meta-facing handlers share: app keys, request parameters, tokens, fields, usage."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from .errors import THROTTLE_CODES, GraphError
from .state import ErrorRule, SandboxState, UsageRule

if TYPE_CHECKING:
    from .webhooks import WebhookSender

STATE = web.AppKey("sandbox_state", SandboxState)
SENDER: web.AppKey[WebhookSender] = web.AppKey("sandbox_webhook_sender")
CLIENT_SESSION = web.AppKey("sandbox_client_session", aiohttp.ClientSession)

VERSION = r"{v:v\d+\.\d+}"
NODE = r"{node:\d+|me}"

# The path prefix inside the sandbox that stands for each Meta host.
HOST_PREFIXES = {
    "INSTAGRAM_FACEBOOK_WWW_URL": "/facebook-www",
    "INSTAGRAM_GRAPH_FACEBOOK_URL": "/graph-facebook",
    "INSTAGRAM_WWW_URL": "/instagram-www",
    "INSTAGRAM_API_URL": "/api-instagram",
    "INSTAGRAM_GRAPH_URL": "/graph-instagram",
}


def state_of(request: web.Request) -> SandboxState:
    return request.app[STATE]


async def params_of(request: web.Request) -> dict[str, str]:
    """Query and form fields together, as Graph reads parameters from either."""
    merged = dict(request.query)
    if request.method != "GET" and request.content_type in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ):
        form = await request.post()
        merged.update({key: value for key, value in form.items() if isinstance(value, str)})
    return merged


def bearer_or_param(request: web.Request, params: dict[str, str]) -> str | None:
    """The access token from ``Authorization: Bearer|OAuth`` or the ``access_token`` param."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("bearer", "oauth") and value.strip():
        return value.strip()
    return params.get("access_token") or None


def parse_fields(spec: str) -> dict[str, dict[str, Any]]:
    """Graph's ``fields`` syntax, nested braces included: ``a,b{c,d}`` -> {a:{}, b:{c:{},d:{}}}."""
    result: dict[str, dict[str, Any]] = {}
    stack = [result]
    name = ""
    last = ""
    for char in spec:
        if char == ",":
            if name.strip():
                stack[-1][name.strip()] = {}
                last = name.strip()
            name = ""
        elif char == "{":
            key = name.strip() or last
            stack[-1].setdefault(key, {})
            stack.append(stack[-1][key])
            name = ""
        elif char == "}":
            if name.strip():
                stack[-1][name.strip()] = {}
            name = ""
            if len(stack) > 1:
                stack.pop()
        else:
            name += char
    if name.strip():
        stack[-1][name.strip()] = {}
    return result


def pick(data: dict[str, Any], fields: dict[str, dict[str, Any]], default: tuple[str, ...]) -> Any:
    """The requested fields of ``data`` plus ``id``, as Graph always adds it."""
    wanted = list(fields) or list(default)
    out: dict[str, Any] = {}
    for key in wanted:
        if key not in data:
            continue
        value = data[key]
        if isinstance(value, dict) and fields.get(key):
            value = {k: v for k, v in value.items() if k in fields[key] or k == "id"}
        out[key] = value
    if "id" in data:
        out.setdefault("id", data["id"])
    return out


def usage_headers(
    state: SandboxState,
    account: str | None,
    rule: ErrorRule | None = None,
    usage: UsageRule | None = None,
) -> dict[str, str]:
    """Meta's usage headers: near 100 % with a throttling rule, a real-ish count otherwise,
    with the fields a usage rule (``POST /_sandbox/usage``) sets in their place."""
    throttled = rule is not None and rule.code in THROTTLE_CODES
    percent = 100 if throttled else state.count_call(account or "app")
    regain = rule.estimated_time_to_regain_access if throttled and rule else 0
    app = {"call_count": percent, "total_time": percent, "total_cputime": percent}
    if usage is not None:
        app.update(usage.app)
    headers = {"x-app-usage": json.dumps(app)}
    if account:
        bucket: dict[str, Any] = {
            "type": "instagram",
            "call_count": percent,
            "total_cputime": percent,
            "total_time": percent,
            "estimated_time_to_regain_access": regain,
        }
        if usage is not None:
            bucket.update(usage.business_use_case)
        headers["x-business-use-case-usage"] = json.dumps({account: [bucket]})
    return headers


def injected(state: SandboxState, endpoint: str, *account_ids: str | None) -> None:
    """Raise the injected error for this call, if a test asked for one."""
    rule = state.take_error(endpoint, account_ids)
    if rule is None:
        return
    account = next((i for i in account_ids if i), None)
    raise GraphError(
        rule.code,
        rule.message,
        subcode=rule.subcode,
        http_status=rule.http_status,
        is_transient=rule.is_transient,
        headers=usage_headers(state, account, rule),
    )


def graph_json(
    state: SandboxState, data: Any, account: str | None = None, status: int = 200
) -> web.Response:
    return web.json_response(data, status=status, headers=usage_headers(state, account))


def graph_error_response(error: GraphError) -> web.Response:
    return web.json_response(error.body(), status=error.http_status, headers=error.headers)


def sandbox_base_urls(sandbox_url: str) -> dict[str, str]:
    """The plugin's base-URL settings, each Meta host pointed at its prefix in one sandbox."""
    root = sandbox_url.rstrip("/")
    return {name: root + prefix for name, prefix in HOST_PREFIXES.items()}
