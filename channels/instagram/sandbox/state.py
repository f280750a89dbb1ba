"""The sandbox's memory: accounts, customers, tokens, codes, the clock, and what was sent.

One ``SandboxState`` per app instance, mutated only from the event loop, so many sandboxes
can run side by side in one test process without sharing anything.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import count
from typing import Any, Literal

from . import errors, ids
from .settings import SandboxSettings

Flow = Literal["instagram", "facebook"]
TokenKind = Literal[
    "instagram_short", "instagram_long", "facebook_user_short", "facebook_user_long", "page"
]

CODE_TTL_S = 3600
SHORT_TOKEN_TTL_S = 3600
LONG_TOKEN_TTL_S = 5183944
REFRESH_MIN_AGE_S = 24 * 3600
WINDOW_S = 24 * 3600
HUMAN_AGENT_WINDOW_S = 7 * 24 * 3600


class Clock:
    """Wall time plus a test-controlled offset; every expiry in the sandbox reads it."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def now(self) -> float:
        return time.time() + self.offset_s

    def now_ms(self) -> int:
        return int(self.now() * 1000)

    def advance(self, seconds: float) -> None:
        self.offset_s += seconds


@dataclass
class Account:
    """A sandbox Instagram professional account, with its linked Facebook page if any."""

    ig_id: str
    app_scoped_id: str
    username: str
    name: str
    page_id: str | None
    flow: Flow
    account_type: str = "BUSINESS"

    @property
    def profile_picture_url(self) -> str:
        return f"https://scontent.sandbox.invalid/v/t51/{self.ig_id}.jpg"

    def to_json(self, pages: dict[str, Page]) -> dict[str, Any]:
        page = pages.get(self.page_id) if self.page_id else None
        return {
            "ig_id": self.ig_id,
            "app_scoped_id": self.app_scoped_id,
            "username": self.username,
            "name": self.name,
            "page_id": self.page_id,
            "page_name": page.name if page else None,
            "flow": self.flow,
        }


@dataclass
class Page:
    page_id: str
    name: str
    ig_id: str | None
    category: str = "Shopping & retail"


@dataclass
class FacebookUser:
    user_id: str
    name: str
    page_ids: list[str]


@dataclass
class Customer:
    igsid: str
    account: str
    name: str | None
    username: str
    profile_pic: str | None
    follower_count: int = 42
    is_user_follow_business: bool = False
    is_business_follow_user: bool = False
    is_verified_user: bool = False
    last_inbound_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "igsid": self.igsid,
            "account": self.account,
            "name": self.name,
            "username": self.username,
            "profile_pic": self.profile_pic,
            "follower_count": self.follower_count,
            "is_user_follow_business": self.is_user_follow_business,
            "is_business_follow_user": self.is_business_follow_user,
            "is_verified_user": self.is_verified_user,
            "last_inbound_at": self.last_inbound_at,
        }


@dataclass
class Token:
    value: str = field(repr=False)
    kind: TokenKind
    issued_at: float
    expires_at: float | None
    permissions: tuple[str, ...]
    ig_id: str | None = None
    fb_user_id: str | None = None
    page_id: str | None = None
    revoked_subcode: int | None = None

    @property
    def flow(self) -> Flow:
        return "instagram" if self.kind.startswith("instagram") else "facebook"


@dataclass
class AuthCode:
    value: str = field(repr=False)
    flow: Flow
    client_id: str
    redirect_uri: str
    issued_at: float
    scopes: tuple[str, ...]
    ig_id: str | None = None
    fb_user_id: str | None = None
    used: bool = False


@dataclass
class Approval:
    """What the next dialog does: refuse, or sign in as the given accounts (IG_IDs/PAGE_IDs)."""

    refuse: bool = False
    accounts: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"refuse": self.refuse, "accounts": list(self.accounts)}


ENDPOINTS = ("send", "profile", "subscribed_apps", "me", "oauth", "any")


@dataclass
class ErrorRule:
    """An injected failure: the next ``remaining`` matching calls (None: all) fail with it."""

    id: int
    code: int
    endpoint: str
    account: str | None
    remaining: int | None
    subcode: int | None = None
    message: str | None = None
    http_status: int | None = None
    is_transient: bool | None = None
    estimated_time_to_regain_access: int = 5

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "code": self.code,
            "subcode": self.subcode,
            "endpoint": self.endpoint,
            "account": self.account,
            "remaining": self.remaining,
            "always": self.remaining is None,
            "message": self.message,
            "http_status": self.http_status,
            "estimated_time_to_regain_access": self.estimated_time_to_regain_access,
        }


