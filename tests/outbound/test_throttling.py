"""Rate limits: Meta's throttling pauses the account until the time it gives, queued
messages are held rather than failed, and fail_fast answers RESOURCE_EXHAUSTED."""

from __future__ import annotations

import grpc
import pytest
from switchboard.v1 import common_pb2

from tests.helpers import error_info
from tests.outbound.conftest import Out


async def test_throttling_pauses_the_account_until_meta_allows_then_resumes(out: Out) -> None:
    await out.throttle()
    first = await out.send(text="one")
    assert first.message.status == common_pb2.MESSAGE_STATUS_QUEUED
    assert not first.message.HasField("error")
    second = await out.send(text="two")
    assert second.message.status == common_pb2.MESSAGE_STATUS_QUEUED
    # Only the throttled call reached Meta: the paused account held the second one.
    assert len(await out.bodies()) == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await out.send(text="now or never", fail_fast=True)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == "RATE_LIMITED"
    assert "retry_at" in error_info(caught.value).metadata
    out.advance(60)  # one minute: still inside the two minutes Meta gave
    await out.wait_status(first.message.id, "MESSAGE_STATUS_QUEUED")
    assert len(await out.bodies()) == 1
    out.advance(70)
    await out.wait_status(first.message.id, "MESSAGE_STATUS_SENT")
    held = await out.wait_status(second.message.id, "MESSAGE_STATUS_SENT")
    assert [a.number for a in held.attempts] == [1]
    assert sorted(b["message"]["text"] for b in await out.bodies()) == ["one", "one", "two"]


async def test_an_http_429_pauses_the_account_whatever_its_error_code(out: Out) -> None:
    """A 429 is throttling even when the code in its body is one that alone would fail the
    message (an edge in front of the Graph API answers these)."""
    await out.control.inject_error(
        100, account=out.ig_id, http_status=429, estimated_time_to_regain_access=2
    )
    first = await out.send(text="one")
    assert first.message.status == common_pb2.MESSAGE_STATUS_QUEUED
    assert not first.message.HasField("error")
    out.advance(60)  # inside the two minutes the usage header gives
    await out.wait_status(first.message.id, "MESSAGE_STATUS_QUEUED")
    out.advance(70)
    await out.wait_status(first.message.id, "MESSAGE_STATUS_SENT")
    assert [b["message"]["text"] for b in await out.bodies()] == ["one", "one"]


@pytest.fixture
def out_extra() -> dict[str, str]:
    return {"SWITCHBOARD_SEND_RATE_TEXT_PER_SECOND": "2"}


async def test_the_token_bucket_refuses_fail_fast_callers_beyond_the_rate(out: Out) -> None:
    outcomes = []
    for i in range(4):
        try:
            reply = await out.send(text=f"burst {i}", fail_fast=True)
            outcomes.append(common_pb2.MessageStatus.Name(reply.message.status))
        except grpc.aio.AioRpcError as exc:
            outcomes.append(exc.code().name)
    assert outcomes[:2] == ["MESSAGE_STATUS_SENT", "MESSAGE_STATUS_SENT"]
    assert "RESOURCE_EXHAUSTED" in outcomes[2:]
    assert len(await out.bodies()) == outcomes.count("MESSAGE_STATUS_SENT")


async def test_without_fail_fast_the_bucket_only_delays(out: Out) -> None:
    replies = [await out.send(text=f"paced {i}") for i in range(4)]
    for reply in replies:
        await out.wait_status(reply.message.id, "MESSAGE_STATUS_SENT")
    assert len(await out.bodies()) == 4
