"""The send worker: retries, held messages, and messages whose first attempt was cut off.

Every ``poll_s`` (or when woken) it claims due outbound messages through the store (a
lease, ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so replicas never attempt the same
message at once) and attempts them concurrently. It also refreshes the queue-depth gauge.

It claims in send order: only the oldest pending message of a conversation, so the one
behind it is claimed once that one is SENT or FAILED. The Deliverer wakes the worker at
that moment (and SendMessage when it queued a message behind another), so the next one
goes out within a round, not a poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

from gateway.domain.models import DeliveryError, Message, MessageStatus
from gateway.domain.outbound import echoed_as_message, stored_kind
from gateway.domain.store import Store
from gateway.observability import outbound_metrics as m
from gateway.services.outbound_delivery import Deliverer
from gateway.services.rounds import Rounds
from gateway.tasks import finish_or_cancel

log = logging.getLogger(__name__)


class OutboundWorker:
    def __init__(
        self,
        store: Store,
        deliverer: Deliverer,
        *,
        poll_s: float = 1.0,
        batch_size: int = 100,
        concurrency: int = 32,
    ) -> None:
        self._store = store
        self._deliverer = deliverer
        self._poll_s = poll_s
        # No more claimed at once than attempted at once: a claim's lease runs from the
        # claim, so a message claimed to wait for a slot would spend its lease waiting
        # (up to a Send API timeout per message ahead of it), and another replica would
        # claim it again, and send it again, while this one still attempts it.
        self._batch_size = min(batch_size, concurrency)
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        deliverer.on_next_due(self.notify)

    async def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="outbound-worker")

    async def aclose(self, grace_s: float = 5.0) -> None:
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        await finish_or_cancel([self._task], grace_s)
        self._task = None

    def notify(self) -> None:
        self._wake.set()

    async def run_once(self) -> int:
        """Attempts every message due now; returns how many it claimed."""
        total = 0
        while True:
            now = self._deliverer.clock.now()
            lease = now + timedelta(seconds=self._deliverer.policy.lease_s)
            async with self._store.transaction() as tx:
                claimed = await tx.claim_next_messages(
                    now=now, lease_until=lease, limit=self._batch_size
                )
                depth = await tx.count_send_queue()
            m.QUEUE_DEPTH.set(depth)
            if not claimed:
                return total
            total += len(claimed)
            await asyncio.gather(*(self._one(message) for message in claimed))
            if len(claimed) < self._batch_size:
                return total

    async def _one(self, message: Message) -> None:
        async with self._slots:
            echo = None
            async with self._store.transaction() as tx:
                conn = await tx.get_connection(message.connection_id)
                if _may_be_out(message):
                    echo = await tx.find_unadopted_echo(message, _echo_since(message))
            if conn is None:
                await self._deliverer.record_failure(
                    message, DeliveryError("CONNECTION_NOT_FOUND", "the connection is gone")
                )
                return
            if echo is not None:
                await self._deliverer.adopt_echo(message, *echo)
                return
            await self._deliverer.attempt(message, conn)

    async def _run(self) -> None:
        # Claimed messages stay leased until the lease lapses, then are claimed again: a
        # failed round delays a send, never loses it.
        rounds = Rounds("send worker", log)
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
            self._wake.clear()
            if self._stopping:
                return
            await rounds.run(self.run_once)


# How far before a message's creation its echo may be dated: Meta's clock, not ours.
_ECHO_CLOCK_SKEW = timedelta(seconds=2)


def _may_be_out(message: Message) -> bool:
    """Whether the channel may have delivered the message already, unheard: its last
    attempt heard no answer, or it is QUEUED and the worker claims it, which is also how
    a first attempt cut off (a process that stopped mid-send) comes back. Only what the
    channel echoes as a message can be recognised by its echo."""
    if not echoed_as_message(stored_kind(message)):
        return False
    if message.status is MessageStatus.QUEUED:
        return True
    return message.error is not None and message.error.maybe_delivered


def _echo_since(message: Message) -> datetime:
    created = message.created_at or datetime.now(UTC)
    return created - _ECHO_CLOCK_SKEW
