"""An attempt never outlives its message's lease: once the lease lapsed another worker
would claim the message and send it again. Whatever the channel's own timeout, the call
ends at half the lease as one that heard no answer (it may have been delivered, so the
retry waits for the echo, as after any unanswered attempt)."""

from __future__ import annotations

import pytest
from switchboard.v1 import common_pb2

from tests.outbound.conftest import Out
from tests.outbound.test_echo import subscribe
from tests.outbound.test_unanswered_sends import adopted


@pytest.fixture
def out_extra() -> dict[str, str]:
    # A 3 s lease bounds an attempt at 1.5 s, well inside the Graph client's 15 s timeout.
    return {"SWITCHBOARD_SEND_LEASE_SECONDS": "3", "SWITCHBOARD_SEND_UNANSWERED_WAIT_SECONDS": "3"}


async def test_a_call_longer_than_half_the_lease_ends_unanswered_and_its_echo_is_adopted(
    out: Out,
) -> None:
    await subscribe(out)
    outbound = out.gateway.gateway.outbound
    assert outbound is not None
    assert outbound.deliverer.policy.lease_s == 3
    await out.control.update_settings(latency_ms=2500)
    reply = await out.send(text="Cut short")
    assert reply.message.status == common_pb2.MESSAGE_STATUS_RETRYING
    assert reply.message.error.maybe_delivered
    assert "3 s lease" in reply.message.error.message
    # Meta carries the call out after all, and echoes the message.
    sent = await adopted(out, reply.message.id)
    assert [a.number for a in sent.attempts] == [1]
