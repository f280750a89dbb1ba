"""Send order within a conversation: a message is not attempted while an earlier one of its
conversation is still QUEUED or RETRYING; FAILED ones no longer hold it up; conversations
do not wait for each other; replicas claiming together keep the order too."""

from __future__ import annotations

import asyncio
from typing import Any

from switchboard.v1 import common_pb2

from gateway.domain.events import EventKind
from gateway.services.outbound_worker import OutboundWorker
from gateway.store import open_store
from tests.outbound.conftest import Out, customer_writes

QUEUED = common_pb2.MESSAGE_STATUS_QUEUED
RETRYING = common_pb2.MESSAGE_STATUS_RETRYING
SENT = common_pb2.MESSAGE_STATUS_SENT


def label(body: Any) -> str:
    if not isinstance(body, dict):
        return "?"
    if "sender_action" in body:
        return str(body["sender_action"])
    return str(body.get("message", {}).get("text", "?"))


async def accepted(out: Out, recipient: str | None = None) -> list[str]:
    """What the sandbox accepted for the account (to ``recipient``), in arrival order."""
    return [
        label(r["body"])
        for r in await out.control.sent(out.ig_id)
        if r["status"] == 200 and (recipient is None or r["body"]["recipient"]["id"] == recipient)
    ]


async def statuses(out: Out, message_id: str, count: int) -> list[str]:
    updates = await out.events(EventKind.DELIVERY_UPDATE, count)
    return [e.payload["status"] for e in updates if e.payload["message_id"] == message_id]


async def test_a_message_behind_a_retrying_one_waits_for_it(out: Out) -> None:
    await out.control.inject_error(2, account=out.ig_id, message="Service temporarily unavailable")
    first = await out.send(text="A")
    assert first.message.status == RETRYING
    second = await out.send(text="B")
    # Queued behind A: answered at once, no attempt of its own yet.
    assert second.message.status == QUEUED
    assert not second.message.attempts
    await out.wait_status(first.message.id, "MESSAGE_STATUS_SENT")
    sent = await out.wait_status(second.message.id, "MESSAGE_STATUS_SENT")
    assert [a.number for a in sent.attempts] == [1]
    assert [label(b) for b in await out.bodies()] == ["A", "A", "B"]
    assert await accepted(out) == ["A", "B"]
    assert await statuses(out, first.message.id, 5) == [
        "MESSAGE_STATUS_QUEUED",
        "MESSAGE_STATUS_RETRYING",
        "MESSAGE_STATUS_SENT",
    ]
    assert await statuses(out, second.message.id, 5) == [
        "MESSAGE_STATUS_QUEUED",
        "MESSAGE_STATUS_SENT",
    ]
    # B's SENT is published after A's: a subscriber reads the outcomes in send order too.
    updates = await out.events(EventKind.DELIVERY_UPDATE, 5)
    sent_order = [
        e.payload["message_id"] for e in updates if e.payload["status"] == "MESSAGE_STATUS_SENT"
    ]
    assert sent_order == [first.message.id, second.message.id]


async def test_order_is_kept_after_an_account_pause(out: Out) -> None:
    await out.throttle()
    replies = [await out.send(text=t) for t in ("one", "two", "three")]
    assert [r.message.status for r in replies] == [QUEUED] * 3
    assert len(await out.bodies()) == 1  # only the throttled call reached Meta
    out.advance(130)
    for reply in replies:
        await out.wait_status(reply.message.id, "MESSAGE_STATUS_SENT")
    assert await accepted(out) == ["one", "two", "three"]


