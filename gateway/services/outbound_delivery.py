"""One delivery attempt of an outbound message, and what its outcome does to the message.

Both the SendMessage call (the first attempt) and the retry worker go through
:meth:`Deliverer.attempt`, for a message they hold the lease of. It takes a rate-limit token
(waiting briefly, or holding the message until later), opens the connection's token, hands
the message to the channel once and records the outcome, its attempt and its
``DeliveryUpdate`` event in one transaction, releasing the lease (a transaction shared with
the outcomes of other attempts that ended meanwhile and with SendMessage's enqueues, see
:meth:`Deliverer.share_commits`):

- accepted: SENT with the channel's message id;
- throttled (Meta 4, 17, 32, 613, 80002, 80006, 368): the account is paused until the time
  Meta gave and the message held until then, neither failed nor counted as an attempt;
- transient (network, 5xx, Meta 1/2, ``is_transient``): RETRYING after an exponential
  backoff with jitter, FAILED once ``max_attempts`` is reached;
- token rejected or permission missing: the connection turns NEEDS_REAUTH, the message FAILED;
- anything else the channel refuses (window closed, 551, 100 family): FAILED, no retry.

Send order: a message waits while an earlier one of its conversation is pending (see
gateway.store.outbound). When an outcome settles a message (SENT or FAILED) and the store
says another of its conversation still waits, the Deliverer wakes the worker at once
rather than leaving that one to the next poll.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar, cast

from prometheus_client import Counter, Histogram

from gateway.config import Secret
from gateway.domain.channel import ChannelPlugin
from gateway.domain.errors import (
    AlreadyExists,
    ChannelAuthError,
    ChannelError,
    ChannelRateLimited,
    ChannelRequestError,
    ChannelTransientError,
    ShuttingDown,
    Unavailable,
)
from gateway.domain.events import Event
from gateway.domain.models import (
    Connection,
    ConnectionStatus,
    DeliveryError,
    Message,
    MessageStatus,
)
from gateway.domain.outbound import (
    DeliveryAttempt,
    OutboundChannel,
    OutboundMessage,
    from_json,
    outbound_of,
)
from gateway.domain.store import Store, Tx
from gateway.observability import metrics
from gateway.observability import outbound_metrics as m
from gateway.security.keyring import DecryptionError, KeyRing
from gateway.services.connection_status import mark_needs_reauth
from gateway.services.credentials import unseal
from gateway.services.delivery_events import delivery_update
from gateway.services.ingest_batcher import GroupCommitter
from gateway.services.outbox import OutboxWriter
from gateway.services.ratelimit import RateLimiter

log = logging.getLogger(__name__)

RATE_LIMITED = "RATE_LIMITED"
_TOKEN_TTL_S = 60.0
# When the store or the limiter cannot answer, try again this much later.
_UNAVAILABLE_RETRY = timedelta(seconds=5)


class Clock:
    """UTC now, with an offset tests can move (the worker and the limiter follow it)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    max_attempts: int = 6
    retry_base_s: float = 1.0
    retry_max_s: float = 300.0
    # A message is leased this long to whoever attempts it. An attempt spends at most half
    # of it on rate-limit waits and the channel's call (``attempt_bound_s``) and a third on
    # recording the outcome; the rest covers the claim's own commit. A lease that lapsed
    # while its attempt went on would have another worker send the message again.
    lease_s: float = 60.0
    # Token-bucket waits up to this long are slept in place; longer ones hold the message.
    max_inline_wait_s: float = 1.0
    # After an attempt that may have been delivered (no answer), the retry waits at least
    # this long for the channel's echo, and adopts it if it came rather than send again.
    unanswered_wait_s: float = 10.0

    @property
    def attempt_bound_s(self) -> float:
        """How long an attempt may wait for a rate-limit token and for the channel's answer
        together; a call still unanswered then is given up as one that heard no answer."""
        return self.lease_s / 2

    def retry_after(self, attempts: int, *, maybe_delivered: bool) -> timedelta:
        backoff = self.backoff(attempts)
        if maybe_delivered:
            return max(backoff, timedelta(seconds=self.unanswered_wait_s))
        return backoff

    def backoff(self, attempts: int) -> timedelta:
        """Exponential in the attempts made, with jitter over its upper half so that
        messages failed together do not retry together."""
        ceiling = min(self.retry_max_s, self.retry_base_s * 2 ** max(0, attempts - 1))
        return timedelta(seconds=ceiling * random.uniform(0.5, 1.0))


class RateLimitedNow(Exception):
    """fail_fast was asked and the account may not send now (raised to the caller)."""

    def __init__(self, retry_at: datetime) -> None:
        super().__init__("rate limited")
        self.retry_at = retry_at


