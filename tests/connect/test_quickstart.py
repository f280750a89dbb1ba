"""The README's quickstart script runs the whole mission against a gateway and its sandbox."""

from __future__ import annotations

import secrets

from switchboard.v1 import common_pb2

from channels.instagram.sandbox import SandboxClient
from clients.examples.quickstart import ANSWER_TEXT, CUSTOMER_TEXT, run
from tests.gateway_harness import RunningGateway


async def test_the_quickstart_connects_receives_and_answers(
    gw: RunningGateway, control: SandboxClient
) -> None:
    await control.set_webhook(f"{gw.http_url}/webhooks/instagram")
    tenant = f"qs-{secrets.token_hex(3)}"
    outcome = await run(gw.grpc_target, gw.token, tenant=tenant, say=False)
    assert outcome.received == CUSTOMER_TEXT
    assert outcome.answered.status == common_pb2.MESSAGE_STATUS_SENT
    assert outcome.answered.text == ANSWER_TEXT
    assert outcome.history == [
        f"DIRECTION_OUTBOUND: {ANSWER_TEXT}",
        f"DIRECTION_INBOUND: {CUSTOMER_TEXT}",
    ]
    assert outcome.sent_to_meta == 1
    [sent] = await control.sent()
    assert sent["body"]["message"] == {"text": ANSWER_TEXT}
