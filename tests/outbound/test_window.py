"""The customer's messaging window: refused before calling Meta, the human-agent tag, and
Meta's own window errors mapped to the same reason."""

from __future__ import annotations

from datetime import datetime, timedelta

import grpc
import pytest
from switchboard.v1 import common_pb2, messaging_pb2

from tests.helpers import bearer, error_info
from tests.outbound.conftest import Out

DAY = 86400.0


async def test_outside_the_window_is_refused_before_calling_meta(out: Out) -> None:
    out.advance(25 * 3600)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await out.send(text="Too late")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert info.reason == "OUTSIDE_MESSAGING_WINDOW"
    assert out.conversation.last_inbound_at is not None
    closed = datetime.fromisoformat(info.metadata["window_closed_at"].replace("Z", "+00:00"))
    assert closed == out.conversation.last_inbound_at + timedelta(hours=24)
    assert await out.bodies() == []


async def test_the_human_agent_tag_allows_seven_days(out: Out) -> None:
    out.advance(3 * DAY)
    await out.control.advance_clock(3 * DAY)
    reply = await out.send(text="A human here", tag="HUMAN_AGENT")
    assert reply.message.status == common_pb2.MESSAGE_STATUS_SENT, reply.message.error
    [body] = await out.bodies()
    assert body["messaging_type"] == "MESSAGE_TAG"
    assert body["tag"] == "HUMAN_AGENT"
    out.advance(5 * DAY)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await out.send(text="Much too late", tag="HUMAN_AGENT")
    assert error_info(caught.value).reason == "OUTSIDE_MESSAGING_WINDOW"


async def test_the_tag_does_not_stretch_the_window_of_what_goes_out_untagged(out: Out) -> None:
    """Meta takes the human-agent tag on messages only: a reaction or a typing indicator
    goes out untagged, so past 24 hours it is refused before anything is stored."""
    history = await out.stub.ListMessages(
        messaging_pb2.ListMessagesRequest(conversation_id=out.conversation.id),
        metadata=bearer(out.gateway.token),
    )
    mid = history.messages[0].external_id
    out.advance(3 * DAY)
    await out.control.advance_clock(3 * DAY)
    typing = messaging_pb2.SenderAction(action=messaging_pb2.SenderAction.ACTION_TYPING_ON)
    for content in (
        {"sender_action": typing},
        {"reaction": messaging_pb2.Reaction(message_id=mid, emoji="❤️")},
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await out.send(tag="HUMAN_AGENT", **content)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(caught.value)
        assert info.reason == "OUTSIDE_MESSAGING_WINDOW"
        assert "HUMAN_AGENT" in caught.value.details()
        assert out.conversation.last_inbound_at is not None
        closed = datetime.fromisoformat(info.metadata["window_closed_at"].replace("Z", "+00:00"))
        assert closed == out.conversation.last_inbound_at + timedelta(hours=24)
    assert await out.bodies() == []
    after = await out.stub.ListMessages(
        messaging_pb2.ListMessagesRequest(conversation_id=out.conversation.id),
        metadata=bearer(out.gateway.token),
    )
    assert len(after.messages) == len(history.messages)
    # A message with the tag still goes, tagged.
    reply = await out.send(text="A human here", tag="HUMAN_AGENT")
    assert reply.message.status == common_pb2.MESSAGE_STATUS_SENT, reply.message.error


async def test_metas_window_error_maps_to_the_same_reason(out: Out) -> None:
    await out.control.advance_clock(25 * 3600)  # Meta's clock only: our check passes
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await out.send(text="Meta says no", idempotency_key="late-1")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert info.reason == "OUTSIDE_MESSAGING_WINDOW"
    failed = await out.get(info.metadata["message_id"])
    assert failed.status == common_pb2.MESSAGE_STATUS_FAILED
    # graph.instagram.com's shape: code 10 with subcode 2534022.
    assert (failed.error.channel_code, failed.error.channel_subcode) == (10, 2534022)
    assert len(failed.attempts) == 1
    # One late reply fails alone: code 10 is not read as a lost permission here.
    async with out.gateway.gateway.store.transaction() as tx:
        conn = await tx.get_connection(out.connection.id)
    assert conn is not None
    assert conn.status.value == "CONNECTED"
