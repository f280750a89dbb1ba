"""Webhooks as Meta sends them: the envelope, the escaping, the signature, the POST."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Coroutine
from typing import Any

import aiohttp

from .state import Account, Delivery, SandboxState

log = logging.getLogger(__name__)


def sign(secret: str | bytes, body: bytes) -> str:
    """``X-Hub-Signature-256``: ``sha256=`` + hex HMAC-SHA256 of the raw body."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def serialize(payload: Any) -> bytes:
    """JSON the way Meta writes it: ``/`` escaped and non-ASCII as ``\\uXXXX`` pairs.

    Receivers that verify re-serialized JSON instead of the raw bytes fail on this, as they
    would against Meta.
    """
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"))
    return text.replace("/", "\\/").encode()


def envelope(entries: list[dict[str, Any]], *, object_: str = "instagram") -> dict[str, Any]:
    return {"object": object_, "entry": entries}


def entry(ig_id: str, time_ms: int, messaging: list[dict[str, Any]]) -> dict[str, Any]:
    return {"time": time_ms, "id": ig_id, "messaging": messaging}


def secret_for(state: SandboxState, account: Account | None) -> str:
    """The app secret Meta would sign with: the app of the login flow the account used."""
    if account is not None and account.flow == "facebook":
        return state.settings.facebook_app_secret
    return state.settings.instagram_app_secret


class WebhookSender:
    """POSTs signed deliveries, records each, and retries echoes in the background."""

    def __init__(self, state: SandboxState, session: aiohttp.ClientSession) -> None:
        self._state = state
        self._session = session
        self._tasks: set[asyncio.Task[None]] = set()

    async def deliver(
        self, payload: Any, *, secret: str, kind: str = "control", url: str | None = None
    ) -> Delivery:
        target = url or self._state.webhook_url
        if not target:
            raise LookupError("no webhook URL is set")
        body = serialize(payload)
        delivery = Delivery(
            id=self._state.next_id(),
            kind=kind,
            url=target,
            body=body,
            signature=sign(secret, body),
            payload=payload,
            created_ms=self._state.clock.now_ms(),
        )
        self._state.record_delivery(delivery)
        await self.attempt(delivery)
        return delivery

    async def attempt(self, delivery: Delivery) -> Delivery:
        """One POST of the delivery's exact bytes; a retry sends them again unchanged."""
        delivery.attempts += 1
        headers = {
            "Content-Type": "application/json",
            "X-Hub-Signature-256": delivery.signature,
            "User-Agent": "facebookexternalua",
        }
        timeout = aiohttp.ClientTimeout(total=self._state.settings.webhook_timeout_s)
        try:
            async with self._session.post(
                delivery.url, data=delivery.body, headers=headers, timeout=timeout
            ) as response:
                await response.read()
                delivery.status = response.status
                delivery.error = None
        except (aiohttp.ClientError, TimeoutError) as exc:
            delivery.status = None
            delivery.error = f"{type(exc).__name__}: {exc}"
            log.info("webhook delivery %s to %s failed: %s", delivery.id, delivery.url, exc)
        return delivery

    async def verify(self, url: str) -> dict[str, Any]:
        """Meta's subscription check: GET with hub.* parameters, expecting the challenge back."""
        challenge = str(secrets.randbelow(10**9))
        params = {
            "hub.mode": "subscribe",
            "hub.challenge": challenge,
            "hub.verify_token": self._state.settings.webhook_verify_token,
        }
        timeout = aiohttp.ClientTimeout(total=self._state.settings.webhook_timeout_s)
        try:
            async with self._session.get(url, params=params, timeout=timeout) as response:
                text = await response.text()
                verified = response.status == 200 and text.strip() == challenge
                return {"status": response.status, "verified": verified}
        except (aiohttp.ClientError, TimeoutError) as exc:
            return {"status": None, "verified": False, "error": f"{type(exc).__name__}: {exc}"}

    def echo(self, payload: Any, *, secret: str) -> None:
        """Deliver in the background, after the Send API has answered, retrying like Meta."""
        if not self._state.webhook_url:
            return
        self._background(self._echo(payload, secret))

    async def echo_first(self, payload: Any, *, secret: str) -> None:
        """Deliver before the Send API answers, as Meta's echo sometimes overtakes its own
        answer; should that delivery fail, it is retried in the background as usual."""
        if not self._state.webhook_url:
            return
        self._background(self._retry(await self.deliver(payload, secret=secret, kind="echo")))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _echo(self, payload: Any, secret: str) -> None:
        await self._retry(await self.deliver(payload, secret=secret, kind="echo"))

    async def _retry(self, delivery: Delivery) -> None:
        for delay in self._state.settings.echo_retry_delays_s:
            if delivery.status is not None and 200 <= delivery.status < 300:
                return
            await asyncio.sleep(delay)
            await self.attempt(delivery)

    async def drain(self) -> None:
        """Wait for pending echoes (tests call it to make echo delivery deterministic)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