async def test_a_failed_message_no_longer_holds_up_the_next(out: Out) -> None:
    # Every attempt A gets fails (SWITCHBOARD_SEND_MAX_ATTEMPTS is 3 in the tests).
    await out.control.inject_error(1, account=out.ig_id, count=3, message="Unknown error")
    first = await out.send(text="doomed")
    assert first.message.status == RETRYING
    second = await out.send(text="after")
    assert second.message.status == QUEUED
    failed = await out.wait_status(first.message.id, "MESSAGE_STATUS_FAILED")
    assert len(failed.attempts) == 3
    await out.wait_status(second.message.id, "MESSAGE_STATUS_SENT")
    assert [label(b) for b in await out.bodies()] == ["doomed"] * 3 + ["after"]
    assert await statuses(out, first.message.id, 6) == [
        "MESSAGE_STATUS_QUEUED",
        "MESSAGE_STATUS_RETRYING",
        "MESSAGE_STATUS_RETRYING",
        "MESSAGE_STATUS_FAILED",
    ]
    assert await statuses(out, second.message.id, 6) == [
        "MESSAGE_STATUS_QUEUED",
        "MESSAGE_STATUS_SENT",
    ]
    # A message sent after the failure goes out at once.
    third = await out.send(text="later")
    assert third.message.status == SENT


async def test_other_conversations_do_not_wait(out: Out) -> None:
    other, conversation, _ = await customer_writes(out.gateway, out.control, out.connection)
    await out.control.inject_error(2, account=out.ig_id, message="Service temporarily unavailable")
    stuck = await out.send(text="A")
    assert stuck.message.status == RETRYING
    elsewhere = await out.send(text="to the other customer", recipient_id=other)
    assert elsewhere.message.status == SENT
    by_id = await out.send(text="by conversation id", conversation_id=conversation.id)
    assert by_id.message.status == SENT
    # ... while the first customer's next message still waits for A.
    behind = await out.send(text="B", conversation_id=out.conversation.id)
    assert behind.message.status == QUEUED
    await out.wait_status(behind.message.id, "MESSAGE_STATUS_SENT")
    assert await accepted(out, out.customer) == ["A", "B"]
    assert await accepted(out, other) == ["to the other customer", "by conversation id"]


async def test_concurrent_calls_go_out_in_the_order_they_were_stored(out: Out) -> None:
    await out.control.update_settings(latency_ms=300)
    # Concurrent calls have no order of their own (the gateway may take them in any
    # order, into one group commit or several): what counts is the order the gateway
    # stored them in, created_at then id, which the sends must follow.
    replies = await asyncio.gather(*(out.send(text=f"m{i}") for i in range(6)))
    stored = sorted(replies, key=lambda r: (r.message.created_at.ToDatetime(), r.message.id))
    assert stored[0].message.status == SENT
    assert [r.message.status for r in stored[1:]] == [QUEUED] * 5
    for reply in replies:
        await out.wait_status(reply.message.id, "MESSAGE_STATUS_SENT")
    assert await accepted(out) == [r.message.text for r in stored]


async def test_two_workers_on_one_store_keep_each_conversations_order(out: Out) -> None:
    customers = [out.customer]
    for _ in range(2):
        igsid, _, _ = await customer_writes(out.gateway, out.control, out.connection)
        customers.append(igsid)
    await out.throttle()
    # The account is paused from the first call on: every message is held or queued.
    ids = []
    for i in range(5):
        for c, customer in enumerate(customers):
            reply = await out.send(text=f"c{c}-{i}", recipient_id=customer)
            assert reply.message.status == QUEUED
            ids.append(reply.message.id)
    assert len(await out.bodies()) == 1
    gateway = out.gateway.gateway
    worker = gateway.outbound_worker
    assert worker is not None
    async with open_store(gateway.config.database_url.reveal()) as store:
        second = out.other_deliverer(store)
        other = OutboundWorker(store, second, poll_s=0.01)
        await other.start()
        try:
            out.advance(130)
            worker.notify()
            other.notify()
            for message_id in ids:
                await out.wait_status(message_id, "MESSAGE_STATUS_SENT", timeout_s=20)
        finally:
            await other.aclose()
            await second.aclose()
    for c, customer in enumerate(customers):
        assert await accepted(out, customer) == [f"c{c}-{i}" for i in range(5)]
