"""The background worker that keeps connections alive: token refresh and reconciliation.

Refresh: connections whose token expires within ``margin`` are claimed through the store
(a lease, so two replicas never refresh the same token); a token the channel allows
refreshing (``AccessToken.refreshable_after``; Instagram: 24 hours old) is refreshed and
sealed again. A failure backs off exponentially by extending the lease; a rejected token
(``ChannelAuthError``) turns the connection NEEDS_REAUTH with its event.

Reconciliation: every connected account's webhook subscription is checked and restored
when it vanished (an app removed in Meta's settings, a subscription lost on Meta's side).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.domain.connect import AccessToken, connector_of
from gateway.domain.errors import (
    ChannelAuthError,
    ChannelError,
    ChannelRateLimited,
    StoreUnavailable,
)
from gateway.domain.models import Connection, ConnectionStatus
from gateway.domain.store import Store
from gateway.observability import connect_metrics as metrics
from gateway.plugins import ChannelRegistry
from gateway.security.keyring import DecryptionError, KeyRing
from gateway.services.connection_status import Notify, mark_needs_reauth, nothing
from gateway.services.credentials import seal, unseal

log = logging.getLogger(__name__)

DEFAULT_MARGIN = timedelta(days=30)


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    margin: timedelta = DEFAULT_MARGIN
    interval_s: float = 60.0
    lease: timedelta = timedelta(minutes=5)
    batch_size: int = 50
    backoff_base: timedelta = timedelta(minutes=1)
    backoff_max: timedelta = timedelta(hours=6)
    reconcile_interval_s: float = 3600.0


def _rebased(token: AccessToken, now: datetime) -> AccessToken:
    """The token's times moved onto the worker's clock, which schedules every refresh (and
    which tests move); in production the two clocks differ by the call's duration."""
    shift = now - token.issued_at
    return AccessToken(
        value=token.value,
        issued_at=now,
        expires_at=token.expires_at + shift if token.expires_at else None,
        refreshable_after=token.refreshable_after + shift if token.refreshable_after else None,
    )


