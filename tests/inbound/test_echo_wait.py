"""Deliveries of echoes only wait for company before their commit (WEBHOOK_ECHO_WAIT_MS):
a customer's message never waits for them, and takes them along in its own commit, in the
order they came."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tests.inbound.conftest import Stack
from tests.inbound.subscriber import kinds
from tests.inbound.test_end_to_end import post, signed

# Long enough that a test finishing well within it shows that something ended the wait.
pytestmark = pytest.mark.gateway_env(WEBHOOK_ECHO_WAIT_MS=2000)


def echo_body(ig_id: str, customer: str, mid: str, text: str) -> bytes:
    """What Meta sends when the business wrote to the customer from any app."""
    item = {
        "sender": {"id": ig_id},
        "recipient": {"id": customer},
        "timestamp": 1_700_000_000_000,
        "message": {"mid": mid, "text": text, "is_echo": True},
    }
    return orjson.dumps({"object": "instagram", "entry": [{"id": ig_id, "messaging": [item]}]})


async def test_a_customer_message_takes_a_waiting_echo_along(stack: Stack) -> None:
    async with stack.subscriber() as sub:
        first = await stack.control.send_dm(stack.ig_id, "are you open?")
        customer = first["customer"]
        (opened,) = await sub.take(1)
        echo = echo_body(stack.ig_id, customer, "m-echo-wait-1", "We open at 9")
        echo_answered = asyncio.ensure_future(post(stack, echo, signed(stack, echo)))
        await asyncio.sleep(0.2)
        assert not echo_answered.done()
        # Not held itself, and its commit ends the echo's wait: both well within it.
        sent = await asyncio.wait_for(
            stack.control.send_dm(stack.ig_id, "thanks", customer=customer), 1.5
        )
        assert sent["status"] == 200
        assert await asyncio.wait_for(echo_answered, 1.5) == 200
        events = await sub.take(2)
    assert kinds(events) == ["message_echoed", "message_received"]
    assert events[0].payload["message"]["text"] == "We open at 9"
    assert {e.conversation_id for e in events} == {opened.conversation_id}


async def test_an_echo_alone_is_stored_once_its_wait_is_over(stack: Stack) -> None:
    async with stack.subscriber() as sub:
        first = await stack.control.send_dm(stack.ig_id, "hello")
        await sub.take(1)
        echo = echo_body(stack.ig_id, first["customer"], "m-echo-wait-2", "Hi there")
        assert await asyncio.wait_for(post(stack, echo, signed(stack, echo)), 10) == 200
        (event,) = await sub.take(1)
    assert event.kind == "message_echoed"
    assert event.payload["message"]["external_id"] == "m-echo-wait-2"
