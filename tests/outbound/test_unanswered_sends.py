"""A send that heard no answer may have been delivered: it is not sent again when its echo
says it was.

The sandbox stands in for a Meta that is slow to answer: with ``latency_ms`` above the
gateway's ``INSTAGRAM_API_TIMEOUT_SECONDS`` the gateway stops waiting while the sandbox
goes on, delivers the message and sends its echo, as Meta does when an answer is lost.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from switchboard.v1 import common_pb2, messaging_pb2

from gateway.domain.events import EventKind
from gateway.domain.ids import new_id
from gateway.domain.models import Direction, Message, MessageStatus
from gateway.domain.outbound import ContentKind, OutboundMessage, to_json
from gateway.store import open_store
from tests.helpers import bearer
from tests.outbound.conftest import Out
from tests.outbound.test_echo import subscribe
from tests.outbound.test_send_order import statuses

# Meta answers after 1.2 s; the gateway waits 0.4 s for it.
SLOW_MS = 1200
TIMEOUT_S = "0.4"


@pytest.fixture(autouse=True)
async def _subscribed(out: Out) -> None:
    """The account sends its echoes to the gateway, as a connected one does."""
    await subscribe(out)


@pytest.fixture
def out_extra() -> dict[str, str]:
    return {
        "INSTAGRAM_API_TIMEOUT_SECONDS": TIMEOUT_S,
        # Longer than Meta takes to deliver and echo here.
        "SWITCHBOARD_SEND_UNANSWERED_WAIT_SECONDS": "3",
    }


async def _accepted_mids(out: Out, count: int, timeout_s: float = 10.0) -> list[str]:
    """The message ids the sandbox gave the account's accepted sends, once ``count`` are."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        mids = [
            str(r["response"]["message_id"])
            for r in await out.control.sent(out.ig_id)
            if r.get("status") == 200 and "message_id" in (r.get("response") or {})
        ]
        if len(mids) >= count or asyncio.get_running_loop().time() > deadline:
            return mids
        await asyncio.sleep(0.05)


async def adopted(out: Out, message_id: str) -> common_pb2.Message:
    """The message once Meta's one delivery of it was adopted: SENT with the id of the one
    Send API call Meta carried out, confirmed by its echo, which was not announced as a
    message another app sent."""
    mids = await _accepted_mids(out, 1)
    assert len(mids) == 1
    # A retry that sent again would now be answered at once.
    await out.control.update_settings(latency_ms=0)
    sent = await out.wait_status(message_id, "MESSAGE_STATUS_SENT", timeout_s=15)
    assert sent.external_id == mids[0]
    assert sent.HasField("confirmed_at")
    assert len(await out.bodies()) == 1
    assert await out.events(EventKind.MESSAGE_ECHOED, 1, timeout_s=0.5) == []
    return sent


async def _history_texts(out: Out) -> list[tuple[str, str]]:
    """(direction, text) of every message of the conversation, as ListMessages gives them."""
    page = await out.stub.ListMessages(
        messaging_pb2.ListMessagesRequest(conversation_id=out.conversation.id, page_size=50),
        metadata=bearer(out.gateway.token),
    )
    return [(common_pb2.Direction.Name(m.direction), m.text) for m in page.messages]


async def test_a_send_that_timed_out_but_was_delivered_is_not_sent_again(out: Out) -> None:
    outbound = out.gateway.gateway.outbound
    assert outbound is not None
    assert outbound.deliverer.policy.unanswered_wait_s == 3
    await out.control.update_settings(latency_ms=SLOW_MS)
    reply = await out.send(text="Your order shipped", idempotency_key="unanswered-1")
    assert reply.message.status == common_pb2.MESSAGE_STATUS_RETRYING
    assert reply.message.error.maybe_delivered
    assert reply.message.error.reason == "CHANNEL_TRANSIENT"
    # Meta delivers it after all, and echoes it.
    sent = await adopted(out, reply.message.id)
    assert [a.number for a in sent.attempts] == [1]
    assert sent.attempts[0].error.maybe_delivered
    assert not sent.HasField("error")

    updates = await out.events(EventKind.DELIVERY_UPDATE, 4)
    mine = [e.payload for e in updates if e.payload["message_id"] == sent.id]
    assert [(p["status"], "confirmed_at" in p) for p in mine] == [
        ("MESSAGE_STATUS_QUEUED", False),
        ("MESSAGE_STATUS_RETRYING", False),
        ("MESSAGE_STATUS_SENT", False),
        ("MESSAGE_STATUS_SENT", True),
    ]
    assert mine[1]["error"]["maybe_delivered"] is True
    # Its echo was ours, not kept apart either.
    assert await _history_texts(out) == [
        ("DIRECTION_OUTBOUND", "Your order shipped"),
        ("DIRECTION_INBOUND", "Hi"),
    ]


