"""A send rate below one a second still sends: the bucket holds at least one token."""

from __future__ import annotations

import grpc
import pytest
from switchboard.v1 import common_pb2

from tests.outbound.conftest import Out


@pytest.fixture
def out_extra() -> dict[str, str]:
    return {"SWITCHBOARD_SEND_RATE_TEXT_PER_SECOND": "0.5"}


async def test_a_rate_below_one_a_second_sends_at_that_rate(out: Out) -> None:
    first = await out.send(text="one")
    await out.wait_status(first.message.id, "MESSAGE_STATUS_SENT")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await out.send(text="too soon", fail_fast=True)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Without fail_fast the message waits for the bucket (two seconds), then goes out.
    second = await out.send(text="two")
    assert second.message.status == common_pb2.MESSAGE_STATUS_QUEUED
    await out.wait_status(second.message.id, "MESSAGE_STATUS_SENT")
    assert [b["message"]["text"] for b in await out.bodies()] == ["one", "two"]
