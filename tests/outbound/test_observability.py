"""No token in any log line or metric; the send metrics are exported."""

from __future__ import annotations

import logging

import aiohttp
import pytest

from channels.instagram.sandbox import STATE
from tests.outbound.conftest import Out


async def test_no_token_appears_in_logs_or_metrics(
    out: Out, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await out.control.inject_error(2, account=out.ig_id)
    reply = await out.send(text="retry me")
    await out.wait_status(reply.message.id, "MESSAGE_STATUS_SENT")
    await out.control.revoke(account=out.ig_id)
    await out.send(text="rejected")
    async with aiohttp.ClientSession() as http, http.get(out.gateway.metrics_url) as metrics:
        exported = await metrics.text()
    tokens = list(out.sandbox.app[STATE].tokens)
    assert tokens
    logged = "\n".join(f"{r.getMessage()} {r.__dict__} {r.exc_text or ''}" for r in caplog.records)
    for token in tokens:
        assert token not in logged
        assert token not in exported
    assert "switchboard_outbound_sends_total" in exported
    assert 'outcome="retrying"' in exported
    assert 'code="190"' in exported
    assert "switchboard_channel_api_seconds_bucket" in exported
    assert "switchboard_outbound_queue_depth" in exported
