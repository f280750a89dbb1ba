"""Transient failures are retried with backoff, up to a bound; every change is an event."""

from __future__ import annotations

import pytest
from switchboard.v1 import common_pb2

from gateway.domain.events import EventKind
from tests.outbound.conftest import Out


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (2, "Service temporarily unavailable"),
        # The Send API's own: answered as a 400, and still worth another attempt.
        (1200, "Temporary send message failure. Please try again later."),
    ],
)
async def test_a_transient_failure_is_retried_then_sent(out: Out, code: int, text: str) -> None:
    await out.control.inject_error(code, account=out.ig_id, message=text)
    reply = await out.send(text="Try again", idempotency_key="retry-1")
    assert reply.message.status == common_pb2.MESSAGE_STATUS_RETRYING
    assert reply.message.error.channel_code == code
    sent = await out.wait_status(reply.message.id, "MESSAGE_STATUS_SENT")
    assert sent.external_id
    assert [a.number for a in sent.attempts] == [1, 2]
    assert sent.attempts[0].error.channel_code == code
    assert not sent.attempts[1].HasField("error")
    assert len(await out.bodies()) == 2
    updates = await out.events(EventKind.DELIVERY_UPDATE, 3)
    statuses = [e.payload["status"] for e in updates if e.payload["message_id"] == sent.id]
    assert statuses == ["MESSAGE_STATUS_QUEUED", "MESSAGE_STATUS_RETRYING", "MESSAGE_STATUS_SENT"]
    assert all(e.payload.get("idempotency_key") == "retry-1" for e in updates)


async def test_retries_stop_at_the_bound_and_fail_with_the_reason(out: Out) -> None:
    await out.control.inject_error(1, account=out.ig_id, always=True, message="Unknown error")
    reply = await out.send(text="Doomed")
    failed = await out.wait_status(reply.message.id, "MESSAGE_STATUS_FAILED")
    assert len(failed.attempts) == 3  # SWITCHBOARD_SEND_MAX_ATTEMPTS in the tests
    assert failed.error.channel_code == 1
    assert "gave up after 3 attempts" in failed.error.message
    assert not failed.error.retryable
    assert len(await out.bodies()) == 3
    updates = await out.events(EventKind.DELIVERY_UPDATE, 4)
    assert updates[-1].payload["status"] == "MESSAGE_STATUS_FAILED"
    assert updates[-1].payload["error"]["channel_code"] == 1