USAGE_APP_FIELDS = ("call_count", "total_time", "total_cputime")
USAGE_BUSINESS_FIELDS = (*USAGE_APP_FIELDS, "estimated_time_to_regain_access")
# Reaching 100 % is left to tests: an injected throttling error or POST /_sandbox/usage.
ORGANIC_USAGE_MAX = 99


@dataclass
class UsageRule:
    """Usage headers for the next ``remaining`` successful Send API calls of an account
    (None: until cleared). Each dict holds only the fields the test set; the rest keep the
    sandbox's own count."""

    id: int
    account: str
    app: dict[str, int]
    business_use_case: dict[str, int]
    remaining: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "account": self.account,
            "app": self.app,
            "business_use_case": self.business_use_case,
            "remaining": self.remaining,
            "always": self.remaining is None,
        }


@dataclass
class SentRecord:
    """One Send API request as received, whatever the sandbox answered."""

    id: int
    time_ms: int
    host: str
    path: str
    account: str | None
    page_id: str | None
    raw: str
    body: Any
    status: int = 0
    response: Any = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time_ms,
            "host": self.host,
            "path": self.path,
            "account": self.account,
            "page_id": self.page_id,
            "raw": self.raw,
            "body": self.body,
            "status": self.status,
            "response": self.response,
        }


@dataclass
class Subscription:
    object_id: str
    account: str | None
    flow: Flow
    fields: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "object_id": self.object_id,
            "account": self.account,
            "flow": self.flow,
            "subscribed_fields": list(self.fields),
        }


@dataclass
class Delivery:
    """One webhook POST (and its retries): the exact bytes, signature and outcome."""

    id: int
    kind: str
    url: str
    body: bytes
    signature: str
    payload: Any
    created_ms: int
    status: int | None = None
    error: str | None = None
    attempts: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "url": self.url,
            "signature": self.signature,
            "payload": self.payload,
            "raw": self.body.decode(),
            "created": self.created_ms,
            "status": self.status,
            "error": self.error,
            "attempts": self.attempts,
        }


