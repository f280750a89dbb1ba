"""Graph reads and subscriptions: /me, /me/accounts, nodes, profiles, subscribed_apps."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import errors
from .common import (
    NODE,
    VERSION,
    bearer_or_param,
    graph_json,
    injected,
    params_of,
    parse_fields,
    pick,
    state_of,
)
from .errors import GraphError
from .state import Account, Customer, Flow, Page, SandboxState, Subscription, Token

INSTAGRAM_FIELDS = frozenset(
    {
        "messages",
        "message_reactions",
        "messaging_seen",
        "messaging_postbacks",
        "messaging_referral",
        "message_edit",
        "messaging_optins",
        "messaging_handover",
        "standby",
        "comments",
        "live_comments",
        "mentions",
        "story_insights",
    }
)
# A Page takes Messenger's names only: Meta refuses an Instagram name such as messaging_seen.
PAGE_FIELDS = frozenset(
    {
        "messages",
        "message_reactions",
        "message_edits",
        "messaging_postbacks",
        "messaging_optins",
        "standby",
        "message_deliveries",
        "message_reads",
        "message_echoes",
        "messaging_referrals",
        "messaging_handovers",
        "messaging_policy_enforcement",
        "messaging_account_linking",
        "inbox_labels",
        "feed",
    }
)


def token_pages(state: SandboxState, token: Token) -> set[str]:
    """The pages a Facebook-flow token reaches."""
    if token.kind == "page":
        return {token.page_id} if token.page_id else set()
    user = state.facebook_users.get(token.fb_user_id or "")
    return set(user.page_ids) if user else set()


def token_accounts(state: SandboxState, token: Token) -> list[Account]:
    if token.flow == "instagram":
        account = state.accounts.get(token.ig_id or "")
        return [account] if account else []
    found = []
    for page_id in sorted(token_pages(state, token)):
        page = state.pages.get(page_id)
        if page is not None and page.ig_id in state.accounts:
            found.append(state.accounts[page.ig_id])
    return found


def account_data(account: Account) -> dict[str, Any]:
    return {
        "id": account.ig_id,
        "ig_id": int(account.ig_id),
        "username": account.username,
        "name": account.name,
        "profile_picture_url": account.profile_picture_url,
        "followers_count": 1200,
        "follows_count": 80,
        "media_count": 12,
    }


def instagram_me_data(account: Account) -> dict[str, Any]:
    """Instagram Login's user node: ``id`` is app-scoped, ``user_id`` is the IG_ID in webhooks."""
    return {
        **account_data(account),
        "id": account.app_scoped_id,
        "user_id": account.ig_id,
        "account_type": account.account_type,
    }


def page_data(state: SandboxState, page: Page) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": page.page_id,
        "name": page.name,
        "category": page.category,
        "category_list": [{"id": "2200", "name": page.category}],
        "tasks": ["ADVERTISE", "ANALYZE", "CREATE_CONTENT", "MESSAGING", "MODERATE", "MANAGE"],
    }
    if page.ig_id and page.ig_id in state.accounts:
        data["instagram_business_account"] = account_data(state.accounts[page.ig_id])
    return data


def page_token_for(state: SandboxState, user_token: Token, page_id: str) -> Token:
    """The page token a user token yields: lasting if the user token is long-lived."""
    lasting = user_token.kind == "facebook_user_long"
    for token in state.tokens.values():
        if (
            token.kind == "page"
            and token.page_id == page_id
            and token.fb_user_id == user_token.fb_user_id
            and token.revoked_subcode is None
            and (token.expires_at is None) == lasting
            and (token.expires_at is None or token.expires_at > state.clock.now())
        ):
            return token
    ttl = None if lasting else max(1.0, (user_token.expires_at or 0) - state.clock.now())
    return state.issue_token(
        "page",
        permissions=user_token.permissions,
        fb_user_id=user_token.fb_user_id,
        page_id=page_id,
        ttl_s=ttl,
    )


def profile_data(customer: Customer) -> dict[str, Any]:
    return {
        "id": customer.igsid,
        "name": customer.name,
        "username": customer.username,
        "profile_pic": customer.profile_pic,
        "follower_count": customer.follower_count,
        "is_user_follow_business": customer.is_user_follow_business,
        "is_business_follow_user": customer.is_business_follow_user,
        "is_verified_user": customer.is_verified_user,
    }


def _profile(
    state: SandboxState, customer: Customer, accounts: list[Account], fields: str
) -> web.Response:
    account = next((a for a in accounts if a.ig_id == customer.account), None)
    if account is None:
        raise errors.unsupported_request("GET", customer.igsid)
    injected(state, "profile", account.ig_id, account.page_id)
    if customer.last_inbound_at is None:
        raise GraphError(230)
    return graph_json(
        state, pick(profile_data(customer), parse_fields(fields), ("name",)), account.ig_id
    )


async def _token(request: web.Request, flow: Flow) -> tuple[Token, dict[str, str]]:
    params = await params_of(request)
    return state_of(request).check_token(bearer_or_param(request, params), flow=flow), params


# graph.facebook.com


