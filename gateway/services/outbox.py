"""Writing a transaction's events to the outbox, for the relay of this process.

Without a relay in the process (``serve http``), events are added plainly and another
process's relay sweeps them up. With one, they are added already claimed for it and
handed over after the commit, so it publishes them without a claim transaction of its own;
should the hand-over never happen (a crash), the claim lapses and the sweep takes them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

from gateway.domain.events import Event
from gateway.domain.store import OutboxEntry, Tx
from gateway.services.relay import OutboxRelay

# Entries claimed for the relay lapse a little before its own lease would, never after.
_LEASE_MARGIN = timedelta(seconds=1)

Handed = Sequence[OutboxEntry]


class OutboxWriter:
    def __init__(self, relay: OutboxRelay | None) -> None:
        self._relay = relay

    @property
    def hands_over(self) -> bool:
        """Whether :meth:`add` returns the entries it added (events already in the outbox
        left out), for this process's relay."""
        return self._relay is not None

    async def add(self, tx: Tx, events: Sequence[Event]) -> Handed:
        """Adds the events inside ``tx``; pass the result to :meth:`committed` after it."""
        if not events:
            return ()
        if self._relay is None:
            await tx.add_events(events)
            return ()
        return await tx.add_claimed_events(events, self._claim_until(self._relay))

    async def add_deferred(
        self, tx: Tx, events: Sequence[Event]
    ) -> Callable[[], Awaitable[Handed]]:
        """:meth:`add`, its result read by awaiting the function returned once the
        transaction ended: where the store can, the insert then travels with the COMMIT
        instead of costing a round trip of its own."""
        if not events:
            return _nothing
        if self._relay is None:
            await tx.add_events(events)
            return _nothing
        return await tx.add_claimed_events_deferred(events, self._claim_until(self._relay))

    @staticmethod
    def _claim_until(relay: OutboxRelay) -> datetime:
        return datetime.now(UTC) + relay.lease - _LEASE_MARGIN

    def committed(self, handed: Handed) -> None:
        if handed and self._relay is not None:
            self._relay.hand_over(handed)

    def notify(self) -> None:
        """Events were added another way (``Tx.add_events``) and committed: the relay, if
        this process runs one, publishes them now rather than at its next sweep."""
        if self._relay is not None:
            self._relay.notify()


async def _nothing() -> Handed:
    return ()