class RefreshWorker:
    def __init__(
        self,
        store: Store,
        channels: ChannelRegistry,
        keyring: KeyRing,
        policy: RefreshPolicy | None = None,
        *,
        notify: Notify = nothing,
    ) -> None:
        self._store = store
        self._channels = channels
        self._keyring = keyring
        self.policy = policy or RefreshPolicy()
        self._notify = notify
        # Failures per connection, for the back-off; a replica that restarts starts over,
        # which only shortens one delay.
        self._failures: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="token-refresh")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # ---- refresh ----

    async def refresh_due(self, now: datetime | None = None) -> Counter[str]:
        """Claims and handles every due connection; returns the outcomes counted."""
        outcomes: Counter[str] = Counter()
        while True:
            at = now or datetime.now(UTC)
            async with self._store.transaction() as tx:
                claimed = await tx.claim_connections_due(
                    due_before=at + self.policy.margin,
                    now=at,
                    lease_until=at + self.policy.lease,
                    limit=self.policy.batch_size,
                )
            for conn in claimed:
                outcome = await self._refresh_one(conn, at)
                outcomes[outcome] += 1
                metrics.token_refreshes_total.labels(conn.channel, outcome).inc()
            if len(claimed) < self.policy.batch_size:
                return outcomes

    async def _refresh_one(self, conn: Connection, now: datetime) -> str:
        connector = connector_of(self._channels.get(conn.channel))
        token = await self._token(conn)
        if connector is None or token is None:
            await self._hold(conn.id, now + self.policy.backoff_max)
            return "skipped"
        if token.refreshable_after is None:
            # Nothing to do before it expires; a dead token is caught by whoever uses it.
            await self._hold(conn.id, token.expires_at or now + self.policy.backoff_max)
            return "skipped"
        if token.refreshable_after > now:
            await self._hold(conn.id, token.refreshable_after)
            return "not_yet"
        try:
            fresh = await connector.refresh(conn.login_flow, token)
        except ChannelAuthError as exc:
            self._failures.pop(conn.id, None)
            await mark_needs_reauth(
                self._store,
                conn.id,
                f"the channel rejected the token ({exc.message})",
                notify=self._notify,
            )
            return "needs_reauth"
        except ChannelError as exc:
            retry_at = self._backoff(conn.id, now)
            if isinstance(exc, ChannelRateLimited):
                retry_at = max(retry_at, exc.retry_at)
            log.warning(
                "token refresh failed, will retry",
                extra={
                    "connection_id": conn.id,
                    "reason": exc.reason,
                    "error": exc.message,
                    "retry_at": retry_at.isoformat(),
                },
            )
            await self._hold(conn.id, retry_at)
            return "failed"
        self._failures.pop(conn.id, None)
        stored = await self._store_token(conn.id, _rebased(fresh, now))
        return "refreshed" if stored else "skipped"

    async def _token(self, conn: Connection) -> AccessToken | None:
        async with self._store.transaction() as tx:
            credential = await tx.get_credential(conn.id)
        if credential is None:
            return None
        try:
            return unseal(self._keyring, credential)
        except DecryptionError as exc:
            # Most likely a key missing from the ring: an operator's fix, not the tenant's.
            log.error(
                "a credential does not open; check SWITCHBOARD_ENCRYPTION_KEYS",
                extra={"connection_id": conn.id, "error": exc.message},
            )
            return None

    async def _store_token(self, connection_id: str, token: AccessToken) -> bool:
        async with self._store.transaction() as tx:
            conn = await tx.get_connection(connection_id, for_update=True)
            # Disconnected (or re-authorizing) meanwhile: the fresh token must not linger.
            if conn is None or conn.status is not ConnectionStatus.CONNECTED:
                return False
            conn.token_expires_at = token.expires_at
            conn.last_error = ""
            await tx.save_connection(conn)
            await tx.put_credential(seal(self._keyring, connection_id, token))
            await tx.set_connection_claim(connection_id, None)
        log.info("token refreshed", extra={"connection_id": connection_id})
        return True

    def _backoff(self, connection_id: str, now: datetime) -> datetime:
        failures = self._failures.get(connection_id, 0) + 1
        self._failures[connection_id] = failures
        base = self.policy.backoff_base.total_seconds() * 2 ** min(failures - 1, 20)
        delay = min(base, self.policy.backoff_max.total_seconds()) * random.uniform(0.8, 1.2)
        return now + timedelta(seconds=delay)

    async def _hold(self, connection_id: str, until: datetime) -> None:
        async with self._store.transaction() as tx:
            await tx.set_connection_claim(connection_id, until)

    # ---- reconciliation ----

    async def reconcile(self) -> Counter[str]:
        """Checks every connected account's subscription; resubscribes where it vanished."""
        outcomes: Counter[str] = Counter()
        after = ""
        while True:
            async with self._store.transaction() as tx:
                page = await tx.scan_connections(
                    statuses=(ConnectionStatus.CONNECTED,), after_id=after, limit=100
                )
            for conn in page:
                outcome = await self._reconcile_one(conn)
                outcomes[outcome] += 1
                metrics.subscription_checks_total.labels(conn.channel, outcome).inc()
            if len(page) < 100:
                return outcomes
            after = page[-1].id

    async def _reconcile_one(self, conn: Connection) -> str:
        connector = connector_of(self._channels.get(conn.channel))
        token = await self._token(conn)
        if connector is None or token is None:
            return "failed"
        try:
            if await connector.subscription_active(conn.login_flow, conn.account, token):
                return "active"
            await connector.subscribe(conn.login_flow, conn.account, token)
        except ChannelAuthError as exc:
            await mark_needs_reauth(
                self._store,
                conn.id,
                f"the channel rejected the token ({exc.message})",
                notify=self._notify,
            )
            return "needs_reauth"
        except ChannelError as exc:
            log.warning(
                "webhook subscription check failed",
                extra={"connection_id": conn.id, "reason": exc.reason, "error": exc.message},
            )
            return "failed"
        log.warning(
            "webhook subscription had vanished; resubscribed", extra={"connection_id": conn.id}
        )
        return "resubscribed"

    # ---- metrics ----

    async def update_metrics(self, now: datetime | None = None) -> None:
        at = now or datetime.now(UTC)
        async with self._store.transaction() as tx:
            counts = await tx.count_connections_by_status()
            nearest = await tx.nearest_token_expiry()
        channels = set(self._channels) | {channel for channel, _ in counts}
        for channel in channels:
            for status in ConnectionStatus:
                metrics.connections.labels(channel, status.value).set(
                    counts.get((channel, status), 0)
                )
        metrics.token_nearest_expiry_seconds.set(
            (nearest - at).total_seconds() if nearest else float("nan")
        )

    # ---- the loop ----

    async def run_once(self) -> None:
        await self.refresh_due()
        await self.update_metrics()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        # Replicas started together should not reconcile in lockstep.
        next_reconcile = loop.time() + random.uniform(0, self.policy.reconcile_interval_s / 4)
        while True:
            try:
                await self.run_once()
                if loop.time() >= next_reconcile:
                    next_reconcile = loop.time() + self.policy.reconcile_interval_s
                    await self.reconcile()
            except StoreUnavailable:
                log.warning("token refresh cannot reach the store, retrying", exc_info=True)
            except Exception:
                # A bug must not stop refreshing every other tenant's tokens: the leases
                # lapse and the next pass retries, while the log says what went wrong.
                log.exception("token refresh pass failed")
            await asyncio.sleep(self.policy.interval_s * random.uniform(0.9, 1.1))