async def facebook_node(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    token, params = await _token(request, "facebook")
    node = request.match_info["node"]
    fields = params.get("fields", "")
    if node == "me":
        injected(state, "me", token.page_id)
        if token.kind == "page" and token.page_id in state.pages:
            page = state.pages[token.page_id]
            return graph_json(state, pick(page_data(state, page), parse_fields(fields), ("name",)))
        user = state.facebook_users[token.fb_user_id or ""]
        return graph_json(
            state, pick({"id": user.user_id, "name": user.name}, parse_fields(fields), ("name",))
        )
    pages = token_pages(state, token)
    accounts = token_accounts(state, token)
    if node in pages and node in state.pages:
        injected(state, "me", node)
        data = page_data(state, state.pages[node])
        if token.kind != "page" and "access_token" in fields:
            data["access_token"] = page_token_for(state, token, node).value
        return graph_json(state, pick(data, parse_fields(fields), ("name",)))
    account = next((a for a in accounts if a.ig_id == node), None)
    if account is not None:
        injected(state, "me", account.ig_id, account.page_id)
        return graph_json(
            state, pick(account_data(account), parse_fields(fields), ("id",)), account.ig_id
        )
    if node in state.customers:
        return _profile(state, state.customers[node], accounts, fields)
    raise errors.unsupported_request("GET", node)


async def facebook_accounts(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    token, params = await _token(request, "facebook")
    if token.kind == "page":
        raise errors.invalid_parameter(
            "Tried accessing nonexisting field (accounts) on node type (Page)"
        )
    injected(state, "me", token.fb_user_id)
    fields = parse_fields(
        params.get("fields", "") or "access_token,category,category_list,name,id,tasks"
    )
    data = []
    for page_id in state.facebook_users[token.fb_user_id or ""].page_ids:
        page = state.pages.get(page_id)
        if page is None:
            continue
        item = page_data(state, page)
        item["access_token"] = page_token_for(state, token, page_id).value
        data.append(pick(item, fields, ()))
    cursors = {"before": "QVFIUmJ", "after": "QVFIUmJ"}
    return graph_json(state, {"data": data, "paging": {"cursors": cursors}})


# graph.instagram.com


async def instagram_node(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    token, params = await _token(request, "instagram")
    node = request.match_info["node"]
    account = state.accounts.get(token.ig_id or "")
    if account is None:
        raise errors.token_unparseable()
    fields = params.get("fields", "")
    if node in ("me", account.ig_id, account.app_scoped_id):
        injected(state, "me", account.ig_id)
        return graph_json(
            state, pick(instagram_me_data(account), parse_fields(fields), ("id",)), account.ig_id
        )
    if node in state.customers:
        return _profile(state, state.customers[node], [account], fields)
    raise errors.unsupported_request("GET", node)


# subscribed_apps, both hosts


def _subscription_target(
    state: SandboxState, token: Token, node: str
) -> tuple[str, Account | None]:
    """The object a subscription call names, checked against what the token may manage."""
    if token.flow == "facebook":
        if token.kind != "page":
            raise GraphError(
                210, "(#210) A page access token is required to request this resource."
            )
        page_id = token.page_id or ""
        if node not in ("me", page_id):
            raise errors.unsupported_request("POST", node)
        page = state.pages.get(page_id)
        return page_id, state.accounts.get(page.ig_id or "") if page else None
    account = state.accounts.get(token.ig_id or "")
    if account is None or node not in ("me", account.ig_id, account.app_scoped_id):
        raise errors.unsupported_request("POST", node)
    return account.ig_id, account


async def subscribed_apps(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    flow: Flow = "facebook" if request.path.startswith("/graph-facebook") else "instagram"
    token, params = await _token(request, flow)
    object_id, account = _subscription_target(state, token, request.match_info["node"])
    ig_id = account.ig_id if account else None
    injected(state, "subscribed_apps", object_id, ig_id)
    if request.method == "GET":
        sub = state.subscriptions.get(object_id)
        app_id = (
            state.settings.facebook_app_id
            if flow == "facebook"
            else (state.settings.instagram_app_id)
        )
        data = (
            [
                {
                    "category": "Business",
                    "link": "https://sandbox.invalid/",
                    "name": state.settings.app_name,
                    "id": app_id,
                    "subscribed_fields": list(sub.fields),
                }
            ]
            if sub
            else []
        )
        return graph_json(state, {"data": data}, ig_id)
    if request.method == "DELETE":
        state.subscriptions.pop(object_id, None)
        return graph_json(state, {"success": True}, ig_id)
    raw = params.get("subscribed_fields", "")
    if not raw:
        raise errors.invalid_parameter("The parameter subscribed_fields is required.")
    fields = [f.strip() for f in raw.split(",") if f.strip()]
    allowed = PAGE_FIELDS if flow == "facebook" else INSTAGRAM_FIELDS
    for index, name in enumerate(fields):
        if name not in allowed:
            raise errors.invalid_parameter(
                f"Param subscribed_fields[{index}] must be one of"
                f' {{{", ".join(sorted(allowed))}}} - got "{name}"'
            )
    state.subscriptions[object_id] = Subscription(object_id, ig_id, flow, fields)
    return graph_json(state, {"success": True}, ig_id)


def add_routes(app: web.Application) -> None:
    for prefix in ("/graph-facebook", "/graph-instagram"):
        for base in (f"{prefix}/{VERSION}", prefix):
            route = app.router.add_resource(f"{base}/{NODE}/subscribed_apps")
            route.add_route("GET", subscribed_apps)
            route.add_route("POST", subscribed_apps)
            route.add_route("DELETE", subscribed_apps)
    for base in ("/graph-facebook/" + VERSION, "/graph-facebook"):
        app.router.add_get(f"{base}/me/accounts", facebook_accounts)
        app.router.add_get(f"{base}/{NODE}", facebook_node)
    for base in ("/graph-instagram/" + VERSION, "/graph-instagram"):
        app.router.add_get(f"{base}/{NODE}", instagram_node)
