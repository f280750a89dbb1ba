"""Background profile enrichment: customers' names, usernames and pictures.

After a commit the inbound service hands over the participants it touched; any without a
profile, or with one older than ``refresh_after``, is looked up on its channel in the
background. Never on the request path: events carry whatever is known when they are
stored, and a later profile update emits nothing. At most one lookup per participant runs
at a time (in this process), a few at once overall, and a failed one waits ``cooldown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta

from gateway.domain.errors import ChannelAuthError, ChannelError, StoreUnavailable
from gateway.domain.inbound import ProfileSource
from gateway.domain.models import Connection, Participant
from gateway.domain.store import Store
from gateway.observability.inbound_metrics import PROFILE_FETCHES
from gateway.security.keyring import DecryptionError, KeyRing
from gateway.services.connection_status import Notify, mark_needs_reauth, nothing
from gateway.services.credentials import unseal

log = logging.getLogger(__name__)


class ProfileEnricher:
    def __init__(
        self,
        store: Store,
        keyring: KeyRing,
        sources: Mapping[str, ProfileSource],
        *,
        refresh_after: timedelta = timedelta(days=1),
        cooldown_s: float = 600.0,
        concurrency: int = 4,
        max_pending: int = 1000,
        notify: Notify = nothing,
    ) -> None:
        self._store = store
        self._notify = notify
        self._keyring = keyring
        self._sources = dict(sources)
        self._refresh_after = refresh_after
        self._cooldown_s = cooldown_s
        self._limit = asyncio.Semaphore(concurrency)
        self._max_pending = max_pending
        self._running: dict[str, asyncio.Task[None]] = {}
        self._resting: dict[str, float] = {}

    def consider(self, touched: Iterable[tuple[Connection, Participant]]) -> None:
        """Starts a lookup for each participant whose profile is missing or stale."""
        now = datetime.now(UTC)
        for connection, participant in touched:
            if not self._due(connection, participant, now):
                continue
            task = asyncio.create_task(self._enrich(connection, participant))
            self._running[participant.id] = task
            task.add_done_callback(self._forget(participant.id))

    def _forget(self, participant_id: str) -> Callable[[asyncio.Task[None]], None]:
        def done(_: asyncio.Task[None]) -> None:
            self._running.pop(participant_id, None)

        return done

    def _due(self, connection: Connection, participant: Participant, now: datetime) -> bool:
        if connection.channel not in self._sources or participant.id in self._running:
            return False
        if len(self._running) >= self._max_pending:
            return False
        fetched = participant.profile_fetched_at
        if fetched is not None and now - fetched < self._refresh_after:
            return False
        rest_until = self._resting.get(participant.id)
        if rest_until is not None:
            if time.monotonic() < rest_until:
                return False
            del self._resting[participant.id]
        return True

    async def idle(self) -> None:
        """Waits for the lookups running now (tests and shutdown)."""
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    async def aclose(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _enrich(self, connection: Connection, participant: Participant) -> None:
        channel = connection.channel
        async with self._limit:
            outcome = await self._lookup(connection, participant)
        PROFILE_FETCHES.labels(channel, outcome).inc()
        if outcome != "ok":
            self._resting[participant.id] = time.monotonic() + self._cooldown_s

    async def _lookup(self, connection: Connection, participant: Participant) -> str:
        try:
            async with self._store.transaction() as tx:
                credential = await tx.get_credential(connection.id)
            if credential is None:
                return "no_credential"
            token = unseal(self._keyring, credential)
            profile = await self._sources[connection.channel].fetch_profile(
                connection, token.value.reveal(), participant.channel_user_id
            )
            async with self._store.transaction() as tx:
                await tx.upsert_participant(
                    Participant(
                        id=participant.id,
                        connection_id=participant.connection_id,
                        channel_user_id=participant.channel_user_id,
                        username=profile.username,
                        name=profile.name,
                        picture_url=profile.picture_url,
                        profile_fetched_at=datetime.now(UTC),
                    )
                )
        except ChannelError as exc:
            log.info(
                "profile lookup refused",
                extra={"connection_id": connection.id, "reason": exc.reason},
            )
            if isinstance(exc, ChannelAuthError) and exc.reason == "NEEDS_REAUTH":
                # The token itself is rejected: the business must log in again, and a
                # connection that only receives would not learn it from a send. (A
                # profile Meta will not show, code 230 and kin, says nothing of the token.)
                await self._needs_reauth(connection, exc.message)
            return "refused"
        except (StoreUnavailable, DecryptionError) as exc:
            log.warning(
                "profile lookup failed",
                extra={"connection_id": connection.id, "reason": exc.reason},
            )
            return "failed"
        return "ok"

    async def _needs_reauth(self, connection: Connection, message: str) -> None:
        try:
            await mark_needs_reauth(self._store, connection.id, message, notify=self._notify)
        except StoreUnavailable:
            log.warning(
                "could not mark the connection NEEDS_REAUTH", extra={"connection_id": connection.id}
            )
