"""Deliveries that are odd but possible: an item nested past what can be written again, a
message without its mid retried by Meta, repeats of non-message events in the metrics,
and a fault answered 500 in the per-outcome count. On PostgreSQL + Redis and embedded."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from gateway.services.inbound import InboundService
from tests.inbound.conftest import Stack
from tests.inbound.subscriber import kinds
from tests.inbound.test_end_to_end import post, signed, stored_messages


def delivery(stack: Stack, *items: dict[str, Any]) -> bytes:
    entry = {"id": stack.ig_id, "time": int(time.time() * 1000), "messaging": list(items)}
    return orjson.dumps({"object": "instagram", "entry": [entry]})


def item(stack: Stack, customer: str, **body: Any) -> dict[str, Any]:
    return {
        "sender": {"id": customer},
        "recipient": {"id": stack.ig_id},
        "timestamp": int(time.time() * 1000),
        **body,
    }


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"channel": "instagram", **labels}) or 0.0


async def test_an_item_nested_too_deep_is_kept_cut_and_its_neighbours_stored(
    stack: Stack,
) -> None:
    """orjson reads 1024 levels but writes 254: such an item failed its whole delivery with
    500 on every retry of Meta's, losing the messages beside it."""
    customer = (await stack.control.create_customer(stack.ig_id))["igsid"]
    body = delivery(
        stack,
        item(stack, customer, message={"mid": "m-beside-the-odd-one", "text": "still here"}),
        item(stack, customer, weird="DEEP"),
    ).replace(b'"DEEP"', b"[" * 300 + b"1" + b"]" * 300)
    async with stack.subscriber() as sub:
        assert await post(stack, body, signed(stack, body)) == 200
        events = await sub.take(2)
    assert kinds(events) == ["message_received", "raw"]
    assert events[0].payload["message"]["text"] == "still here"
    assert events[1].payload["kind"] == "weird"
    assert "<cut: nested deeper than 200 levels>" in events[1].payload["json"]


async def test_a_message_without_mid_is_stored_once_however_often_meta_sends_it(
    stack: Stack,
) -> None:
    customer = (await stack.control.create_customer(stack.ig_id))["igsid"]
    body = delivery(stack, item(stack, customer, message={"text": "no mid on this one"}))
    async with stack.subscriber() as sub:
        for _ in range(3):
            assert await post(stack, body, signed(stack, body)) == 200
        (received,) = await sub.take(1)
        await sub.nothing_more(0.5)
    assert received.payload["message"]["text"] == "no mid on this one"
    stored = await stored_messages(stack, received.conversation_id)
    assert [m.text for m in stored] == ["no mid on this one"]
    assert stored[0].id == received.payload["message"]["id"]


async def test_repeats_of_a_reaction_count_as_one_event(stack: Stack) -> None:
    sent = await stack.control.send_dm(stack.ig_id, "react to me")
    reaction = {"mid": sent["mid"], "action": "react", "reaction": "love", "emoji": "❤️"}
    body = delivery(stack, item(stack, sent["customer"], reaction=reaction))
    name = "switchboard_inbound_events_total"
    before = counted(name, kind="reaction_changed")
    async with stack.subscriber() as sub:
        for _ in range(4):
            assert await post(stack, body, signed(stack, body)) == 200
        events = await sub.take(2)  # the message, and the reaction once
        await sub.nothing_more(0.5)
    assert kinds(events) == ["message_received", "reaction_changed"]
    assert counted(name, kind="reaction_changed") - before == 1


async def test_a_fault_answered_500_is_counted_as_an_error(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("a bug in routing")

    monkeypatch.setattr(InboundService, "_route", staticmethod(broken))
    customer = (await stack.control.create_customer(stack.ig_id))["igsid"]
    body = delivery(stack, item(stack, customer, message={"mid": "m-500", "text": "hi"}))
    name = "switchboard_webhook_deliveries_total"
    before = counted(name, outcome="error")
    assert await post(stack, body, signed(stack, body)) == 500
    assert counted(name, outcome="error") - before == 1


async def test_a_nul_character_costs_one_character_not_the_whole_delivery(stack: Stack) -> None:
    """PostgreSQL stores no U+0000 in text nor jsonb: a message saying one failed its whole
    delivery with 500 on every retry of Meta's there, losing the messages beside it."""
    customer = (await stack.control.create_customer(stack.ig_id))["igsid"]
    body = delivery(
        stack,
        item(stack, customer, message={"mid": "m-with-a-nul", "text": "a\x00b"}),
        item(stack, customer, message={"mid": "m-beside-the-nul", "text": "plain"}),
    )
    async with stack.subscriber() as sub:
        assert await post(stack, body, signed(stack, body)) == 200
        events = await sub.take(2)
    assert [e.payload["message"]["text"] for e in events] == ["a\ufffdb", "plain"]
    stored = await stored_messages(stack, events[0].conversation_id)
    assert sorted(m.text for m in stored) == ["a\ufffdb", "plain"]


async def test_a_message_without_its_sender_is_kept_raw_and_published_once(
    stack: Stack,
) -> None:
    """Without the customer there is no conversation to store a message in: it went out as
    a MessageReceived with no message id, stored nowhere, and on Redis Meta's every repeat
    of it was published again (only a stored row refuses a message's repeat there)."""
    lone = item(stack, "", message={"mid": "m-without-sender", "text": "who am I"})
    del lone["sender"]
    body = delivery(stack, lone)
    async with stack.subscriber() as sub:
        assert await post(stack, body, signed(stack, body)) == 200
        (first,) = await sub.take(1)
        relay = stack.gateway.gateway.relay
        assert relay is not None
        async with asyncio.timeout(5):
            while relay.settled < relay.published:  # noqa: ASYNC110 - the relay's task settles
                await asyncio.sleep(0.05)
        assert await post(stack, body, signed(stack, body)) == 200
        await sub.nothing_more(1.0)
    assert first.kind == "raw"
    assert first.payload["kind"] == "message"
    assert orjson.loads(first.payload["json"])["message"]["text"] == "who am I"


async def test_a_message_stamped_at_the_end_of_year_9999_is_stored_and_published(
    stack: Stack,
) -> None:
    """The last millisecond datetime can hold: its 24-hour window does not fit in one."""
    customer = (await stack.control.create_customer(stack.ig_id))["igsid"]
    late = item(stack, customer, message={"mid": "m-from-9999", "text": "far future"})
    late["timestamp"] = 253_402_300_799_000
    body = delivery(stack, late)
    async with stack.subscriber() as sub:
        assert await post(stack, body, signed(stack, body)) == 200
        (event,) = await sub.take(1)
    assert event.payload["message"]["text"] == "far future"
