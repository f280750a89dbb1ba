"""No token, code, app secret or state value reaches a log line, whatever the flow does."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from channels.instagram.sandbox import RunningSandbox, SandboxClient
from gateway.observability.logging import JsonFormatter
from tests.connect.conftest import Api, Browser, code_and_state, connect_account, sandbox_secrets
from tests.gateway_harness import RunningGateway


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every record of every logger, debug included, formatted as the service writes them."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def test_the_whole_flow_logs_no_secret(
    captured: io.StringIO,
    gw: RunningGateway,
    api: Api,
    browser: Browser,
    control: SandboxClient,
    sandbox: RunningSandbox,
) -> None:
    states: list[str] = []
    for flow in ("instagram", "facebook"):
        started = await api.start("acme", flow)
        states.append(started.state)
        landing = await browser.connect(started.authorization_url)
        assert landing.query["status"] == "connected"
    await control.next_approval(refuse=True)
    refused = await api.start("acme")
    states.append(refused.state)
    await browser.connect(refused.authorization_url)
    await control.inject_error(100, endpoint="oauth")
    failed = await api.start("acme", return_url="")
    states.append(failed.state)
    await browser.connect(failed.authorization_url)
    direct = await api.start("acme")
    states.append(direct.state)
    code, state = code_and_state(await browser.authorize(direct.authorization_url))
    await api.complete(code, state)
    conn = await connect_account(api, browser, "acme")
    await control.advance_clock(31 * 86400)
    assert gw.gateway.refresher is not None
    await gw.gateway.refresher.refresh_due(datetime.now(UTC) + timedelta(days=31))
    await control.revoke(account=conn.account.external_id)
    await gw.gateway.refresher.reconcile()
    for listed in await api.list("acme"):
        await api.disconnect(listed.id)

    text = captured.getvalue()
    assert "connection connected" in text  # the capture did see the gateway's lines
    assert "meta call" in text
    secrets = [*sandbox_secrets(sandbox), *states]
    assert len(secrets) > 10
    leaked = [s for s in secrets if s in text]
    assert leaked == []
