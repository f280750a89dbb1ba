"""The control API under ``/_sandbox/``: what tests and demos use to drive Meta's side."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from . import ids
from .common import SENDER, sandbox_base_urls, state_of
from .settings import ECHO_TIMINGS, EXCHANGE_SHAPES
from .state import (
    ENDPOINTS,
    USAGE_APP_FIELDS,
    USAGE_BUSINESS_FIELDS,
    Account,
    Approval,
    Customer,
    ErrorRule,
    FacebookUser,
    SandboxState,
    UsageRule,
)
from .webhooks import entry, envelope, secret_for, serialize, sign

PREFIX = "/_sandbox"
INBOUND_KINDS = ("message", "reaction", "read", "edit", "unsend", "postback", "referral")
# Customer actions that open (or reopen) the 24-hour messaging window.
WINDOW_OPENERS = frozenset({"message", "postback", "referral"})


class ControlError(Exception):
    """A control call the sandbox cannot honour; answered as ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.text()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise ControlError(400, "the body must be JSON") from None
    if not isinstance(data, dict):
        raise ControlError(400, "the body must be a JSON object")
    return data


def _account(state: SandboxState, any_id: Any) -> Account:
    if not isinstance(any_id, str) or not any_id:
        raise ControlError(400, "'account' (an IG_ID or PAGE_ID) is required")
    account = state.find_account(any_id)
    if account is None:
        raise ControlError(404, f"no sandbox account {any_id}")
    return account


def _customer(state: SandboxState, account: Account, igsid: Any) -> Customer:
    if igsid is None:
        return state.create_customer(account.ig_id)
    customer = state.customers.get(str(igsid))
    if customer is None:
        return state.create_customer(account.ig_id, igsid=str(igsid))
    if customer.account != account.ig_id:
        raise ControlError(400, f"customer {igsid} belongs to another account")
    return customer


