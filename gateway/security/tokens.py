"""API tokens: ``authorization: Bearer <token>`` on every gRPC call.

A token is 32 random bytes (``sb_`` + urlsafe base64). Only its SHA-256 is stored: the
tokens are high-entropy, so a slow password hash would add nothing but latency on every
call. Tokens come from the store (``switchboard tokens create``) or, for deployments that
manage secrets outside, from ``SWITCHBOARD_API_TOKENS``::

    TOKEN[@TENANT+TENANT...][/SCOPE+SCOPE...][,...]      (no @: every tenant; no /: every scope)
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable
from datetime import UTC, datetime

from gateway.domain.errors import InvalidArgument, Unauthenticated
from gateway.domain.ids import new_id
from gateway.domain.models import ALL_TENANTS, ApiToken, Scope
from gateway.domain.store import Store

TOKEN_PREFIX = "sb_"  # noqa: S105 - a public prefix, not a secret
MIN_STATIC_TOKEN_LENGTH = 24


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def parse_scopes(values: Iterable[str]) -> frozenset[Scope]:
    """Scope names to Scope values; no names means every scope."""
    names = [v.strip().lower() for v in values if v.strip()]
    if not names:
        return frozenset(Scope)
    out = set()
    for name in names:
        try:
            out.add(Scope(name))
        except ValueError:
            allowed = ", ".join(s.value for s in Scope)
            raise InvalidArgument("scope", f"{name!r} is not one of {allowed}") from None
    return frozenset(out)


def parse_tenants(values: Iterable[str]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in values if v.strip()))
    if not names or ALL_TENANTS in names:
        return (ALL_TENANTS,)
    return names


def _names_nothing(names: str) -> bool:
    """A ``+``-separated list with no name in it (blank, whitespace, separators only)."""
    return not any(name.strip() for name in names.split("+"))


def _parse_static(spec: str) -> tuple[dict[str, ApiToken], list[str]]:
    tokens: dict[str, ApiToken] = {}
    problems: list[str] = []
    for position, item in enumerate(filter(None, (p.strip() for p in spec.split(","))), 1):
        where = f"SWITCHBOARD_API_TOKENS: token #{position}"
        rest, slash, scope_part = item.partition("/")
        token, at, tenant_part = rest.partition("@")
        if len(token) < MIN_STATIC_TOKEN_LENGTH:
            problems.append(f"{where}: shorter than {MIN_STATIC_TOKEN_LENGTH} characters")
            continue
        # "@" or "/" with nothing after is what an unset shell variable leaves: never read as
        # every tenant or every scope (left out entirely, they mean that).
        if at and _names_nothing(tenant_part):
            problems.append(f"{where}: '@' names no tenant (leave it out for every tenant)")
            continue
        if slash and _names_nothing(scope_part):
            problems.append(f"{where}: '/' names no scope (leave it out for every scope)")
            continue
        try:
            scopes = parse_scopes(scope_part.split("+"))
        except InvalidArgument:
            # Not quoting the word: after a '/' that belongs to the token itself (base64
            # has them), it is a piece of the secret.
            problems.append(
                f"{where}: a scope after '/' is not one of {', '.join(s.value for s in Scope)};"
                " a token holding '/', '@' or ',' is cut there: use one of letters, digits,"
                " '-' and '_' (as `switchboard tokens create` makes)"
            )
            continue
        digest = hash_token(token)
        tokens[digest] = ApiToken(
            id=f"static-{position}",
            name=f"static-{position}",
            tenants=parse_tenants(tenant_part.split("+")),
            scopes=scopes,
        )
    return tokens, problems


def validate_static_tokens_spec(spec: str) -> list[str]:
    return _parse_static(spec)[1] if spec else []


async def create_token(
    store: Store, *, name: str, tenants: Iterable[str], scopes: Iterable[str]
) -> tuple[str, ApiToken]:
    """Creates and stores a token; returns the plaintext (shown once) and its record."""
    if not name.strip():
        raise InvalidArgument("name", "must not be empty")
    plaintext = generate_token()
    record = ApiToken(
        id=new_id("tok"),
        name=name.strip(),
        tenants=parse_tenants(tenants),
        scopes=parse_scopes(scopes),
        created_at=datetime.now(UTC),
    )
    async with store.transaction() as tx:
        await tx.create_api_token(record, hash_token(plaintext))
    return plaintext, record


class TokenAuthority:
    """Resolves bearer tokens, caching store lookups briefly.

    A revoked token stops working within ``cache_ttl_s`` on every replica; the cache keeps
    the store out of the per-call path.
    """

    def __init__(
        self,
        store: Store,
        static_spec: str = "",
        *,
        cache_ttl_s: float = 10.0,
        cache_size: int = 1024,
    ) -> None:
        self._store = store
        self._static, problems = _parse_static(static_spec)
        if problems:
            raise ValueError(problems)
        self._ttl = cache_ttl_s
        self._size = cache_size
        self._cache: OrderedDict[str, tuple[float, ApiToken | None]] = OrderedDict()

    async def authenticate(self, token: str) -> ApiToken:
        if not token:
            raise Unauthenticated("missing bearer token")
        digest = hash_token(token)
        static = self._static.get(digest)
        if static is not None:
            return static
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            record = cached[1]
        else:
            async with self._store.transaction() as tx:
                record = await tx.find_api_token(digest)
            self._cache[digest] = (now + self._ttl, record)
            self._cache.move_to_end(digest)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        if record is None:
            raise Unauthenticated("unknown or revoked token")
        return record

    def forget(self) -> None:
        self._cache.clear()