async def test_a_send_that_timed_out_and_was_not_delivered_is_sent_again(out: Out) -> None:
    await out.control.update_settings(latency_ms=SLOW_MS)
    await out.control.inject_error(2, account=out.ig_id, message="Service temporarily unavailable")
    reply = await out.send(text="Still there?")
    assert reply.message.error.maybe_delivered
    await out.control.update_settings(latency_ms=0)
    # Meta failed it (code 2) once it got to it: no echo comes, so after the wait for one
    # the retry sends it.
    sent = await out.wait_status(reply.message.id, "MESSAGE_STATUS_SENT", timeout_s=15)
    assert [a.number for a in sent.attempts] == [1, 2]
    assert len(await _accepted_mids(out, 1)) == 1
    assert [b["message"]["text"] for b in await out.bodies()] == ["Still there?"] * 2
    assert await _confirmed(out, sent.id)


async def test_a_last_attempt_that_timed_out_fails_once_no_echo_came(out: Out) -> None:
    await out.control.update_settings(latency_ms=SLOW_MS)
    await out.control.inject_error(1, account=out.ig_id, always=True, message="Unknown error")
    reply = await out.send(text="Are you there?")
    failed = await out.wait_status(reply.message.id, "MESSAGE_STATUS_FAILED", timeout_s=30)
    # SWITCHBOARD_SEND_MAX_ATTEMPTS in the tests; the last one's wait for an echo was
    # not another attempt.
    assert len(failed.attempts) == 3
    assert len(await out.bodies()) == 3
    assert all(a.error.maybe_delivered for a in failed.attempts)
    assert "gave up after 3 attempts" in failed.error.message
    assert "no echo" in failed.error.message
    assert not failed.error.retryable
    assert await statuses(out, failed.id, 5) == [
        "MESSAGE_STATUS_QUEUED",
        *["MESSAGE_STATUS_RETRYING"] * 3,
        "MESSAGE_STATUS_FAILED",
    ]


async def _confirmed(out: Out, message_id: str) -> bool:
    for _ in range(100):
        if (await out.get(message_id)).HasField("confirmed_at"):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_first_attempt_cut_off_by_a_stop_is_not_sent_again_when_delivered(
    out: Out,
) -> None:
    """A process stops in the middle of a first attempt: its message is left QUEUED and
    leased, and Meta delivers it. The worker that takes it over once the lease lapsed
    finds the echo and does not send it again."""
    gateway = out.gateway.gateway
    assert gateway.outbound is not None
    now = datetime.now(UTC)
    content = OutboundMessage(ContentKind.TEXT, recipient_id=out.customer, text="Back in stock")
    message = Message(
        id=new_id("msg"),
        tenant_id=out.tenant,
        connection_id=out.connection.id,
        conversation_id=out.conversation.id,
        channel=out.connection.channel,
        direction=Direction.OUTBOUND,
        status=MessageStatus.QUEUED,
        sender_id=out.connection.account.external_id,
        text=content.text,
        content={"outbound": to_json(content)},
        next_attempt_at=now,
        created_at=now,
    )
    await out.control.update_settings(latency_ms=SLOW_MS)
    async with open_store(gateway.config.database_url.reveal()) as store:
        async with store.transaction() as tx:
            await tx.enqueue_outbound(message, now + timedelta(seconds=3))
        stopping = out.other_deliverer(store)
        try:
            attempt = asyncio.create_task(stopping.attempt(message, out.connection))
            await asyncio.sleep(0.3)  # the request is out
            attempt.cancel()
            with pytest.raises(asyncio.CancelledError):
                await attempt
        finally:
            await stopping.aclose()
    await adopted(out, message.id)