def _int(body: dict[str, Any], key: str, default: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlError(400, f"'{key}' must be an integer")
    return value


# configuration


async def get_config(request: web.Request) -> web.Response:
    state = state_of(request)
    s = state.settings
    return web.json_response(
        {
            "instagram_app_id": s.instagram_app_id,
            "instagram_app_secret": s.instagram_app_secret if s.instagram_generated else None,
            "facebook_app_id": s.facebook_app_id,
            "facebook_app_secret": s.facebook_app_secret if s.facebook_generated else None,
            "webhook_verify_token": s.webhook_verify_token if s.verify_token_generated else None,
            "generated": {
                "instagram": s.instagram_generated,
                "facebook": s.facebook_generated,
                "webhook_verify_token": s.verify_token_generated,
            },
            "base_urls": sandbox_base_urls(str(request.url.origin())),
            "webhook_url": state.webhook_url,
            "latency_ms": state.latency_ms,
            "instagram_exchange_shape": state.instagram_exchange_shape,
            "echo_timing": state.echo_timing,
        }
    )


async def update_settings(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await _body(request)
    if "latency_ms" in body:
        latency = body["latency_ms"]
        if isinstance(latency, bool) or not isinstance(latency, int | float) or latency < 0:
            raise ControlError(400, "'latency_ms' must be a non-negative number")
        state.latency_ms = float(latency)
    if "instagram_exchange_shape" in body:
        if body["instagram_exchange_shape"] not in EXCHANGE_SHAPES:
            raise ControlError(400, f"'instagram_exchange_shape' must be one of {EXCHANGE_SHAPES}")
        state.instagram_exchange_shape = body["instagram_exchange_shape"]
    if "echo_timing" in body:
        if body["echo_timing"] not in ECHO_TIMINGS:
            raise ControlError(400, f"'echo_timing' must be one of {ECHO_TIMINGS}")
        state.echo_timing = body["echo_timing"]
    return web.json_response(
        {
            "latency_ms": state.latency_ms,
            "instagram_exchange_shape": state.instagram_exchange_shape,
            "echo_timing": state.echo_timing,
        }
    )


async def set_webhook(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await _body(request)
    url = body.get("url")
    if url is not None and not isinstance(url, str):
        raise ControlError(400, "'url' must be a string or null")
    state.webhook_url = url or None
    result: dict[str, Any] = {"url": state.webhook_url}
    if body.get("verify") and state.webhook_url:
        result["verification"] = await request.app[SENDER].verify(state.webhook_url)
    return web.json_response(result)


async def get_webhook(request: web.Request) -> web.Response:
    return web.json_response({"url": state_of(request).webhook_url})


# accounts, pages, customers, tokens


async def create_account(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await _body(request)
    flow = body.get("flow", "instagram")
    if flow not in ("instagram", "facebook"):
        raise ControlError(400, "'flow' must be 'instagram' or 'facebook'")
    account = state.create_account(
        username=body.get("username"),
        name=body.get("name"),
        page=bool(body.get("page", True)),
        page_name=body.get("page_name"),
        flow=flow,
    )
    return web.json_response(account.to_json(state.pages), status=201)


async def list_accounts(request: web.Request) -> web.Response:
    state = state_of(request)
    return web.json_response({"data": [a.to_json(state.pages) for a in state.accounts.values()]})


async def get_account(request: web.Request) -> web.Response:
    state = state_of(request)
    return web.json_response(_account(state, request.match_info["id"]).to_json(state.pages))


async def create_page(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await _body(request)
    page = state.create_page(body.get("name"))
    return web.json_response({"page_id": page.page_id, "name": page.name}, status=201)


async def create_customer(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await _body(request)
    account = _account(state, body.get("account"))
    allowed = (
        "igsid",
        "name",
        "username",
        "profile_pic",
        "follower_count",
        "is_user_follow_business",
        "is_business_follow_user",
        "is_verified_user",
    )
    customer = state.create_customer(account.ig_id, **{k: body[k] for k in allowed if k in body})
    if body.get("messaged"):
        customer.last_inbound_at = state.clock.now()
    return web.json_response(customer.to_json(), status=201)


async def list_customers(request: web.Request) -> web.Response:
    state = state_of(request)
    wanted = request.query.get("account")
    account = _account(state, wanted).ig_id if wanted else None
    data = [c.to_json() for c in state.customers.values() if account in (None, c.account)]
    return web.json_response({"data": data})


async def issue_token(request: web.Request) -> web.Response:
    """A token without the dialog, for tests that start from a connected account."""
    state = state_of(request)
    body = await _body(request)
    account = _account(state, body.get("account"))
    kind = body.get("kind") or ("instagram_long" if account.flow == "instagram" else "page")
    if kind in ("instagram_short", "instagram_long"):
        token = state.issue_token(
            "instagram_short" if kind == "instagram_short" else "instagram_long",
            ig_id=account.ig_id,
            permissions=_ig_scopes(),
        )
    elif kind in ("page", "facebook_user_short", "facebook_user_long"):
        if account.page_id is None:
            raise ControlError(400, "this account has no Facebook page")
        user = FacebookUser(ids.facebook_user_id(), "Sandbox Admin", [account.page_id])
        state.facebook_users[user.user_id] = user
        token = state.issue_token(
            "facebook_user_short" if kind == "facebook_user_short" else "facebook_user_long",
            fb_user_id=user.user_id,
            permissions=_fb_scopes(),
        )
        if kind == "page":
            token = state.issue_token(
                "page", fb_user_id=user.user_id, page_id=account.page_id, permissions=_fb_scopes()
            )
    else:
        raise ControlError(400, f"unknown token kind {kind!r}")
    expires_in = None if token.expires_at is None else int(token.expires_at - state.clock.now())
    return web.json_response(
        {
            "access_token": token.value,
            "kind": token.kind,
            "expires_in": expires_in,
            "account": account.ig_id,
            "page_id": token.page_id,
        },
        status=201,
    )


def _ig_scopes() -> tuple[str, ...]:
    return ("instagram_business_basic", "instagram_business_manage_messages")


def _fb_scopes() -> tuple[str, ...]:
    return (
        "instagram_basic",
        "instagram_manage_messages",
        "pages_manage_metadata",
        "pages_show_list",
        "pages_read_engagement",
    )


async def revoke_tokens(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await _body(request)
    token, account = body.get("token"), body.get("account")
    if not token and not account:
        raise ControlError(400, "give 'token' or 'account'")
    if account:
        _account(state, account)
    subcode = _int(body, "subcode", 460) or 460
    revoked = state.revoke(token=token, account=account, subcode=subcode)
    return web.json_response({"revoked": revoked})


# clock and approvals


def _clock_json(state: SandboxState) -> dict[str, Any]:
    return {
        "now": state.clock.now(),
        "now_ms": state.clock.now_ms(),
        "offset_s": state.clock.offset_s,
    }


async def get_clock(request: web.Request) -> web.Response:
    return web.json_response(_clock_json(state_of(request)))


async def move_clock(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await _body(request)
    for key in ("advance", "offset"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ControlError(400, f"'{key}' must be a number of seconds")
    if body.get("offset") is not None:
        state.clock.offset_s = float(body["offset"])
    if body.get("advance") is not None:
        state.clock.advance(float(body["advance"]))
    return web.json_response(_clock_json(state))


async def add_approval(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await _body(request)
    accounts = body.get("accounts") or ([body["account"]] if body.get("account") else [])
    for any_id in accounts:
        if any_id not in state.pages:
            _account(state, any_id)
    state.approvals.append(Approval(refuse=bool(body.get("refuse")), accounts=tuple(accounts)))
    return web.json_response({"data": [a.to_json() for a in state.approvals]}, status=201)


async def list_approvals(request: web.Request) -> web.Response:
    return web.json_response({"data": [a.to_json() for a in state_of(request).approvals]})


async def clear_approvals(request: web.Request) -> web.Response:
    state_of(request).approvals.clear()
    return web.json_response({"data": []})


# injected errors


async def add_error(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await _body(request)
    code = _int(body, "code")
    if code is None:
        raise ControlError(400, "'code' is required")
    endpoint = body.get("endpoint", "send")
    if endpoint not in ENDPOINTS:
        raise ControlError(400, f"'endpoint' must be one of {ENDPOINTS}")
    account = body.get("account")
    if account is not None:
        _account(state, account)
    remaining = None if body.get("always") else _int(body, "count", 1)
    if remaining is not None and remaining < 1:
        raise ControlError(400, "'count' must be at least 1 (or use 'always')")
    rule = ErrorRule(
        id=state.next_id(),
        code=code,
        endpoint=endpoint,
        account=account,
        remaining=remaining,
        subcode=_int(body, "subcode"),
        message=body.get("message"),
        http_status=_int(body, "http_status"),
        is_transient=body.get("is_transient"),
        estimated_time_to_regain_access=_int(body, "estimated_time_to_regain_access", 5) or 0,
    )
    state.error_rules.append(rule)
    return web.json_response(rule.to_json(), status=201)


async def list_errors(request: web.Request) -> web.Response:
    return web.json_response({"data": [r.to_json() for r in state_of(request).error_rules]})


async def clear_errors(request: web.Request) -> web.Response:
    state = state_of(request)
    wanted = request.match_info.get("id")
    state.error_rules[:] = [r for r in state.error_rules if wanted and str(r.id) != wanted]
    return web.json_response({"data": [r.to_json() for r in state.error_rules]})


# usage headers on successful sends


def _usage_fields(body: dict[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, int]:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ControlError(400, f"'{key}' must be an object")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ControlError(400, f"'{key}' has unknown fields {unknown}; allowed: {allowed}")
    for field_name, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise ControlError(400, f"'{key}.{field_name}' must be a non-negative integer")
    return dict(value)


async def set_usage(request: web.Request) -> web.Response:
    """What the account's next successful Send API calls report in their usage headers."""
    state = state_of(request)
    body = await _body(request)
    account = _account(state, body.get("account"))
    app = _usage_fields(body, "app", USAGE_APP_FIELDS)
    business = _usage_fields(body, "business_use_case", USAGE_BUSINESS_FIELDS)
    if not app and not business:
        raise ControlError(400, "give 'app' or 'business_use_case' (DELETE usage to clear)")
    remaining = _int(body, "count")
    if remaining is not None and remaining < 1:
        raise ControlError(400, "'count' must be at least 1 (or leave it out: until cleared)")
    rule = UsageRule(state.next_id(), account.ig_id, app, business, remaining)
    state.usage_rules[account.ig_id] = rule
    return web.json_response(rule.to_json(), status=201)


async def list_usage(request: web.Request) -> web.Response:
    return web.json_response(
        {"data": [r.to_json() for r in state_of(request).usage_rules.values()]}
    )


async def clear_usage(request: web.Request) -> web.Response:
    state = state_of(request)
    wanted = request.query.get("account")
    if wanted:
        state.usage_rules.pop(_account(state, wanted).ig_id, None)
    else:
        state.usage_rules.clear()
    return web.json_response({"data": [r.to_json() for r in state.usage_rules.values()]})


# what the gateway did


async def list_subscriptions(request: web.Request) -> web.Response:
    subs = state_of(request).subscriptions.values()
    return web.json_response({"data": [s.to_json() for s in subs]})


async def list_sent(request: web.Request) -> web.Response:
    state = state_of(request)
    wanted = request.query.get("account")
    account = _account(state, wanted).ig_id if wanted else None
    data = [r.to_json() for r in state.sent if account in (None, r.account)]
    return web.json_response({"data": data})


async def clear_sent(request: web.Request) -> web.Response:
    state_of(request).sent.clear()
    return web.json_response({"data": []})


async def list_deliveries(request: web.Request) -> web.Response:
    state = state_of(request)
    kind = request.query.get("kind")
    data = [d.to_json() for d in state.deliveries.values() if kind in (None, d.kind)]
    return web.json_response({"data": data})


async def retry_delivery(request: web.Request) -> web.Response:
    state = state_of(request)
    delivery = state.deliveries.get(int(request.match_info["id"]))
    if delivery is None:
        raise ControlError(404, f"no delivery {request.match_info['id']}")
    await request.app[SENDER].attempt(delivery)
    return web.json_response(_delivery_result(delivery.to_json()))


async def drain_echoes(request: web.Request) -> web.Response:
    await request.app[SENDER].drain()
    return web.json_response({"drained": True})


# customer actions, delivered as webhooks


def build_item(
    state: SandboxState, kind: str, body: dict[str, Any]
) -> tuple[Account, Customer, dict[str, Any]]:
    """One ``messaging`` item in Meta's format, and the side effects a real customer causes."""
    if kind not in INBOUND_KINDS:
        raise ControlError(400, f"unknown event kind {kind!r}; one of {INBOUND_KINDS}")
    account = _account(state, body.get("account"))
    customer = _customer(state, account, body.get("customer"))
    now_ms = state.clock.now_ms()
    item: dict[str, Any] = {
        "sender": {"id": customer.igsid},
        "recipient": {"id": account.ig_id},
        "timestamp": now_ms,
    }
    mid = body.get("mid") or ids.message_id(account.ig_id)
    if kind == "message":
        message: dict[str, Any] = {"mid": mid}
        for key in ("text", "attachments", "reply_to", "referral", "is_unsupported", "is_self"):
            if key in body:
                message[key] = body[key]
        if "quick_reply" in body:
            message["quick_reply"] = {"payload": body["quick_reply"]}
        if "text" not in message and "attachments" not in message:
            message["text"] = "Hi"
        item["message"] = message
    elif kind == "reaction":
        action = body.get("action", "react")
        reaction: dict[str, Any] = {"mid": mid, "action": action}
        if action == "react":
            reaction["reaction"] = body.get("reaction", "love")
            reaction["emoji"] = body.get("emoji", "❤️")
        item["reaction"] = reaction
    elif kind == "read":
        item["read"] = {"mid": mid}
    elif kind == "edit":
        item["message_edit"] = {
            "mid": mid,
            "text": body.get("text", ""),
            "num_edit": body.get("num_edit", 1),
        }
    elif kind == "unsend":
        item["message"] = {"mid": mid, "is_deleted": True}
    elif kind == "postback":
        item["postback"] = {
            "mid": mid,
            "title": body.get("title", "Get started"),
            "payload": body.get("payload", "GET_STARTED"),
        }
    else:
        item["referral"] = {
            "ref": body.get("ref", "sandbox"),
            "source": body.get("source", "SHORTLINK"),
            "type": body.get("type", "OPEN_THREAD"),
        }
    if kind in WINDOW_OPENERS:
        customer.last_inbound_at = state.clock.now()
    return account, customer, item


def _delivery_result(delivery: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": delivery["status"],
        "error": delivery["error"],
        "delivery_id": delivery["id"],
        "attempts": delivery["attempts"],
        "payload": delivery["payload"],
        "raw": delivery["raw"],
        "signature": delivery["signature"],
    }


def _via_page(account: Account, target: dict[str, Any], *, standby: bool) -> dict[str, Any]:
    """The entry as Meta sometimes shapes it for a Facebook Login account: named by its
    Page (entry id and recipient PAGE_ID; the envelope's object is "page") rather than its
    IG_ID."""
    if not account.page_id:
        raise ControlError(400, "'via_page' needs an account with a Page (the facebook flow)")
    items = target.pop("messaging")
    for item in items:
        if isinstance(item.get("recipient"), dict) and item["recipient"].get("id") == account.ig_id:
            item["recipient"] = {"id": account.page_id}
    target["id"] = account.page_id
    target["standby" if standby else "messaging"] = items
    return target


async def _send(
    request: web.Request,
    body: dict[str, Any],
    entries: list[dict[str, Any]],
    account: Account,
    *,
    object_: str = "instagram",
) -> dict[str, Any]:
    state = state_of(request)
    payload = envelope(entries, object_=object_)
    signer = body.get("secret")
    if signer not in (None, "instagram", "facebook"):
        raise ControlError(400, "'secret' must be 'instagram' or 'facebook'")
    secret = secret_for(state, account)
    if signer == "instagram":
        secret = state.settings.instagram_app_secret
    elif signer == "facebook":
        secret = state.settings.facebook_app_secret
    if body.get("deliver", True) is False:
        raw = serialize(payload)
        return {
            "status": None,
            "error": None,
            "delivery_id": None,
            "attempts": 0,
            "payload": payload,
            "raw": raw.decode(),
            "signature": sign(secret, raw),
        }
    delivery = await request.app[SENDER].deliver(payload, secret=secret)
    return _delivery_result(delivery.to_json())


def _require_webhook(state: SandboxState, body: dict[str, Any]) -> None:
    if body.get("deliver", True) is not False and not state.webhook_url:
        raise ControlError(409, "no webhook URL is set: POST /_sandbox/webhook first")


async def customer_event(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await _body(request)
    _require_webhook(state, body)
    account, customer, item = build_item(state, request.match_info["kind"], body)
    target = entry(account.ig_id, item["timestamp"], [item])
    via_page = bool(body.get("via_page"))
    if via_page:
        target = _via_page(account, target, standby=bool(body.get("standby")))
    elif body.get("standby"):
        target["standby"] = target.pop("messaging")
    result = await _send(
        request, body, [target], account, object_="page" if via_page else "instagram"
    )
    result["customer"] = customer.igsid
    for key in ("message", "reaction", "read", "message_edit", "postback"):
        if isinstance(item.get(key), dict) and "mid" in item[key]:
            result["mid"] = item[key]["mid"]
    return web.json_response(result)


async def batch_event(request: web.Request) -> web.Response:
    """Several items in one delivery: grouped into one entry per account, or one per item."""
    state = state_of(request)
    body = await _body(request)
    _require_webhook(state, body)
    items = body.get("items")
    if not isinstance(items, list) or not items:
        raise ControlError(400, "'items' must be a non-empty list of events")
    entries: list[dict[str, Any]] = []
    by_account: dict[str, dict[str, Any]] = {}
    first: Account | None = None
    customers = []
    for spec in items:
        if not isinstance(spec, dict):
            raise ControlError(400, "each item must be an object with a 'kind'")
        account, customer, item = build_item(state, str(spec.get("kind", "")), spec)
        first = first or account
        customers.append(customer.igsid)
        if body.get("entry_per_item") or account.ig_id not in by_account:
            target = entry(account.ig_id, item["timestamp"], [])
            entries.append(target)
            by_account[account.ig_id] = target
        by_account[account.ig_id]["messaging"].append(item)
    assert first is not None  # items is non-empty
    result = await _send(request, body, entries, first)
    result["customers"] = customers
    return web.json_response(result)


def add_routes(app: web.Application) -> None:
    r = app.router
    p = PREFIX
    r.add_get(f"{p}/config", get_config)
    r.add_post(f"{p}/settings", update_settings)
    r.add_get(f"{p}/webhook", get_webhook)
    r.add_post(f"{p}/webhook", set_webhook)
    r.add_put(f"{p}/webhook", set_webhook)
    r.add_post(f"{p}/accounts", create_account)
    r.add_get(f"{p}/accounts", list_accounts)
    r.add_get(f"{p}/accounts/{{id}}", get_account)
    r.add_post(f"{p}/pages", create_page)
    r.add_post(f"{p}/customers", create_customer)
    r.add_get(f"{p}/customers", list_customers)
    r.add_post(f"{p}/tokens", issue_token)
    r.add_post(f"{p}/tokens/revoke", revoke_tokens)
    r.add_get(f"{p}/clock", get_clock)
    r.add_post(f"{p}/clock", move_clock)
    r.add_post(f"{p}/approvals", add_approval)
    r.add_get(f"{p}/approvals", list_approvals)
    r.add_delete(f"{p}/approvals", clear_approvals)
    r.add_post(f"{p}/errors", add_error)
    r.add_get(f"{p}/errors", list_errors)
    r.add_delete(f"{p}/errors", clear_errors)
    r.add_delete(f"{p}/errors/{{id}}", clear_errors)
    r.add_post(f"{p}/usage", set_usage)
    r.add_get(f"{p}/usage", list_usage)
    r.add_delete(f"{p}/usage", clear_usage)
    r.add_get(f"{p}/subscriptions", list_subscriptions)
    r.add_get(f"{p}/sent", list_sent)
    r.add_delete(f"{p}/sent", clear_sent)
    r.add_get(f"{p}/deliveries", list_deliveries)
    r.add_post(f"{p}/deliveries/drain", drain_echoes)
    r.add_post(f"{p}/deliveries/{{id:\\d+}}/retry", retry_delivery)
    r.add_post(f"{p}/events/batch", batch_event)
    r.add_post(f"{p}/events/{{kind}}", customer_event)
