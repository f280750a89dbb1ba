"""Outbound: validate -> idempotency -> persist (+ outbox) -> rate limit -> send -> status.

``SendMessage`` lands in :meth:`OutboundService.send`. Everything that can refuse the
request (the connection and its status, the recipient, the content, the customer's
messaging window, ``fail_fast`` rate limits) is checked before anything is stored. The
message is then stored QUEUED with its ``DeliveryUpdate`` event, leased to this process,
and its first attempt starts at once; the call waits up to ``wait_s`` for it and answers
the status reached (the attempt goes on in the background past that). Retries are the
worker's (:mod:`gateway.services.outbound_worker`).

Send order: when the conversation already has a pending message (QUEUED or RETRYING, a
first attempt under way included), a new one that keeps order (all but sender actions) is
stored QUEUED behind it, without a lease and without an attempt now; the call answers
QUEUED at once and the worker sends it when its turn comes. The conversation lookup the
batch runs anyway tells whether one is pending (no extra statement); within a batch, the
calls' order decides. ``fail_fast`` still refuses when the account is rate limited, but
only looks at the bucket: the worker takes the token when it sends.

An ``idempotency_key`` already used by the tenant returns the first message as it is now
and sends nothing. The unique (tenant, key) index decides, not a read before the write: the
batch inserts its new messages and looks up only the keys that conflicted, whether an
earlier call holds them or a racing one (another replica's, or another call of the batch)
won. A call refused after its content was checked (the connection cannot send, the window
closed, ``fail_fast`` rate limits) is also answered with the first message when its key
names one: a repeat gets the first answer, not a refusal it did not get then.

Calls that arrive together share one transaction (a group commit): their lookups are a
few statements for the whole batch, and each call is answered from its own share of it,
refusals included. PERFORMANCE.md: per-call transactions are what caps a path here. That
transaction is the Deliverer's, which records the outcomes of the attempts that ended
meanwhile in it too (:meth:`Deliverer.share_commits`): one commit, one outbox insert.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from gateway.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutsideMessagingWindow,
    ResourceExhausted,
    StoreUnavailable,
    SwitchboardError,
)
from gateway.domain.ids import new_id
from gateway.domain.models import (
    Connection,
    ConnectionStatus,
    Conversation,
    Direction,
    Message,
    MessageStatus,
)
from gateway.domain.outbound import (
    HUMAN_AGENT,
    DeliveryAttempt,
    OutboundChannel,
    OutboundMessage,
    SendRequest,
    attachments_of,
    to_json,
    validate,
)
from gateway.domain.store import Store, Tx
from gateway.observability import outbound_metrics as m
from gateway.services.delivery_events import delivery_update
from gateway.services.ingest_batcher import Closed
from gateway.services.outbound_delivery import (
    Deliverer,
    RateLimitedNow,
    Written,
    account_key,
)
from gateway.tasks import finish_or_cancel

log = logging.getLogger(__name__)

OWN_ID_PREFIX = "msg_"
# A key is stored under the unique (tenant, key) index, whose entries PostgreSQL bounds
# (about 2.7 kB): a longer one would fail the insert, and with it the transaction every
# call and outcome batched with it shares.
MAX_IDEMPOTENCY_KEY_BYTES = 256


@dataclass(frozen=True, slots=True)
class SendOutcome:
    message: Message
    duplicate: bool = False


@dataclass(slots=True)
class _Checked:
    connection: Connection
    conversation: Conversation
    sender: OutboundChannel
    content: OutboundMessage


@dataclass(frozen=True, slots=True)
class _Enqueue:
    request: SendRequest
    now: datetime


@dataclass(frozen=True, slots=True)
class _Enqueued:
    """Stored QUEUED and leased to this process: its first attempt is ours to make."""

    message: Message
    connection: Connection
    content: OutboundMessage
    # Queued behind an earlier message of its conversation: the worker sends it, not us.
    behind: bool = False


# A call's share of a group commit: its message, the first one's, or why it was refused.
_Result = _Enqueued | SendOutcome | SwitchboardError


@dataclass(slots=True)
class _Found:
    """What a batch's lookups found, for its calls to pick from."""

    conversations: dict[str, Conversation]
    connections: dict[str, Connection]
    by_recipient: dict[tuple[str, str], Conversation]
    # Conversation id -> created_at of its latest pending message that keeps order.
    pending_at: dict[str, datetime] = field(default_factory=dict)