class SandboxState:
    """All mutable state of one sandbox."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.clock = Clock()
        self.webhook_url = settings.webhook_url
        self.latency_ms = settings.latency_ms
        self.instagram_exchange_shape = settings.instagram_exchange_shape
        # When the echo of a sent message goes out: "after" the Send API answered (usual),
        # or "before" it answers, as Meta's echo sometimes overtakes its own answer.
        self.echo_timing = "after"
        self.accounts: dict[str, Account] = {}
        self.pages: dict[str, Page] = {}
        self.facebook_users: dict[str, FacebookUser] = {}
        self.customers: dict[str, Customer] = {}
        self.tokens: dict[str, Token] = {}
        self.codes: dict[str, AuthCode] = {}
        self.approvals: deque[Approval] = deque()
        self.error_rules: list[ErrorRule] = []
        # By IG_ID: what the next successful Send API calls report in their usage headers.
        self.usage_rules: dict[str, UsageRule] = {}
        self.sent: list[SentRecord] = []
        self.subscriptions: dict[str, Subscription] = {}
        self.deliveries: dict[int, Delivery] = {}
        self._calls: dict[str, deque[float]] = {}
        self._ids = count(1)

    def next_id(self) -> int:
        return next(self._ids)

    # accounts and customers

    def create_account(
        self,
        *,
        username: str | None = None,
        name: str | None = None,
        page: bool = True,
        page_name: str | None = None,
        flow: Flow = "instagram",
    ) -> Account:
        uname = username or ids.username()
        account = Account(
            ig_id=ids.ig_id(),
            app_scoped_id=ids.app_scoped_user_id(),
            username=uname,
            name=name or uname.replace("_", " ").title(),
            page_id=None,
            flow=flow,
        )
        if page:
            linked = Page(ids.page_id(), page_name or f"{account.name} Page", account.ig_id)
            self.pages[linked.page_id] = linked
            account.page_id = linked.page_id
        self.accounts[account.ig_id] = account
        return account

    def create_page(self, name: str | None = None) -> Page:
        """A Facebook page with no Instagram account linked (a choice the connect flow skips)."""
        page = Page(ids.page_id(), name or "Sandbox page without Instagram", None)
        self.pages[page.page_id] = page
        return page

    def find_account(self, any_id: str) -> Account | None:
        """The account an IG_ID, app-scoped id or linked PAGE_ID names."""
        if any_id in self.accounts:
            return self.accounts[any_id]
        page = self.pages.get(any_id)
        if page is not None and page.ig_id is not None:
            return self.accounts.get(page.ig_id)
        for account in self.accounts.values():
            if account.app_scoped_id == any_id:
                return account
        return None

    def create_customer(self, account: str, **fields: Any) -> Customer:
        handle = fields.pop("username", None) or ids.customer_username()
        customer = Customer(
            igsid=fields.pop("igsid", None) or ids.igsid(),
            account=account,
            name=fields.pop("name", handle.replace("_", " ").title()),
            username=handle,
            profile_pic=fields.pop("profile_pic", f"https://scontent.sandbox.invalid/{handle}.jpg"),
            **fields,
        )
        self.customers[customer.igsid] = customer
        return customer

    # tokens and codes

    def issue_token(
        self,
        kind: TokenKind,
        *,
        permissions: tuple[str, ...] = (),
        ig_id: str | None = None,
        fb_user_id: str | None = None,
        page_id: str | None = None,
        ttl_s: float | None = None,
    ) -> Token:
        if ttl_s is None:
            ttl_s = {
                "instagram_short": SHORT_TOKEN_TTL_S,
                "instagram_long": LONG_TOKEN_TTL_S,
                "facebook_user_short": SHORT_TOKEN_TTL_S,
                "facebook_user_long": LONG_TOKEN_TTL_S,
                "page": None,
            }[kind]
        now = self.clock.now()
        value = ids.instagram_token() if kind.startswith("instagram") else ids.facebook_token()
        token = Token(
            value=value,
            kind=kind,
            issued_at=now,
            expires_at=None if ttl_s is None else now + ttl_s,
            permissions=permissions,
            ig_id=ig_id,
            fb_user_id=fb_user_id,
            page_id=page_id,
        )
        self.tokens[value] = token
        return token

    def check_token(self, value: str | None, *, flow: Flow | None = None) -> Token:
        """The live token behind ``value``, or Meta's 104/190 error."""
        if not value:
            raise errors.token_missing()
        token = self.tokens.get(value)
        if token is None or (flow is not None and token.flow != flow):
            raise errors.token_unparseable()
        if token.revoked_subcode is not None:
            raise errors.token_revoked(token.revoked_subcode)
        if token.expires_at is not None and token.expires_at <= self.clock.now():
            when = datetime.fromtimestamp(token.expires_at, UTC).strftime("%A, %d-%b-%y %H:%M:%S")
            raise errors.token_expired(f"{when} PDT")
        return token

    def revoke(self, *, token: str | None, account: str | None, subcode: int) -> int:
        """Invalidate one token, or every token of an account (its page tokens included)."""
        hit = 0
        target = self.find_account(account) if account else None
        for item in self.tokens.values():
            by_value = token is not None and item.value == token
            by_account = target is not None and (
                item.ig_id == target.ig_id
                or (target.page_id is not None and item.page_id == target.page_id)
                or (
                    item.fb_user_id is not None
                    and target.page_id in self.facebook_users[item.fb_user_id].page_ids
                )
            )
            if by_value or by_account:
                item.revoked_subcode = subcode
                hit += 1
        return hit

    def new_code(self, **fields: Any) -> AuthCode:
        code = AuthCode(value=ids.auth_code(), issued_at=self.clock.now(), **fields)
        self.codes[code.value] = code
        return code

    def pop_approval(self) -> Approval:
        return self.approvals.popleft() if self.approvals else Approval()

    # injected errors and usage

    def take_error(self, endpoint: str, account_ids: tuple[str | None, ...]) -> ErrorRule | None:
        """The first rule matching this call, consuming one of its uses."""
        known = {i for i in account_ids if i}
        for rule in self.error_rules:
            if rule.endpoint not in ("any", endpoint):
                continue
            if rule.account is not None:
                target = self.find_account(rule.account)
                names = {rule.account}
                if target is not None:
                    names |= {target.ig_id, target.app_scoped_id, target.page_id or ""}
                if not names & known:
                    continue
            if rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    self.error_rules.remove(rule)
            return rule
        return None

    def take_usage(self, ig_id: str) -> UsageRule | None:
        """The usage rule for this account's successful send, consuming one of its uses."""
        rule = self.usage_rules.get(ig_id)
        if rule is not None and rule.remaining is not None:
            rule.remaining -= 1
            if rule.remaining <= 0:
                del self.usage_rules[ig_id]
        return rule

    def count_call(self, key: str) -> int:
        """Calls for ``key`` in the last hour, as a percentage of a nominal 200 per hour,
        never past 99: the sandbox does not throttle on its own, and a client that honours
        Meta's headers pauses an account reported at 100 % (benchmarks send thousands)."""
        now = self.clock.now()
        calls = self._calls.setdefault(key, deque())
        calls.append(now)
        while calls and calls[0] < now - 3600:
            calls.popleft()
        return min(ORGANIC_USAGE_MAX, len(calls) // 2)

    def record_delivery(self, delivery: Delivery) -> None:
        self.deliveries[delivery.id] = delivery