def account_key(conn: Connection) -> str:
    return f"{conn.channel}:{conn.account.external_id}"


# Group commits take whatever queued while the previous batch was committing, without
# lingering: nothing on the send path sleeps waiting for company.
BATCH_MAX = 100

J = TypeVar("J")
R = TypeVar("R")


@dataclass(slots=True)
class Written(Generic[R]):
    """What a share of a send-path transaction wrote: a result per job, in order; the
    events to add to the outbox with them; whether the worker should look for messages
    that may have become next in their conversation, once committed."""

    results: list[R]
    events: list[Event]
    wake: bool = False


@dataclass(frozen=True, slots=True)
class _Outcome:
    message: Message
    attempt: DeliveryAttempt | None
    # A hold changes no status: no DeliveryUpdate.
    event: bool


# The share of a send-path transaction that records outcomes; share_commits adds others.
_OUTCOMES = 0


@dataclass(frozen=True, slots=True)
class _Job:
    share: int
    payload: Any


class Deliverer:
    def __init__(
        self,
        store: Store,
        channels: Mapping[str, ChannelPlugin],
        keyring: KeyRing,
        limiter: RateLimiter,
        policy: DeliveryPolicy,
        *,
        clock: Clock,
        outbox: OutboxWriter | None = None,
    ) -> None:
        self._store = store
        self._channels = channels
        self._keyring = keyring
        self.limiter = limiter
        self.policy = policy
        self.clock = clock
        self.outbox = outbox or OutboxWriter(None)
        self._tokens: dict[str, tuple[Secret, float, datetime | None]] = {}
        # One transaction for the outcomes of the attempts that end together, and for
        # the work of whoever shares it (share_commits).
        # Share 0 is the outcomes' own (_OUTCOMES).
        self._shares: list[Callable[[Tx, Sequence[Any]], Awaitable[Written[Any]]]] = []
        self._commits: GroupCommitter[_Job, Any] = GroupCommitter(
            self._commit, max_items=BATCH_MAX, max_wait_s=0.0, name="send-commits"
        )
        self._started = False
        self._children: dict[str, tuple[Histogram, Counter]] = {}
        self._wakers: list[Callable[[], None]] = []

    def share_commits(
        self, write: Callable[[Tx, Sequence[J]], Awaitable[Written[R]]]
    ) -> Callable[[J], Awaitable[R]]:
        """Has ``write`` run, for the jobs submitted through the function returned, in the
        transactions that record outcomes: the send path's writes that come together
        (SendMessage's enqueues, the outcomes of attempts that ended) then cost one
        transaction and one outbox insert, not one each. Outcomes are written first, so
        that a message they settle no longer holds up one enqueued in the same batch."""
        self._shares.append(write)
        share = len(self._shares)

        async def submit(job: J) -> R:
            return cast(R, await self._submit(_Job(share, job)))

        return submit

    def on_next_due(self, waker: Callable[[], None]) -> None:
        """Calls ``waker`` whenever a message may have become next in its conversation."""
        self._wakers.append(waker)

    def wake(self) -> None:
        for waker in self._wakers:
            waker()

    async def aclose(self) -> None:
        """After the attempts under way ended: an outcome cut off is retried by a worker
        once the message's lease lapses."""
        await self._commits.aclose()

    def sender_of(self, channel: str) -> OutboundChannel | None:
        plugin = self._channels.get(channel)
        return outbound_of(plugin) if plugin is not None else None

    async def attempt(
        self,
        message: Message,
        conn: Connection,
        *,
        admitted: bool = False,
        fail_fast: bool = False,
        content: OutboundMessage | None = None,
    ) -> Message:
        """One attempt at a message this process holds the lease of; returns it as stored.
        ``content``: the message's content when the caller has it (else read from it)."""
        deadline = time.monotonic() + self.policy.attempt_bound_s
        sender = self.sender_of(conn.channel)
        if conn.status is not ConnectionStatus.CONNECTED or sender is None:
            reason = f"CONNECTION_{conn.status.value}" if sender else "CHANNEL_CANNOT_SEND"
            return await self.record_failure(message, DeliveryError(reason, "cannot send now"))
        if message.attempts >= self.policy.max_attempts:
            return await self._give_up(message)
        if content is None:
            content = from_json(message.content["outbound"])
        try:
            if not admitted:
                held = await self._admit(message, conn, content)
                if held is not None:
                    return held
            token = await self._token(conn)
        except Unavailable:
            log.warning("send postponed", extra={"message_id": message.id}, exc_info=True)
            return await self._hold(message, self.clock.now() + _UNAVAILABLE_RETRY)
        except DecryptionError as exc:
            # Names the key, never its material: most often a key ring that lost a key.
            error = DeliveryError(
                "NEEDS_REAUTH",
                f"the connection's credential does not open ({exc.message});"
                " check SWITCHBOARD_ENCRYPTION_KEYS",
            )
            await mark_needs_reauth(self._store, conn.id, error.message, notify=self.outbox.notify)
            return await self.record_failure(message, error)
        return await self._send(
            message, conn, sender, content, token, deadline=deadline, fail_fast=fail_fast
        )

    async def _admit(
        self, message: Message, conn: Connection, content: OutboundMessage
    ) -> Message | None:
        """Takes a token, sleeping short waits; None when admitted, else the held message.
        The time slept comes out of the attempt's bound (``attempt_bound_s``)."""
        category = content.category
        while True:
            admission = await self.limiter.acquire(account_key(conn), category, self.clock.now())
            if admission.ok:
                return None
            if admission.paused_until is None and admission.wait_s <= self.policy.max_inline_wait_s:
                m.RATE_LIMIT_WAITS.labels(conn.channel, category.value, "wait").inc()
                m.RATE_LIMIT_WAIT_SECONDS.labels(conn.channel, category.value).inc(admission.wait_s)
                await asyncio.sleep(admission.wait_s)
                continue
            m.RATE_LIMIT_WAITS.labels(conn.channel, category.value, "hold").inc()
            until = admission.paused_until or (
                self.clock.now() + timedelta(seconds=admission.wait_s)
            )
            return await self._hold(message, until)

    async def _token(self, conn: Connection) -> Secret:
        # Every credential change (connect, reconnect, refresh) saves the connection in the
        # same transaction, so its updated_at versions the credential: a new token is used
        # at once instead of failing as the old one for up to the TTL.
        version = conn.updated_at
        cached = self._tokens.get(conn.id)
        if cached is not None and cached[1] > time.monotonic() and cached[2] == version:
            return cached[0]
        async with self._store.transaction() as tx:
            credential = await tx.get_credential(conn.id)
        if credential is None:
            raise DecryptionError("the connection has no credential")
        token = unseal(self._keyring, credential).value
        self._tokens[conn.id] = (token, time.monotonic() + _TOKEN_TTL_S, version)
        return token

    async def _send(
        self,
        message: Message,
        conn: Connection,
        sender: OutboundChannel,
        content: OutboundMessage,
        token: Secret,
        *,
        deadline: float,
        fail_fast: bool,
    ) -> Message:
        started = self.clock.now()
        clock_started = time.perf_counter()
        latency, sent = self._metrics(conn.channel)
        try:
            # Whatever the channel's own timeout: the message's lease must outlast its call.
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                result = await sender.send(conn, token, content)
        except TimeoutError:
            latency.observe(time.perf_counter() - clock_started)
            bound = self.policy.attempt_bound_s
            log.warning(
                "send call cut at the attempt's bound; it may have been delivered",
                extra={"message_id": message.id, "bound_s": bound},
            )
            unanswered = ChannelTransientError(
                f"no answer from the channel within the attempt's {bound:g} s, half of the"
                f" message's {self.policy.lease_s:g} s lease (SWITCHBOARD_SEND_LEASE_SECONDS);"
                " the request may have been carried out",
                maybe_delivered=True,
            )
            return await self._refused(message, conn, unanswered, started, fail_fast=fail_fast)
        except ChannelError as exc:
            latency.observe(time.perf_counter() - clock_started)
            return await self._refused(message, conn, exc, started, fail_fast=fail_fast)
        latency.observe(time.perf_counter() - clock_started)
        if result.pause_until is not None:
            m.ACCOUNT_PAUSES.labels(conn.channel, "usage_header").inc()
            await self._pause(conn, result.pause_until)
        now = self.clock.now()
        message.status = MessageStatus.SENT
        message.external_id = result.external_id
        message.sent_at = now
        message.error = None
        message.next_attempt_at = None
        message.attempts += 1
        sent.inc()
        return await self._record(message, DeliveryAttempt(message.attempts, started, now))

    async def _pause(self, conn: Connection, until: datetime) -> None:
        """Pauses the account, or only logs when the limiter cannot be reached: the channel
        has answered by then, and that answer must be recorded whatever happens to the
        pause (a send left unrecorded would be sent again once its lease lapsed)."""
        try:
            await self.limiter.pause(account_key(conn), until)
        except Unavailable:
            log.warning(
                "could not pause the account", extra={"connection_id": conn.id}, exc_info=True
            )

    def _metrics(self, channel: str) -> tuple[Histogram, Counter]:
        """The channel's send-latency and sent children (labels() locks and hashes)."""
        found = self._children.get(channel)
        if found is None:
            found = self._children[channel] = (
                m.CHANNEL_API_SECONDS.labels(channel, "send"),
                m.SENDS.labels(channel, "sent", "0"),
            )
        return found

    async def _refused(
        self,
        message: Message,
        conn: Connection,
        exc: ChannelError,
        started: datetime,
        *,
        fail_fast: bool,
    ) -> Message:
        code = str(exc.code)
        maybe_delivered = isinstance(exc, ChannelTransientError) and exc.maybe_delivered
        error = DeliveryError(
            reason=exc.reason,
            message=exc.message,
            channel_code=exc.code,
            channel_subcode=exc.subcode,
            retryable=exc.retryable,
            maybe_delivered=maybe_delivered,
        )
        if isinstance(exc, ChannelRateLimited):
            m.ACCOUNT_PAUSES.labels(conn.channel, "error").inc()
            await self._pause(conn, exc.retry_at)
            if fail_fast:
                # Counted by record_failure, with the channel's code.
                await self.record_failure(message, replace(error, reason=RATE_LIMITED))
                raise RateLimitedNow(exc.retry_at) from None
            m.SENDS.labels(conn.channel, "held", code).inc()
            log.info(
                "account throttled by the channel; message held",
                extra={"message_id": message.id, "connection_id": conn.id, "code": exc.code},
            )
            return await self._hold(message, exc.retry_at)
        now = self.clock.now()
        message.attempts += 1
        attempt = DeliveryAttempt(message.attempts, started, now, error)
        transient = isinstance(exc, ChannelTransientError) or not isinstance(
            exc, ChannelRequestError | ChannelAuthError
        )
        # One that may have been delivered waits for its echo even after its last attempt:
        # if the echo comes, it was delivered, else it fails then (see attempt()).
        if transient and (message.attempts < self.policy.max_attempts or maybe_delivered):
            m.SENDS.labels(conn.channel, "retrying", code).inc()
            message.status = MessageStatus.RETRYING
            message.error = replace(error, retryable=True)
            # One that may have been delivered stays leased until then (lease_of in
            # gateway.store.outbound), so that its echo is taken for ours and adopted.
            message.next_attempt_at = now + self.policy.retry_after(
                message.attempts, maybe_delivered=maybe_delivered
            )
            return await self._record(message, attempt)
        if isinstance(exc, ChannelAuthError):
            self._tokens.pop(conn.id, None)
            await mark_needs_reauth(self._store, conn.id, exc.message, notify=self.outbox.notify)
        if transient:
            error = replace(
                error,
                retryable=False,
                message=f"gave up after {message.attempts} attempts: {exc.message}",
            )
        m.SENDS.labels(conn.channel, "failed", code).inc()
        log.info(
            "message failed",
            extra={"message_id": message.id, "reason": error.reason, "code": exc.code},
        )
        message.status = MessageStatus.FAILED
        message.error = error
        message.next_attempt_at = None
        return await self._record(message, attempt)

    async def adopt_echo(self, message: Message, external_id: str, echoed_at: datetime) -> Message:
        """SENT as the message the channel echoed (``external_id``): an earlier attempt
        that heard no answer was delivered after all. Recording it folds the echo's row
        into the message and confirms it, as when an echo overtakes the answer."""
        m.SENDS.labels(message.channel, "sent", "0").inc()
        log.info(
            "message delivered by an attempt that heard no answer; not sent again",
            extra={"message_id": message.id},
        )
        message.status = MessageStatus.SENT
        message.external_id = external_id
        message.sent_at = echoed_at
        message.error = None
        message.next_attempt_at = None
        return await self._record(message, None)

    async def _give_up(self, message: Message) -> Message:
        """FAILED without another attempt: the last one heard no answer and no echo came
        while its retry waited for one (the worker looks before attempting)."""
        last = message.error or DeliveryError(ChannelTransientError.reason)
        log.info("message failed", extra={"message_id": message.id, "reason": last.reason})
        error = replace(
            last,
            retryable=False,
            message=f"gave up after {message.attempts} attempts: {last.message}"
            " (no echo of the last one came)",
        )
        return await self.record_failure(message, error)

    async def record_failure(self, message: Message, error: DeliveryError) -> Message:
        """FAILED with ``error``, without an attempt (nothing reached the channel)."""
        # Counted with the sends that failed (code 0: no answer of the channel's), so that
        # a failure rate counts every message that ends FAILED, once.
        m.SENDS.labels(message.channel, "failed", str(error.channel_code or 0)).inc()
        message.status = MessageStatus.FAILED
        message.error = error
        message.next_attempt_at = None
        return await self._record(message, None)

    async def _hold(self, message: Message, until: datetime) -> Message:
        """Back to the queue until ``until``: no attempt, no status change, no event."""
        message.next_attempt_at = until
        job = _Job(_OUTCOMES, _Outcome(message, None, event=False))
        return cast(Message, await self._submit(job))

    async def _record(self, message: Message, attempt: DeliveryAttempt | None) -> Message:
        job = _Job(_OUTCOMES, _Outcome(message, attempt, event=True))
        if attempt is None:
            return cast(Message, await self._submit(job))
        # The channel has answered: an answer left unrecorded would have the message sent
        # again once its lease lapsed. A store that blinks is given part of the lease.
        give_up = time.monotonic() + self.policy.lease_s / 3
        delay = 0.1
        while True:
            try:
                return cast(Message, await self._submit(job))
            except ShuttingDown:
                raise
            except Unavailable:
                if time.monotonic() + delay > give_up:
                    raise
                log.warning(
                    "send outcome not recorded yet, retrying",
                    extra={"message_id": message.id},
                    exc_info=True,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _submit(self, job: _Job) -> Any:
        if not self._started:
            self._started = True
            await self._commits.start()
        return await self._commits.submit(job)

    async def _commit(self, jobs: Sequence[_Job]) -> list[Any]:
        try:
            return await self._commit_once(jobs)
        except AlreadyExists:
            # An echo of a message being recorded, folded in by a webhook whose commit
            # landed while the outcome statement ran: invisible to that statement's
            # snapshot (so not removed) and then in the way of its external id. A new
            # transaction sees it and folds it. Failing instead would leave the send
            # unrecorded, to be sent again once its lease lapsed.
            metrics.group_commit_failures.labels("send-commits").inc()
            log.info("outcome batch met a concurrent commit; trying it again")
            return await self._commit_once(jobs)

    async def _commit_once(self, jobs: Sequence[_Job]) -> list[Any]:
        results: list[Any] = [None] * len(jobs)
        events: list[Event] = []
        wake = False
        shares: list[list[int]] = [[] for _ in range(len(self._shares) + 1)]
        for i, job in enumerate(jobs):
            shares[job.share].append(i)
        written_by_share: list[Written[Any] | None] = [None] * len(shares)
        async with self._store.transaction(pipelined=True) as tx:
            # The outcomes go out first (a message they settle no longer holds up one
            # enqueued in this batch), unanswered: the next share's first statement brings
            # their answer back in its own round trip.
            outcomes = [cast(_Outcome, jobs[i].payload) for i in shares[_OUTCOMES]]
            recorded = None
            if outcomes:
                recorded = await tx.record_outbound_deferred(
                    [(o.message, o.attempt) for o in outcomes], lease_until=None
                )
            for share, write in enumerate(self._shares, start=1):
                if shares[share]:
                    written_by_share[share] = await write(
                        tx, [jobs[i].payload for i in shares[share]]
                    )
            if recorded is not None:
                written_by_share[_OUTCOMES] = self._outcomes_written(outcomes, *await recorded())
            for mine, written in zip(shares, written_by_share, strict=True):
                if written is None:
                    continue
                for i, result in zip(mine, written.results, strict=True):
                    results[i] = result
                events += written.events
                wake = wake or written.wake
            # Sent unanswered: it travels with the COMMIT.
            handed = await self.outbox.add_deferred(tx, events)
        self.outbox.committed(await handed())
        if wake:
            self.wake()
        return results

    def _outcomes_written(
        self, outcomes: Sequence[_Outcome], stored: list[Message], waiting: bool
    ) -> Written[Message]:
        now = self.clock.now()
        events = []
        for outcome, message in zip(outcomes, stored, strict=True):
            if not outcome.event or message is not outcome.message:
                # Or the store kept another attempt's outcome (this one's lease had lapsed):
                # its update went out with that outcome.
                continue
            confirmed = message.confirmed_at is not None and message.status is MessageStatus.SENT
            if not confirmed:
                events.append(delivery_update(message, now))
                continue
            # An echo that came first, folded in here: as when it comes after, the SENT
            # update shows the send alone and the confirmation follows as its own update,
            # so that a consumer sees one confirmation whichever way the race went.
            events.append(delivery_update(replace(message, confirmed_at=None), now))
            events.append(delivery_update(message, now, confirmed=True))
        return Written(stored, events, wake=waiting)
