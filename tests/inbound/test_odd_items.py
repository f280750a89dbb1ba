"""Items that are odd but real, and echoes of other apps while a send is pending: each is
stored and published once, and never costs the items beside it. On PostgreSQL + Redis and
embedded unless said."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from switchboard.v1 import common_pb2, messaging_pb2

from channels.instagram.parser import parse_delivery
from tests.helpers import bearer
from tests.inbound.conftest import Stack
from tests.inbound.subscriber import Got, Subscriber
from tests.inbound.test_end_to_end import messaging, post, signed


def envelope(stack: Stack, *items: dict[str, Any], entry_time: bool = True) -> bytes:
    entry: dict[str, Any] = {"id": stack.ig_id, "messaging": list(items)}
    if entry_time:
        entry["time"] = int(time.time() * 1000)
    return orjson.dumps({"object": "instagram", "entry": [entry]})


def from_customer(stack: Stack, customer: str, **body: Any) -> dict[str, Any]:
    return {
        "sender": {"id": customer},
        "recipient": {"id": stack.ig_id},
        "timestamp": int(time.time() * 1000),
        **body,
    }


async def collect(sub: Subscriber, within_s: float) -> list[Got]:
    """Every event that arrives within ``within_s`` (acked)."""
    got: list[Got] = []
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        got.extend(await sub._receive(max(0.05, deadline - time.monotonic())))
    return got


# ---- an echo from another app while a send of the same text waits for its retry ----


async def echo_while_a_send_is_pending(stack: Stack, echo_text: str) -> list[Got]:
    """The customer writes; the gateway's reply "Thanks!" stays pending (every Send API call
    fails transiently, so it is RETRYING); a human agent's message ``echo_text`` sent from
    the Instagram app is echoed by Meta with a mid of its own. The events seen meanwhile."""
    first = await stack.control.send_dm(stack.ig_id, "is my order shipped?")
    customer = first["customer"]
    await stack.control.inject_error(2, always=True, account=stack.ig_id, message="transient")
    channel, stub = await messaging(stack)
    async with channel, stack.subscriber() as sub:
        (received,) = await sub.take(1)
        assert received.kind == "message_received"
        reply = await stub.SendMessage(
            messaging_pb2.SendMessageRequest(
                tenant_id="t1",
                connection_id=stack.connection.id,
                recipient_id=customer,
                text="Thanks!",
                idempotency_key="pending-thanks",
            ),
            metadata=bearer(stack.gateway.token),
        )
        assert reply.message.status in (
            common_pb2.MESSAGE_STATUS_QUEUED,
            common_pb2.MESSAGE_STATUS_RETRYING,
        )
        echo = {
            "sender": {"id": stack.ig_id},
            "recipient": {"id": customer},
            "timestamp": int(time.time() * 1000),
            "message": {"mid": "m-from-the-instagram-app", "text": echo_text, "is_echo": True},
        }
        body = envelope(stack, echo)
        assert await post(stack, body, signed(stack, body)) == 200
        events = await collect(sub, 2.0)
        await stack.control.clear_errors()
    return events


async def test_a_human_agents_echo_with_the_text_of_a_pending_send_is_still_announced(
    stack: Stack,
) -> None:
    """A human agent answers "Thanks!" from the Instagram app while the gateway's own reply
    with the same text waits for a retry. Meta echoes the agent's message with a mid of its
    own: a message sent from another app, announced as MessageEchoed. Only an echo that
    comes while our message is being sent may be ours (held back, folded into it once the
    send's outcome is recorded)."""
    events = await echo_while_a_send_is_pending(stack, "Thanks!")
    echoed = [e for e in events if e.kind == "message_echoed"]
    assert [e.payload["message"]["external_id"] for e in echoed] == ["m-from-the-instagram-app"]


async def test_control_a_human_agents_echo_with_another_text_is_announced(stack: Stack) -> None:
    """The same with another text: announced too."""
    events = await echo_while_a_send_is_pending(stack, "Thanks again!")
    echoed = [e for e in events if e.kind == "message_echoed"]
    assert [e.payload["message"]["external_id"] for e in echoed] == ["m-from-the-instagram-app"]


# ---- a raw item without any time ----


async def test_a_raw_item_without_time_is_published_once_however_often_meta_sends_it(
    stack: Stack,
) -> None:
    """An unknown kind (kept raw) without ``timestamp``, in an entry without ``time``: its
    event id comes from what the delivery says, never from when it was received, so Meta's
    retries of it are published once."""
    customer = (await stack.control.create_customer(stack.ig_id))["igsid"]
    item = {
        "sender": {"id": customer},
        "recipient": {"id": stack.ig_id},
        "optin": {"type": "notification_messages", "payload": "weekly"},
    }
    body = envelope(stack, item, entry_time=False)
    async with stack.subscriber() as sub:
        for _ in range(3):
            assert await post(stack, body, signed(stack, body)) == 200
            await asyncio.sleep(0.01)
        (first,) = await sub.take(1)
        await sub.nothing_more(1.0)
    assert first.kind == "raw"
    assert first.payload["kind"] == "optin"


# ---- a lone surrogate beside an integer past 64 bits ----


async def test_a_lone_surrogate_beside_a_huge_integer_does_not_fail_the_delivery(
    stack: Stack,
) -> None:
    """A lone surrogate escape sends the body to the lenient reader, which reads an integer
    past 64 bits as orjson does (a float): every later step can write it again, and the
    delivery is stored rather than answered 500 on every retry."""
    customer = (await stack.control.create_customer(stack.ig_id))["igsid"]
    text_item = from_customer(stack, customer, message={"mid": "m-cut-emoji", "text": "SURR"})
    odd_item = from_customer(stack, customer, counter="HUGE")
    body = (
        envelope(stack, text_item, odd_item)
        .replace(b'"SURR"', b'"cut \\ud83d"')
        .replace(b'"HUGE"', b"123456789012345678901234567890")
    )
    async with stack.subscriber() as sub:
        status = await post(stack, body, signed(stack, body))
        assert status == 200, f"answered {status}: Meta retries it forever"
        events = await sub.take(2)
    assert events[0].payload["message"]["text"] == "cut \ufffd"


# ---- a message id too large for an index ----


@pytest.mark.parametrize(
    "inbound_backend", [pytest.param("postgres+redis", marks=[pytest.mark.postgres])]
)
async def test_an_oversized_mid_costs_its_item_not_the_messages_beside_it(stack: Stack) -> None:
    """A mid past what a btree entry holds (about 2.7 kB) would fail its batch on every
    retry: the item is kept raw, and the ordinary message beside it is stored."""
    customer = (await stack.control.create_customer(stack.ig_id))["igsid"]
    huge_mid = "m-" + secrets.token_urlsafe(6000)
    body = envelope(
        stack,
        from_customer(stack, customer, message={"mid": "m-ordinary", "text": "ordinary"}),
        from_customer(stack, customer, message={"mid": huge_mid, "text": "odd one"}),
    )
    async with stack.subscriber() as sub:
        status = await post(stack, body, signed(stack, body))
        assert status == 200, f"answered {status}: Meta retries it forever"
        events = await sub.take(1)
    assert events[0].payload["message"]["text"] == "ordinary"


# ---- an item timestamp in seconds ----


async def test_an_item_timestamp_in_seconds_does_not_date_the_message_1970(stack: Stack) -> None:
    """Meta's own samples give an item's ``timestamp`` in seconds (``"1527459824"``): read
    as seconds (anything under 10^11), not as milliseconds of January 1970, which would
    tell the business its window closed 50 years ago for a customer who just wrote."""
    customer = (await stack.control.create_customer(stack.ig_id))["igsid"]
    now_s = int(time.time())
    item = from_customer(stack, customer, message={"mid": "m-seconds", "text": "hello"})
    item["timestamp"] = str(now_s)
    body = envelope(stack, item)
    async with stack.subscriber() as sub:
        assert await post(stack, body, signed(stack, body)) == 200
        (event,) = await sub.take(1)
    window = event.payload.get("window_expires_at", "")
    assert window, "no window"
    assert datetime.fromisoformat(window.replace("Z", "+00:00")) > datetime.now(UTC), window
    created = event.payload["message"]["created_at"]
    assert created.startswith(str(datetime.now(UTC).year)), created


# ---- a fallback attachment's link ----


def test_a_fallback_attachment_keeps_its_url() -> None:
    """A fallback attachment (a link) carries ``title`` and ``url`` beside ``type``, with
    ``payload`` null: both are kept."""
    fallback = {
        "type": "fallback",
        "payload": None,
        "title": "Our summer sale",
        "url": "https://shop.example/sale",
    }
    body = orjson.dumps(
        {
            "object": "instagram",
            "entry": [
                {
                    "id": "17841400000000001",
                    "time": 1_700_000_000_000,
                    "messaging": [
                        {
                            "sender": {"id": "5200000000000001"},
                            "recipient": {"id": "17841400000000001"},
                            "timestamp": 1_700_000_000_000,
                            "message": {"mid": "m-fb", "attachments": [fallback]},
                        }
                    ],
                }
            ],
        }
    )
    (item,) = parse_delivery(body).items
    (attachment,) = item.attachments
    assert attachment.type == "fallback"
    assert attachment.title == "Our summer sale"
    assert attachment.url == "https://shop.example/sale"