def _ts(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


class OutboundService:
    def __init__(self, store: Store, deliverer: Deliverer, *, wait_s: float = 2.0) -> None:
        self._store = store
        self.deliverer = deliverer
        self._wait_s = wait_s
        self._inflight: set[asyncio.Task[Message]] = set()
        self._enqueue = deliverer.share_commits(self._write_enqueues)
        self._closed = False

    @property
    def clock(self) -> Callable[[], datetime]:
        return self.deliverer.clock.now

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Lets first attempts under way finish (a cut-off attempt is retried by a worker
        once its lease lapses)."""
        self._closed = True
        await finish_or_cancel(list(self._inflight), grace_s)
        await self.deliverer.aclose()

    async def attempts(self, message_id: str) -> list[DeliveryAttempt]:
        async with self._store.transaction() as tx:
            return await tx.list_attempts(message_id)

    async def send(self, request: SendRequest) -> SendOutcome:
        if self._closed:
            raise Closed("shutting down")
        result = await self._enqueue(_Enqueue(request, self.clock()))
        if isinstance(result, SwitchboardError):
            raise result
        if isinstance(result, SendOutcome):
            return result
        stored = result.message
        if result.behind:
            return SendOutcome(stored)
        task = asyncio.create_task(
            self.deliverer.attempt(
                stored,
                result.connection,
                admitted=request.fail_fast,
                fail_fast=request.fail_fast,
                content=result.content,
            ),
            name=f"send-{stored.id}",
        )
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        # asyncio.wait neither cancels the attempt when the caller goes away nor wraps it.
        done, _ = await asyncio.wait((task,), timeout=self._wait_s)
        if not done:
            return SendOutcome(stored)
        try:
            sent = task.result()
        except RateLimitedNow as exc:
            raise ResourceExhausted(
                "the channel throttles this account",
                retry_at=exc.retry_at,
                reason="RATE_LIMITED",
                metadata={"message_id": stored.id},
            ) from None
        if sent.error is not None and sent.error.reason == OutsideMessagingWindow.reason:
            raise OutsideMessagingWindow(
                f"the channel refused: {sent.error.message}",
                metadata={"message_id": sent.id},
            )
        return SendOutcome(sent)

    async def _write_enqueues(self, tx: Tx, jobs: Sequence[_Enqueue]) -> Written[_Result]:
        """The enqueues of the calls that queued together, in the Deliverer's transaction
        (see :meth:`Deliverer.share_commits`); a call refused is answered with its error,
        without failing the others, in the order a caller sees the reasons.

        A repeat is only known as one once its insert finds the key taken, so it goes
        through the send-order and ``fail_fast`` steps as a new call would: it may leave a
        later call of its conversation in the same batch to the worker, and a ``fail_fast``
        repeat may take a token. Both are rare; a read of every key before every insert
        is not."""
        lease = timedelta(seconds=self.deliverer.policy.lease_s)
        results: list[_Result | None] = []
        queued: list[tuple[int, Message, _Checked]] = []
        # Calls refused after their checks whose key may name a first message.
        keyed_refusals: list[int] = []
        found = await self._lookup(tx, [j.request for j in jobs])
        for job in jobs:
            try:
                checked = await self._check(tx, job.request, found)
            except StoreUnavailable:
                raise
            except SwitchboardError as exc:
                results.append(exc)
                continue
            try:
                _require_sendable(checked.connection)
                _require_window(checked.conversation, checked.content, checked.sender, job.now)
            except SwitchboardError as exc:
                if job.request.idempotency_key:
                    keyed_refusals.append(len(results))
                results.append(exc)
                continue
            queued.append((len(results), _new_message(job.request, checked, job.now), checked))
            results.append(None)
        behind: set[str] = set()
        if queued:
            behind = _queue_in_order([(m, c) for _, m, c in queued], found.pending_at)
            admitted = await self._admit_fail_fast(jobs, queued, behind, results)
            keyed_refusals += [
                i
                for i, _, _ in queued
                if isinstance(results[i], SwitchboardError) and jobs[i].request.idempotency_key
            ]
            queued = admitted
        events = []
        if queued:
            latest = max(j.now for j in jobs)
            stored = await tx.enqueue_outbound_in_order(
                [message for _, message, _ in queued], latest + lease, behind=list(behind)
            )
            for (index, _, checked), (message, inserted) in zip(queued, stored, strict=True):
                if inserted:
                    events.append(delivery_update(message, jobs[index].now))
                    results[index] = _Enqueued(
                        message, checked.connection, checked.content, message.id in behind
                    )
                else:
                    results[index] = SendOutcome(message, duplicate=True)
        if keyed_refusals:
            firsts = await tx.find_messages_by_idempotency_keys(
                [
                    (jobs[i].request.tenant_id, jobs[i].request.idempotency_key)
                    for i in keyed_refusals
                ]
            )
            for i in keyed_refusals:
                request = jobs[i].request
                first = firsts.get((request.tenant_id, request.idempotency_key))
                if first is not None:
                    results[i] = SendOutcome(first, duplicate=True)
        # A message ahead may settle after our lookup but before this commit, when the
        # Deliverer could not see these yet: have the worker look once committed.
        return Written([r for r in results if r is not None], events, wake=bool(behind))

    async def _lookup(self, tx: Tx, requests: Sequence[SendRequest]) -> _Found:
        """Every row the batch's checks read, in one round trip where the store allows
        (the keys are not read: see the module's docstring). A call that names only its
        conversation has its connection read afterwards, once the conversation is known."""
        batch = await tx.find_send_batch(
            [r.conversation_id for r in requests if r.conversation_id],
            [r.connection_id for r in requests if r.connection_id],
            [
                (r.connection_id, r.recipient_id)
                for r in requests
                if not r.conversation_id and r.connection_id and r.recipient_id
            ],
        )
        conversations = {k: t.conversation for k, t in batch.targets.items()}
        connections = batch.connections
        implied = [
            c.connection_id
            for r in requests
            if not r.connection_id
            and (c := conversations.get(r.conversation_id))
            and c.tenant_id == r.tenant_id
            and c.connection_id not in connections
        ]
        if implied:
            connections = {**connections, **await tx.get_connections(implied)}
        by_recipient = {k: t.conversation for k, t in batch.recipients.items()}
        pending_at = {
            t.conversation.id: t.pending_at
            for t in (*batch.targets.values(), *batch.recipients.values())
            if t.pending_at is not None
        }
        return _Found(conversations, connections, by_recipient, pending_at)

    async def _check(self, tx: Tx, request: SendRequest, found: _Found) -> _Checked:
        size = len(request.idempotency_key.encode("utf-8"))
        if size > MAX_IDEMPOTENCY_KEY_BYTES:
            raise InvalidArgument(
                "idempotency_key",
                f"is {size} bytes of UTF-8; at most {MAX_IDEMPOTENCY_KEY_BYTES} are allowed",
            )
        conn = self._connection(request, found)
        sender = self.deliverer.sender_of(conn.channel)
        if sender is None:
            raise FailedPrecondition(
                f"the {conn.channel} channel cannot send messages", reason="CHANNEL_CANNOT_SEND"
            )
        conversation = self._conversation(request, conn, found)
        reply_to = await self._external_id(
            tx, conn, "reply_to_message_id", request.reply_to_message_id
        )
        reacted = await self._external_id(
            tx, conn, "reaction.message_id", request.reaction_message_id
        )
        content = replace(
            request.message,
            recipient_id=conversation.participant.channel_user_id,
            reply_to_external_id=reply_to,
            reaction_external_id=reacted or request.message.reaction_external_id,
        )
        validate(content, sender.limits)
        return _Checked(conn, conversation, sender, content)

    def _connection(self, request: SendRequest, found: _Found) -> Connection:
        """The connection named, or else the conversation's: a conversation belongs to
        exactly one connection. An unknown or foreign connection is NOT_FOUND; a recipient
        the tenant does not have is INVALID_ARGUMENT naming the recipient's field, the
        same answer whether it exists elsewhere or not (see ``_conversation``)."""
        connection_id = request.connection_id
        if not request.conversation_id and not request.recipient_id:
            raise InvalidArgument("recipient", "set conversation_id or recipient_id")
        if not connection_id and request.recipient_id:
            # A channel user id means something only within one connection's account.
            raise InvalidArgument(
                "connection_id",
                "must not be empty when recipient_id is set (or set conversation_id instead)",
            )
        if not connection_id:
            conversation = found.conversations.get(request.conversation_id)
            if conversation is None or conversation.tenant_id != request.tenant_id:
                raise InvalidArgument(
                    "conversation_id", "is not a conversation of this tenant's connections"
                )
            connection_id = conversation.connection_id
        conn = found.connections.get(connection_id)
        if conn is None or conn.tenant_id != request.tenant_id:
            raise NotFound(
                f"no connection {connection_id!r} for this tenant",
                metadata={"connection_id": connection_id},
            )
        return conn

    def _conversation(self, request: SendRequest, conn: Connection, found: _Found) -> Conversation:
        if request.conversation_id:
            conversation = found.conversations.get(request.conversation_id)
            if conversation is None or conversation.connection_id != conn.id:
                raise InvalidArgument(
                    "conversation_id", f"is not a conversation of connection {conn.id}"
                )
            return conversation
        conversation = found.by_recipient.get((conn.id, request.recipient_id))
        if conversation is None:
            raise InvalidArgument(
                "recipient_id", "is not a customer who wrote to the caller's connection"
            )
        return conversation

    async def _external_id(self, tx: Tx, conn: Connection, field: str, value: str) -> str:
        """The channel's id of a message named by our id or by the channel's id."""
        if not value or not value.startswith(OWN_ID_PREFIX):
            return value
        found = await tx.get_message(value)
        if found is None or found.connection_id != conn.id:
            raise InvalidArgument(field, "is not a message of this connection")
        if not found.external_id:
            raise InvalidArgument(field, "names a message the channel has not accepted yet")
        return found.external_id

    async def _admit_fail_fast(
        self,
        jobs: Sequence[_Enqueue],
        queued: list[tuple[int, Message, _Checked]],
        behind: set[str],
        results: list[_Result | None],
    ) -> list[tuple[int, Message, _Checked]]:
        """The queued calls the rate limit lets through; a fail_fast call it refuses is
        answered with the refusal (in ``results``) and not stored. A call attempted now
        takes its token here (its first attempt then takes none). One that queues behind
        another message of its conversation only looks: the worker takes its token when
        its turn comes, so it must not spend one now as well."""
        admitted = []
        for index, message, checked in queued:
            if jobs[index].request.fail_fast:
                try:
                    await self._admit_now(checked, take=message.id not in behind)
                except StoreUnavailable:
                    raise
                except SwitchboardError as exc:
                    # Refused alone, as in _write_enqueues. A call queued behind this one in
                    # the batch is then sent by the worker.
                    results[index] = exc
                    continue
            admitted.append((index, message, checked))
        return admitted

    async def _admit_now(self, checked: _Checked, *, take: bool = True) -> None:
        category = checked.content.category
        admission = await self.deliverer.limiter.acquire(
            account_key(checked.connection), category, self.clock(), take=take
        )
        if admission.ok:
            return
        m.RATE_LIMIT_WAITS.labels(checked.connection.channel, category.value, "refused").inc()
        retry_at = admission.paused_until or (self.clock() + timedelta(seconds=admission.wait_s))
        raise ResourceExhausted(
            "the account's send rate is exhausted", retry_at=retry_at, reason="RATE_LIMITED"
        )


def _queue_in_order(
    queued: Sequence[tuple[Message, _Checked]], pending_at: dict[str, datetime]
) -> set[str]:
    """The ids of the messages that must wait for an earlier one of their conversation:
    one pending in the store, or one earlier in this batch. Each such message is dated
    after the one it waits for, so that (created_at, id) orders them even when the
    clocks of two calls (or two replicas) tie or disagree."""
    behind: set[str] = set()
    last = dict(pending_at)
    for message, checked in queued:
        if not checked.content.keeps_order:
            continue
        conversation_id = message.conversation_id
        before = last.get(conversation_id)
        if before is not None:
            behind.add(message.id)
            if message.created_at is None or message.created_at <= before:
                message.created_at = before + _TICK
        if message.created_at is not None:
            last[conversation_id] = message.created_at
    return behind


# The storage's time resolution (PostgreSQL and our SQLite encoding: microseconds).
_TICK = timedelta(microseconds=1)


def _require_sendable(conn: Connection) -> None:
    if conn.status is ConnectionStatus.CONNECTED:
        return
    reason = f"CONNECTION_{conn.status.value}"
    detail = f": {conn.last_error}" if conn.last_error else ""
    raise FailedPrecondition(
        f"the connection is {conn.status.value}{detail}",
        reason=reason,
        metadata={"connection_id": conn.id, "status": conn.status.value},
    )


def _require_window(
    conversation: Conversation, content: OutboundMessage, sender: OutboundChannel, now: datetime
) -> None:
    last = conversation.last_inbound_at
    if last is None:
        raise OutsideMessagingWindow("the customer has not written to this account yet")
    closes = last + sender.limits.window
    if now <= closes:
        return
    untagged = ""
    if content.tag == HUMAN_AGENT:
        if content.kind in sender.limits.tagged_kinds:
            tagged_closes = last + sender.limits.human_agent_window
            if now <= tagged_closes:
                return
            closes = tagged_closes
        else:
            untagged = f" (the {HUMAN_AGENT} tag goes with messages, not a {content.kind.value})"
    raise OutsideMessagingWindow(
        f"the customer's messaging window closed at {_ts(closes)}{untagged}",
        metadata={"window_closed_at": _ts(closes), "conversation_id": conversation.id},
    )


def _new_message(request: SendRequest, checked: _Checked, now: datetime) -> Message:
    content = checked.content
    data: dict[str, object] = {"outbound": to_json(content)}
    if content.reply_to_external_id:
        data["reply_to"] = {"mid": content.reply_to_external_id}
        if request.reply_to_message_id.startswith(OWN_ID_PREFIX):
            data["reply_to"] = {
                "mid": content.reply_to_external_id,
                "message_id": request.reply_to_message_id,
            }
    return Message(
        id=new_id("msg"),
        tenant_id=request.tenant_id,
        connection_id=checked.connection.id,
        conversation_id=checked.conversation.id,
        channel=checked.connection.channel,
        direction=Direction.OUTBOUND,
        status=MessageStatus.QUEUED,
        sender_id=checked.connection.account.external_id,
        text=content.text,
        attachments=attachments_of(content),
        content=data,
        idempotency_key=request.idempotency_key,
        next_attempt_at=now,
        created_at=now,
    )
