"""A repeat is answered with the first message even where the call, new, would be refused
now: the key is looked up once the checks that come after the content's refuse it (the
messaging window, the connection, fail_fast rate limits), not read before every insert."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from switchboard.v1 import common_pb2

from tests.helpers import error_info
from tests.outbound.conftest import Out


@pytest.fixture
def out_extra() -> dict[str, str]:
    return {"SWITCHBOARD_SEND_RATE_TEXT_PER_SECOND": "2"}


async def test_a_repeat_after_the_window_closed_returns_the_first_message(out: Out) -> None:
    first = await out.send(text="Before", idempotency_key="late-1")
    assert first.message.status == common_pb2.MESSAGE_STATUS_SENT
    out.advance(25 * 3600)
    again = await out.send(text="Before", idempotency_key="late-1")
    assert again.duplicate
    assert again.message.id == first.message.id
    assert again.message.status == common_pb2.MESSAGE_STATUS_SENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await out.send(text="Before", idempotency_key="late-2")
    assert error_info(caught.value).reason == "OUTSIDE_MESSAGING_WINDOW"
    assert len(await out.bodies()) == 1


async def test_a_fail_fast_repeat_of_a_rate_limited_account_returns_the_first_message(
    out: Out,
) -> None:
    first = await out.send(text="Once", idempotency_key="fast-1", fail_fast=True)
    await out.send(text="Twice", fail_fast=True)
    # The bucket (two a second) is empty now: a new call would be refused.
    again = await out.send(text="Once", idempotency_key="fast-1", fail_fast=True)
    assert again.duplicate
    assert again.message.id == first.message.id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await out.send(text="Thrice", idempotency_key="fast-2", fail_fast=True)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(await out.bodies()) == 2


async def test_repeats_in_one_batch_with_a_new_message_send_each_once(out: Out) -> None:
    first = await out.send(text="First", idempotency_key="batch-1")
    await asyncio.sleep(0.6)  # a token back in the bucket for each call below
    replies = await asyncio.gather(
        out.send(text="First", idempotency_key="batch-1"),
        out.send(text="Second", idempotency_key="batch-2"),
        out.send(text="First", idempotency_key="batch-1"),
    )
    assert [r.duplicate for r in replies] == [True, False, True]
    assert replies[0].message.id == replies[2].message.id == first.message.id
    await out.wait_status(replies[1].message.id, "MESSAGE_STATUS_SENT")
    assert sorted(b["message"]["text"] for b in await out.bodies()) == ["First", "Second"]
