"""Inbound: verify -> normalize -> route -> store (+ outbox) -> answer, for any channel.

The channel's :class:`~gateway.domain.inbound.ChannelInbound` checks the signature on the
raw bytes first and normalizes the delivery; this service routes the items to connections
by the account ids they name and stores them through a group committer, so the items of
concurrent deliveries share one transaction. A delivery is answered 200 only after the
transaction holding its items committed, 503 when the store cannot take it (the channel
retries), 400 when it is not the channel's envelope (kept in quarantine), 403 when it is
not authentic (nothing stored).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.domain.channel import HttpRequest, HttpResponse
from gateway.domain.errors import Unavailable
from gateway.domain.events import EventKind
from gateway.domain.inbound import (
    ChannelInbound,
    DeliveryRejected,
    ParsedDelivery,
    QuarantinedDelivery,
    RoutedItem,
)
from gateway.domain.models import Connection, Participant
from gateway.domain.store import Store
from gateway.observability import inbound_metrics as m
from gateway.services.activity import ConnectionActivity
from gateway.services.inbound_events import build_events
from gateway.services.ingest_batcher import GroupCommitter
from gateway.services.outbox import OutboxWriter
from gateway.services.profiles import ProfileEnricher
from gateway.services.relay import OutboxRelay

log = logging.getLogger(__name__)

UNKNOWN_ACCOUNT = "UNKNOWN_ACCOUNT"
MALFORMED = "MALFORMED"
# A quarantined body is cut here; its full size is recorded beside it.
MAX_QUARANTINED_BYTES = 64 * 1024


# Labelled children cached: a labels() lookup per request costs more than the increment.
@functools.cache
def _deliveries(channel: str, outcome: str) -> Any:
    return m.WEBHOOK_DELIVERIES.labels(channel, outcome)


@functools.cache
def _ack_seconds(channel: str) -> Any:
    return m.WEBHOOK_ACK_SECONDS.labels(channel)


@functools.cache
def _events(channel: str, kind: str) -> Any:
    return m.INBOUND_EVENTS.labels(channel, kind)


@dataclass(frozen=True, slots=True)
class _Job:
    channel: str
    parsed: ParsedDelivery
    received_at: datetime


class InboundService:
    def __init__(
        self,
        store: Store,
        *,
        relay: OutboxRelay | None = None,
        enricher: ProfileEnricher | None = None,
        quarantine_keep: int = 10_000,
        max_batch_items: int = 1000,
        max_wait_s: float = 0.001,
        workers: int = 1,
        ack_timeout_s: float = 4.0,
        activity_interval_s: float = 5.0,
        echo_patience_s: float = 0.25,
    ) -> None:
        self._store = store
        # Never so long that the wait alone would come near the answer's deadline.
        self._echo_patience_s = min(echo_patience_s, ack_timeout_s / 2)
        self._ack_timeout_s = ack_timeout_s
        # The outbox relay of this process, if it runs one: the events of a commit are
        # handed to it directly. Otherwise another process's relay sweeps them up.
        self._outbox = OutboxWriter(relay)
        self._enricher = enricher
        self._keep = quarantine_keep
        self._committer: GroupCommitter[_Job, None] = GroupCommitter(
            self._flush,
            size=lambda job: max(1, len(job.parsed.items)),
            max_items=max_batch_items,
            max_wait_s=max_wait_s,
            workers=workers,
            name="inbound-commit",
        )
        self.activity = ConnectionActivity(store, interval_s=activity_interval_s)

    async def start(self) -> None:
        await self.activity.start()
        await self._committer.start()

    async def aclose(self) -> None:
        await self._committer.aclose()
        # After the committer: the batches it finished touched connections.
        await self.activity.aclose()
        if self._enricher is not None:
            await self._enricher.aclose()

    async def receive(
        self, channel: str, inbound: ChannelInbound, request: HttpRequest
    ) -> HttpResponse:
        """One webhook request, answered as the channel expects."""
        if request.method == "GET":
            return inbound.verify_subscription(request)
        try:
            return await self._deliver(channel, inbound, request)
        except Exception:
            # Answered 500 by the sidecar: counted here, or the per-outcome count would
            # miss exactly the deliveries that need looking at.
            _deliveries(channel, "error").inc()
            raise

    async def _deliver(
        self, channel: str, inbound: ChannelInbound, request: HttpRequest
    ) -> HttpResponse:
        started = time.perf_counter()
        verdict = inbound.verify(request)
        if not verdict.ok:
            m.WEBHOOK_REJECTED_SIGNATURES.labels(channel, verdict.reason).inc()
            m.WEBHOOK_DELIVERIES.labels(channel, "forbidden").inc()
            log.warning("webhook refused", extra={"channel": channel, "signature": verdict.reason})
            return HttpResponse.text(403, "invalid signature")
        received_at = datetime.now(UTC)
        try:
            parsed = inbound.parse(request.body)
        except DeliveryRejected as exc:
            return await self._reject(channel, request.body, received_at, exc)
        if not parsed.items and not parsed.leftovers:
            _deliveries(channel, "test" if parsed.test_items else "empty").inc()
            return HttpResponse.text(200, "EVENT_RECEIVED")
        try:
            # Meta gives up on a slow answer; a 503 in time makes it retry sooner. Should
            # the commit still land afterwards, the retry is deduplicated.
            await self._committer.submit(
                _Job(channel, parsed, received_at),
                timeout_s=self._ack_timeout_s,
                patience_s=self._patience(parsed),
            )
        except (Unavailable, TimeoutError) as exc:
            _deliveries(channel, "unavailable").inc()
            log.warning(
                "webhook not stored, asking for a retry",
                extra={"reason": getattr(exc, "reason", "ACK_TIMEOUT")},
            )
            return HttpResponse.text(503, "temporarily unavailable, retry later")
        _deliveries(channel, "accepted").inc()
        _ack_seconds(channel).observe(time.perf_counter() - started)
        return HttpResponse.text(200, "EVENT_RECEIVED")

    def _patience(self, parsed: ParsedDelivery) -> float:
        """How long the delivery may wait for company before its commit: only copies of
        what the business sent (echoes) may; a customer's message is committed at once."""
        if parsed.leftovers or not all(i.kind is EventKind.MESSAGE_ECHOED for i in parsed.items):
            return 0.0
        return self._echo_patience_s

    async def _reject(
        self, channel: str, body: bytes, received_at: datetime, exc: DeliveryRejected
    ) -> HttpResponse:
        entry = _quarantined(channel, MALFORMED, body, received_at)
        try:
            async with self._store.transaction() as tx:
                await tx.quarantine([entry], keep=self._keep)
        except Unavailable:
            # Not even quarantine could keep it: let the channel retry rather than lose it.
            m.WEBHOOK_DELIVERIES.labels(channel, "unavailable").inc()
            return HttpResponse.text(503, "temporarily unavailable, retry later")
        m.WEBHOOK_DELIVERIES.labels(channel, "malformed").inc()
        m.INBOUND_QUARANTINED.labels(channel, MALFORMED).inc()
        log.warning("malformed webhook quarantined", extra={"channel": channel, "why": exc.message})
        return HttpResponse.text(400, exc.message)

    async def _flush(self, jobs: Sequence[_Job]) -> list[None]:
        routed: list[RoutedItem] = []
        kept: list[QuarantinedDelivery] = []
        async with self._store.transaction() as tx:
            channels = {job.channel for job in jobs}
            for channel in sorted(channels):
                same = jobs if len(channels) == 1 else [j for j in jobs if j.channel == channel]
                wanted = [a for j in same for a in j.parsed.account_ids()]
                found = await tx.find_connections_by_account_ids(channel, wanted)
                index = _account_index(found)
                for job in same:
                    self._route(job, index, routed, kept)
            results = await tx.ingest_inbound(routed)
            events = build_events(routed, results)
            handed = await self._outbox.add(tx, events)
            if kept:
                await tx.quarantine(kept, keep=self._keep)
        self._outbox.committed(handed)
        # Outside the transaction, which must not write (or lock) the connection rows.
        touch = self.activity.touch
        for r in routed:
            touch(r.connection.id, r.received_at)
        m.INGEST_BATCH_ITEMS.observe(len(routed))
        touched: dict[str, tuple[Connection, Participant]] = {}
        duplicates: Counter[str] = Counter()
        for r, result in zip(routed, results, strict=True):
            if result.duplicate:
                duplicates[r.connection.channel] += 1
            if result.conversation is not None:
                participant = result.conversation.participant
                touched.setdefault(participant.id, (r.connection, participant))
        for channel, count in duplicates.items():
            m.INBOUND_DUPLICATES.labels(channel).inc(count)
        # Meta's repeats of a reaction, read or postback are left out by the outbox alone (by
        # event id): the entries it took are the events stored. Without a relay in this
        # process (split roles on the in-process bus) it does not say, and all are counted.
        stored = [h.event for h in handed] if self._outbox.hands_over else events
        for (channel, kind), count in Counter((e.channel, e.kind.value) for e in stored).items():
            _events(channel, kind).inc(count)
        for entry in kept:
            m.INBOUND_QUARANTINED.labels(entry.channel, entry.reason).inc()
        if self._enricher is not None:
            self._enricher.consider(touched.values())
        return [None] * len(jobs)

    @staticmethod
    def _route(
        job: _Job,
        index: dict[str, Connection],
        routed: list[RoutedItem],
        kept: list[QuarantinedDelivery],
    ) -> None:
        for item in job.parsed.items:
            connection = next((index[a] for a in item.account_ids if a in index), None)
            if connection is None:
                # Counted and kept, never an error: Meta would retry an error forever.
                body = orjson.dumps(item.source) if item.source is not None else b"{}"
                account = item.account_ids[0] if item.account_ids else ""
                kept.append(
                    _quarantined(job.channel, UNKNOWN_ACCOUNT, body, job.received_at, account)
                )
                continue
            routed.append(RoutedItem(connection, item, job.received_at))
        for leftover in job.parsed.leftovers:
            kept.append(
                _quarantined(
                    job.channel,
                    leftover.reason,
                    leftover.raw_json.encode(),
                    job.received_at,
                    leftover.account_id,
                )
            )


def _account_index(connections: Sequence[Connection]) -> dict[str, Connection]:
    """Account id -> connection; an IG_ID match wins over a page id match."""
    index: dict[str, Connection] = {}
    for conn in connections:
        if conn.account.page_id:
            index.setdefault(conn.account.page_id, conn)
    for conn in connections:
        index[conn.account.external_id] = conn
    return index


def _quarantined(
    channel: str, reason: str, body: bytes, received_at: datetime, account_id: str = ""
) -> QuarantinedDelivery:
    return QuarantinedDelivery(
        channel=channel,
        reason=reason,
        body=body[:MAX_QUARANTINED_BYTES],
        received_at=received_at,
        account_id=account_id[:200],
        body_size=len(body),
    )
