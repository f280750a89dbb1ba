"""Outbound: validate -> idempotency -> persist (+ outbox) -> rate limit -> send -> status.

``SendMessage`` lands in :meth:`OutboundService.send`. Everything that can refuse the
request (the connection and its status, the recipient, the content, the customer's
messaging window, ``fail_fast`` rate limits) is checked before anything is stored. The
message is then stored QUEUED with its ``DeliveryUpdate`` event, leased to this process,
and its first attempt starts at once; the call waits up to ``wait_s`` for it and answers
the status reached (the attempt goes on in the background past that). Retries are the
worker's (:mod:`gateway.services.outbound_worker`).

An ``idempotency_key`` already used by the tenant returns the first message as it is now
and sends nothing. Two identical calls that race both pass the lookup, but only one
insert wins the unique (tenant, key) index; the other answers the winner's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from gateway.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutsideMessagingWindow,
    ResourceExhausted,
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
from gateway.services.outbound_delivery import Deliverer, RateLimitedNow, account_key

log = logging.getLogger(__name__)

OWN_ID_PREFIX = "msg_"


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


def _ts(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


class OutboundService:
    def __init__(self, store: Store, deliverer: Deliverer, *, wait_s: float = 2.0) -> None:
        self._store = store
        self.deliverer = deliverer
        self._wait_s = wait_s
        self._inflight: set[asyncio.Task[Message]] = set()

    @property
    def clock(self) -> Callable[[], datetime]:
        return self.deliverer.clock.now

    def set_on_commit(self, callback: Callable[[], None] | None) -> None:
        self.deliverer.on_commit = callback

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Lets first attempts under way finish (a cut-off attempt is retried by a worker
        once its lease lapses)."""
        if not self._inflight:
            return
        _, late = await asyncio.wait(list(self._inflight), timeout=grace_s)
        for task in late:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def attempts(self, message_id: str) -> list[DeliveryAttempt]:
        async with self._store.transaction() as tx:
            return await tx.list_attempts(message_id)

    async def send(self, request: SendRequest) -> SendOutcome:
        now = self.clock()
        async with self._store.transaction() as tx:
            checked = await self._check(tx, request)
            if request.idempotency_key:
                existing = await tx.find_message_by_idempotency_key(
                    request.tenant_id, request.idempotency_key
                )
                if existing is not None:
                    return SendOutcome(existing, duplicate=True)
            _require_sendable(checked.connection)
            _require_window(checked.conversation, checked.content, checked.sender, now)
            if request.fail_fast:
                await self._admit_now(checked)
            message = _new_message(request, checked, now)
            stored, inserted = await tx.enqueue_outbound(
                message, now + timedelta(seconds=self.deliverer.policy.lease_s)
            )
            if inserted:
                await tx.add_events([delivery_update(stored, now)])
        if not inserted:
            return SendOutcome(stored, duplicate=True)
        if self.deliverer.on_commit is not None:
            self.deliverer.on_commit()
        task = asyncio.create_task(
            self.deliverer.attempt(
                stored, checked.connection, admitted=request.fail_fast, fail_fast=request.fail_fast
            ),
            name=f"send-{stored.id}",
        )
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        try:
            result = await asyncio.wait_for(asyncio.shield(task), self._wait_s)
        except TimeoutError:
            return SendOutcome(stored)
        except RateLimitedNow as exc:
            raise ResourceExhausted(
                "the channel throttles this account",
                retry_at=exc.retry_at,
                reason="RATE_LIMITED",
                metadata={"message_id": stored.id},
            ) from None
        if result.error is not None and result.error.reason == OutsideMessagingWindow.reason:
            raise OutsideMessagingWindow(
                f"the channel refused: {result.error.message}",
                metadata={"message_id": result.id},
            )
        return SendOutcome(result)

    async def _check(self, tx: Tx, request: SendRequest) -> _Checked:
        conn = await self._connection(tx, request)
        sender = self.deliverer.sender_of(conn.channel)
        if sender is None:
            raise FailedPrecondition(
                f"the {conn.channel} channel cannot send messages", reason="CHANNEL_CANNOT_SEND"
            )
        conversation = await self._conversation(tx, request, conn)
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

    async def _connection(self, tx: Tx, request: SendRequest) -> Connection:
        connection_id = request.connection_id
        if not connection_id and request.conversation_id:
            found = await tx.get_conversation(request.conversation_id)
            if found is not None and found.tenant_id == request.tenant_id:
                connection_id = found.connection_id
        if not connection_id:
            raise InvalidArgument("connection_id", "must not be empty")
        conn = await tx.get_connection(connection_id)
        if conn is None or conn.tenant_id != request.tenant_id:
            raise NotFound(
                f"no connection {connection_id!r} for this tenant",
                metadata={"connection_id": connection_id},
            )
        return conn

    async def _conversation(self, tx: Tx, request: SendRequest, conn: Connection) -> Conversation:
        if request.conversation_id:
            conversation = await tx.get_conversation(request.conversation_id)
            if conversation is None or conversation.connection_id != conn.id:
                raise InvalidArgument(
                    "conversation_id", "is not a conversation of the caller's connection"
                )
            return conversation
        if not request.recipient_id:
            raise InvalidArgument("recipient", "set conversation_id or recipient_id")
        found = await tx.find_conversation_for_recipient(conn.id, request.recipient_id)
        if found is None:
            raise InvalidArgument(
                "recipient_id", "is not a customer who wrote to the caller's connection"
            )
        return found

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

    async def _admit_now(self, checked: _Checked) -> None:
        category = checked.content.category
        admission = await self.deliverer.limiter.acquire(
            account_key(checked.connection), category, self.clock()
        )
        if admission.ok:
            return
        m.RATE_LIMIT_WAITS.labels(checked.connection.channel, category.value, "refused").inc()
        retry_at = admission.paused_until or (self.clock() + timedelta(seconds=admission.wait_s))
        raise ResourceExhausted(
            "the account's send rate is exhausted", retry_at=retry_at, reason="RATE_LIMITED"
        )


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
    if content.tag == HUMAN_AGENT:
        tagged_closes = last + sender.limits.human_agent_window
        if now <= tagged_closes:
            return
        closes = tagged_closes
    raise OutsideMessagingWindow(
        f"the customer's messaging window closed at {_ts(closes)}",
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
