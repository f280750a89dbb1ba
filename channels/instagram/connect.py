"""Connecting an Instagram account: both of Meta's login flows (INSTAGRAM.md §1).

Instagram Login yields one long-lived user token (60 days, refreshable once 24 hours old).
Facebook Login yields a long-lived user token whose pages carry permanent page tokens; each
page with a linked Instagram professional account is one connectable account.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from channels.instagram.graph_client import GraphClient
from channels.instagram.settings import (
    FLOW_FACEBOOK,
    FLOW_INSTAGRAM,
    INSTAGRAM_SCOPES,
    InstagramSettings,
)
from gateway.config import Secret
from gateway.domain.connect import AccessToken, Grant, GrantedAccount
from gateway.domain.errors import ChannelRequestError, InvalidArgument
from gateway.domain.models import Account

# The webhook fields each login flow subscribes the account to. Instagram Login names the
# Instagram fields on the account; Facebook Login subscribes the Page, which takes only
# Page (Messenger) field names and refuses the whole call over one Instagram name such as
# messaging_seen. Which Instagram events then arrive is the app's own subscription.
INSTAGRAM_WEBHOOK_FIELDS = (
    "messages",
    "message_reactions",
    "messaging_seen",
    "messaging_postbacks",
    "messaging_referral",
    "message_edit",
)
PAGE_WEBHOOK_FIELDS = (
    "messages",
    "message_reactions",
    "message_reads",
    "messaging_postbacks",
    "messaging_referrals",
    "message_edits",
)
ME_FIELDS = "user_id,username,name,account_type,profile_picture_url"
PAGE_FIELDS = (
    "id,name,access_token,tasks,instagram_business_account{id,username,name,profile_picture_url}"
)
# Meta refuses to refresh an Instagram token younger than this.
REFRESH_MIN_AGE = timedelta(hours=24)
_MAX_PAGES = 20

GRAPH = "INSTAGRAM_GRAPH_URL"
GRAPH_FB = "INSTAGRAM_GRAPH_FACEBOOK_URL"
API = "INSTAGRAM_API_URL"
WWW = "INSTAGRAM_WWW_URL"
FB_WWW = "INSTAGRAM_FACEBOOK_WWW_URL"


def _now() -> datetime:
    return datetime.now(UTC)


def _expiry(issued_at: datetime, expires_in: Any) -> datetime | None:
    try:
        seconds = int(expires_in)
    except (TypeError, ValueError):
        return None
    return issued_at + timedelta(seconds=seconds) if seconds > 0 else None


def _token(body: dict[str, Any], what: str) -> Secret:
    value = body.get("access_token")
    if not isinstance(value, str) or not value:
        raise ChannelRequestError(f"Meta's {what} answer carries no access_token")
    return Secret(value)


def _permissions(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str):
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    if isinstance(raw, list):
        return tuple(str(p) for p in raw if p)
    return ()


class InstagramConnector:
    """:class:`gateway.domain.connect.ChannelConnector` for Instagram."""

    def __init__(self, settings: Callable[[], InstagramSettings], graph: GraphClient) -> None:
        # A getter: the plugin replaces its settings when it starts an embedded sandbox.
        self._settings = settings
        self._graph = graph

    @property
    def settings(self) -> InstagramSettings:
        return self._settings()

    def _versioned(self, path: str) -> str:
        return f"/{self.settings.graph_version}/{path.lstrip('/')}"

    # ---- the dialog ----

    def authorization_url(self, login_flow: str, state: str) -> str:
        s = self.settings
        if login_flow == FLOW_INSTAGRAM:
            query = {
                "client_id": s.instagram_app_id,
                "redirect_uri": s.redirect_uri,
                "response_type": "code",
                "scope": ",".join(INSTAGRAM_SCOPES),
                "state": state,
            }
            return f"{s.base_urls[WWW]}/oauth/authorize?{urlencode(query)}"
        if login_flow == FLOW_FACEBOOK:
            query = {
                "client_id": s.facebook_app_id,
                "redirect_uri": s.redirect_uri,
                "response_type": "code",
                "scope": ",".join(s.facebook_scopes),
                "state": state,
            }
            return f"{s.base_urls[FB_WWW]}/{s.graph_version}/dialog/oauth?{urlencode(query)}"
        raise InvalidArgument("login_flow", f"unknown login flow {login_flow!r}")

    # ---- the exchange ----

    async def exchange(self, login_flow: str, code: str) -> Grant:
        # Instagram appends "#_" to the redirect; a client that kept it must not break the code.
        code = code.strip().removesuffix("#_")
        if not code:
            raise InvalidArgument("code", "must not be empty")
        if login_flow == FLOW_INSTAGRAM:
            return await self._exchange_instagram(code)
        if login_flow == FLOW_FACEBOOK:
            return await self._exchange_facebook(code)
        raise InvalidArgument("login_flow", f"unknown login flow {login_flow!r}")

    async def _exchange_instagram(self, code: str) -> Grant:
        s = self.settings
        body = await self._graph.request(
            "POST",
            API,
            "/oauth/access_token",
            data={
                "client_id": s.instagram_app_id,
                "client_secret": s.instagram_app_secret.reveal(),
                "grant_type": "authorization_code",
                "redirect_uri": s.redirect_uri,
                "code": code,
            },
        )
        # Meta documents both {"data": [{...}]} and the same object flat.
        items = body.get("data")
        short_body = items[0] if isinstance(items, list) and items else body
        if not isinstance(short_body, dict):
            raise ChannelRequestError("Instagram's code exchange answer has no token")
        short = _token(short_body, "code exchange")
        scopes = _permissions(short_body.get("permissions")) or INSTAGRAM_SCOPES
        issued_at = _now()
        long_body = await self._graph.request(
            "GET",
            GRAPH,
            "/access_token",
            params={
                "grant_type": "ig_exchange_token",
                "client_secret": s.instagram_app_secret.reveal(),
                "access_token": short.reveal(),
            },
        )
        token = self._instagram_token(long_body, issued_at, "long-lived exchange")
        me = await self._graph.request(
            "GET", GRAPH, self._versioned("/me"), params={"fields": ME_FIELDS}, token=token.value
        )
        external_id = str(me.get("user_id") or "")
        if not external_id:
            raise ChannelRequestError("Instagram's /me answer has no user_id")
        account = Account(
            external_id=external_id,
            username=str(me.get("username") or ""),
            display_name=str(me.get("name") or ""),
            picture_url=str(me.get("profile_picture_url") or ""),
        )
        return Grant(
            login_flow=FLOW_INSTAGRAM,
            scopes=scopes,
            accounts=(GrantedAccount(account=account, token=token),),
        )

    @staticmethod
    def _instagram_token(body: dict[str, Any], issued_at: datetime, what: str) -> AccessToken:
        return AccessToken(
            value=_token(body, what),
            issued_at=issued_at,
            expires_at=_expiry(issued_at, body.get("expires_in")),
            refreshable_after=issued_at + REFRESH_MIN_AGE,
        )

    async def _exchange_facebook(self, code: str) -> Grant:
        s = self.settings
        app = {"client_id": s.facebook_app_id, "client_secret": s.facebook_app_secret.reveal()}
        path = self._versioned("/oauth/access_token")
        short_body = await self._graph.request(
            "GET", GRAPH_FB, path, params={**app, "redirect_uri": s.redirect_uri, "code": code}
        )
        short = _token(short_body, "code exchange")
        long_body = await self._graph.request(
            "GET",
            GRAPH_FB,
            path,
            params={**app, "grant_type": "fb_exchange_token", "fb_exchange_token": short.reveal()},
        )
        user_token = _token(long_body, "long-lived exchange")
        issued_at = _now()
        accounts = [
            GrantedAccount(
                account=account, token=AccessToken(value=page_token, issued_at=issued_at)
            )
            for account, page_token in await self._pages(user_token)
        ]
        scopes = self._settings().facebook_scopes
        return Grant(login_flow=FLOW_FACEBOOK, scopes=scopes, accounts=tuple(accounts))

    async def _pages(self, user_token: Secret) -> list[tuple[Account, Secret]]:
        """Every granted page linked to an Instagram professional account, with its token."""
        found: list[tuple[Account, Secret]] = []
        params = {"fields": PAGE_FIELDS}
        for _ in range(_MAX_PAGES):
            body = await self._graph.request(
                "GET", GRAPH_FB, self._versioned("/me/accounts"), params=params, token=user_token
            )
            for page in body.get("data") or ():
                ig = page.get("instagram_business_account") if isinstance(page, dict) else None
                if not isinstance(ig, dict) or not ig.get("id") or not page.get("access_token"):
                    continue
                account = Account(
                    external_id=str(ig["id"]),
                    username=str(ig.get("username") or ""),
                    display_name=str(ig.get("name") or page.get("name") or ""),
                    picture_url=str(ig.get("profile_picture_url") or ""),
                    page_id=str(page.get("id") or ""),
                )
                found.append((account, Secret(str(page["access_token"]))))
            paging = body.get("paging") or {}
            after = (paging.get("cursors") or {}).get("after")
            if not paging.get("next") or not after:
                break
            params = {"fields": PAGE_FIELDS, "after": str(after)}
        return found

    # ---- webhooks ----

    def _subscription(self, login_flow: str, account: Account) -> tuple[str, str]:
        if login_flow == FLOW_FACEBOOK:
            if not account.page_id:
                raise ChannelRequestError("a Facebook Login connection needs its page id")
            return GRAPH_FB, self._versioned(f"/{account.page_id}/subscribed_apps")
        return GRAPH, self._versioned("/me/subscribed_apps")

    async def subscribe(self, login_flow: str, account: Account, token: AccessToken) -> None:
        host, path = self._subscription(login_flow, account)
        body = await self._graph.request(
            "POST",
            host,
            path,
            params={"subscribed_fields": ",".join(_webhook_fields(login_flow))},
            token=token.value,
        )
        if body.get("success") is not True:
            raise ChannelRequestError("Meta did not confirm the webhook subscription")

    async def unsubscribe(self, login_flow: str, account: Account, token: AccessToken) -> None:
        host, path = self._subscription(login_flow, account)
        await self._graph.request("DELETE", host, path, token=token.value)

    async def subscription_active(
        self, login_flow: str, account: Account, token: AccessToken
    ) -> bool:
        host, path = self._subscription(login_flow, account)
        body = await self._graph.request("GET", host, path, token=token.value)
        s = self.settings
        app_id = s.facebook_app_id if login_flow == FLOW_FACEBOOK else s.instagram_app_id
        for app in body.get("data") or ():
            if isinstance(app, dict) and str(app.get("id", "")) == app_id:
                return "messages" in (app.get("subscribed_fields") or ())
        return False

    # ---- refresh ----

    async def refresh(self, login_flow: str, token: AccessToken) -> AccessToken:
        if login_flow != FLOW_INSTAGRAM:
            raise ChannelRequestError("only Instagram Login tokens can be refreshed")
        issued_at = _now()
        body = await self._graph.request(
            "GET",
            GRAPH,
            "/refresh_access_token",
            params={"grant_type": "ig_refresh_token", "access_token": token.value.reveal()},
        )
        return self._instagram_token(body, issued_at, "refresh")


def _webhook_fields(login_flow: str) -> tuple[str, ...]:
    return PAGE_WEBHOOK_FIELDS if login_flow == FLOW_FACEBOOK else INSTAGRAM_WEBHOOK_FIELDS
