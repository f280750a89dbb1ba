"""Send order without the worker's poll: retries and polls are slowed to half a minute
here, so a message that goes out within seconds was sent because the one ahead of it
settled (the Deliverer wakes the worker), and typing indicators are seen neither to wait
for a message nor to hold one up."""

from __future__ import annotations

import asyncio

import pytest
from switchboard.v1 import common_pb2, messaging_pb2

from tests.outbound.conftest import Out
from tests.outbound.test_send_order import accepted

QUEUED = common_pb2.MESSAGE_STATUS_QUEUED
RETRYING = common_pb2.MESSAGE_STATUS_RETRYING
SENT = common_pb2.MESSAGE_STATUS_SENT
TYPING_ON = messaging_pb2.SenderAction(action=messaging_pb2.SenderAction.ACTION_TYPING_ON)


@pytest.fixture
def out_extra() -> dict[str, str]:
    return {
        "SWITCHBOARD_SEND_POLL_SECONDS": "30",
        "SWITCHBOARD_SEND_RETRY_BASE_SECONDS": "30",
        "SWITCHBOARD_SEND_RETRY_MAX_SECONDS": "30",
    }


def retry_now(out: Out) -> None:
    """Makes the pending retries due and has the worker look (its poll is too slow here)."""
    out.advance(120)
    worker = out.gateway.gateway.outbound_worker
    assert worker is not None
    worker.notify()


async def test_the_next_message_goes_out_as_soon_as_the_one_ahead_is_sent(out: Out) -> None:
    await out.control.update_settings(latency_ms=300)
    first = asyncio.create_task(out.send(text="A"))
    await asyncio.sleep(0.1)  # A's first attempt is under way
    second = await out.send(text="B")
    assert second.message.status == QUEUED
    assert (await first).message.status == SENT
    # Well before the next poll: woken by A's outcome.
    await out.wait_status(second.message.id, "MESSAGE_STATUS_SENT", timeout_s=5)
    assert await accepted(out) == ["A", "B"]


async def test_a_typing_indicator_does_not_wait_for_a_retrying_message(out: Out) -> None:
    await out.control.inject_error(2, account=out.ig_id, message="Service temporarily unavailable")
    first = await out.send(text="A")
    assert first.message.status == RETRYING
    typing = await out.send(sender_action=TYPING_ON)
    assert typing.message.status == SENT
    second = await out.send(text="B")
    assert second.message.status == QUEUED
    assert await accepted(out) == ["typing_on"]
    retry_now(out)
    await out.wait_status(second.message.id, "MESSAGE_STATUS_SENT", timeout_s=5)
    assert await accepted(out) == ["typing_on", "A", "B"]


async def test_a_retrying_typing_indicator_does_not_hold_up_messages(out: Out) -> None:
    await out.control.inject_error(2, account=out.ig_id, message="Service temporarily unavailable")
    typing = await out.send(sender_action=TYPING_ON)
    assert typing.message.status == RETRYING
    message = await out.send(text="A")
    assert message.message.status == SENT
    retry_now(out)
    await out.wait_status(typing.message.id, "MESSAGE_STATUS_SENT", timeout_s=5)
    assert await accepted(out) == ["A", "typing_on"]
