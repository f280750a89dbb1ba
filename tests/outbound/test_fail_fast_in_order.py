"""fail_fast and send order: a call queued behind an earlier message of its conversation
takes no token of the account's rate now (the worker takes one when its turn comes), yet
is still refused while the account may not send."""

from __future__ import annotations

import grpc
import pytest
from switchboard.v1 import common_pb2

from tests.helpers import error_info
from tests.outbound.conftest import Out, customer_writes
from tests.outbound.test_send_order import accepted

QUEUED = common_pb2.MESSAGE_STATUS_QUEUED
RETRYING = common_pb2.MESSAGE_STATUS_RETRYING
SENT = common_pb2.MESSAGE_STATUS_SENT


@pytest.fixture
def out_extra() -> dict[str, str]:
    # Two tokens a second, and a retry far enough out to take none during the test.
    return {
        "SWITCHBOARD_SEND_RATE_TEXT_PER_SECOND": "2",
        "SWITCHBOARD_SEND_RETRY_BASE_SECONDS": "60",
        "SWITCHBOARD_SEND_RETRY_MAX_SECONDS": "60",
    }


async def test_a_fail_fast_call_queued_behind_another_takes_no_token(out: Out) -> None:
    await out.control.inject_error(2, account=out.ig_id, message="Service temporarily unavailable")
    first = await out.send(text="A")  # its attempt takes one of the two tokens
    assert first.message.status == RETRYING
    behind = await out.send(text="B", fail_fast=True)
    assert behind.message.status == QUEUED
    assert not behind.message.attempts
    other, _, _ = await customer_writes(out.gateway, out.control, out.connection, "me too")
    # The token B did not take is there for a call that can go now.
    now = await out.send(text="C", recipient_id=other, fail_fast=True)
    assert now.message.status == SENT
    out.advance(61)
    await out.wait_status(first.message.id, "MESSAGE_STATUS_SENT")
    sent = await out.wait_status(behind.message.id, "MESSAGE_STATUS_SENT")
    assert [a.number for a in sent.attempts] == [1]
    assert await accepted(out) == ["C", "A", "B"]


async def test_a_fail_fast_call_queued_behind_another_is_refused_while_paused(
    out: Out,
) -> None:
    await out.throttle()
    held = await out.send(text="one")
    assert held.message.status == QUEUED  # throttled: the account is paused, "one" held
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await out.send(text="two", fail_fast=True)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == "RATE_LIMITED"
    # Refused, so not stored: only the held message goes out once the pause is over.
    out.advance(130)
    await out.wait_status(held.message.id, "MESSAGE_STATUS_SENT")
    assert await accepted(out) == ["one"]
