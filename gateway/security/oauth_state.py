"""OAuth ``state`` values: 256 random bits, stored only as a hash, single use, expiring.

Two stores behind one protocol: Redis (shared by every replica, ``GETDEL`` makes a state
single-use even when two callbacks race; one key per state, so a Redis Cluster works as
well) when the gateway has Redis, else the database's
``oauth_states`` table. Neither ever holds the state itself: a leaked store cannot be
replayed against the callback.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson

from gateway.domain.errors import Unavailable
from gateway.domain.models import OAuthState
from gateway.domain.store import Store
from gateway.redis_client import REDIS_ERRORS, RedisClient, open_redis

STATE_TTL = timedelta(minutes=10)
STATE_BYTES = 32


def new_state() -> str:
    """A fresh state value (256 random bits, URL-safe)."""
    return secrets.token_urlsafe(STATE_BYTES)


def hash_state(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


def oauth_state_key(prefix: str, state_hash: str) -> str:
    """The Redis key of a pending state."""
    return f"{prefix}oauth:state:{state_hash}"


class OAuthStateStore(Protocol):
    async def put(self, state: OAuthState) -> None:
        """Keeps the state until ``state.expires_at``."""

    async def take(self, state_hash: str, now: datetime) -> OAuthState | None:
        """Removes and returns the state; None when unknown, used or expired."""

    async def aclose(self) -> None: ...


class StoreOAuthStates:
    """The database's ``oauth_states`` table (the embedded default)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def put(self, state: OAuthState) -> None:
        async with self._store.transaction() as tx:
            # Expired rows would otherwise pile up: each new flow sweeps the old ones.
            await tx.purge_oauth_states(datetime.now(UTC))
            await tx.put_oauth_state(state)

    async def take(self, state_hash: str, now: datetime) -> OAuthState | None:
        async with self._store.transaction() as tx:
            return await tx.take_oauth_state(state_hash, now)

    async def aclose(self) -> None:
        return None


def _to_json(state: OAuthState) -> bytes:
    return orjson.dumps(
        {
            "tenant_id": state.tenant_id,
            "channel": state.channel,
            "login_flow": state.login_flow,
            "return_url": state.return_url,
            "expires_at": state.expires_at.isoformat(),
            "created_at": state.created_at.isoformat() if state.created_at else None,
        }
    )


def _from_json(state_hash: str, raw: bytes | str) -> OAuthState:
    data: dict[str, Any] = orjson.loads(raw)
    created = data.get("created_at")
    return OAuthState(
        state_hash=state_hash,
        tenant_id=data["tenant_id"],
        channel=data["channel"],
        login_flow=data["login_flow"],
        return_url=data["return_url"],
        expires_at=datetime.fromisoformat(data["expires_at"]),
        created_at=datetime.fromisoformat(created) if created else None,
    )


class RedisOAuthStates:
    """Redis keys with a TTL; taken with ``GETDEL``."""

    def __init__(self, url: str, *, prefix: str) -> None:
        self._client: RedisClient = open_redis(url)
        self._prefix = prefix

    async def put(self, state: OAuthState) -> None:
        ttl_ms = int((state.expires_at - datetime.now(UTC)).total_seconds() * 1000)
        try:
            await self._client.set(
                oauth_state_key(self._prefix, state.state_hash), _to_json(state), px=max(ttl_ms, 1)
            )
        except REDIS_ERRORS as exc:
            raise Unavailable(
                f"Redis cannot store the OAuth state ({type(exc).__name__})",
                reason="STATE_STORE_UNAVAILABLE",
            ) from None

    async def take(self, state_hash: str, now: datetime) -> OAuthState | None:
        try:
            raw = await self._client.getdel(oauth_state_key(self._prefix, state_hash))
        except REDIS_ERRORS as exc:
            raise Unavailable(
                f"Redis cannot read the OAuth state ({type(exc).__name__})",
                reason="STATE_STORE_UNAVAILABLE",
            ) from None
        if raw is None:
            return None
        state = _from_json(state_hash, raw)
        return state if state.expires_at > now else None

    async def aclose(self) -> None:
        await self._client.aclose()


def open_oauth_states(store: Store, redis_url: str | None, *, prefix: str) -> OAuthStateStore:
    if redis_url:
        return RedisOAuthStates(redis_url, prefix=prefix)
    return StoreOAuthStates(store)
