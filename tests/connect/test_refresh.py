"""The refresh worker and the reconciliation pass, against the sandbox's clock.

The worker's passes take the time they run at, so a test moves the gateway's clock and the
sandbox's clock by the same amount instead of waiting a month.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from switchboard.v1 import common_pb2

from channels.instagram.sandbox import RunningSandbox, SandboxClient
from gateway.services.credentials import unseal
from gateway.services.refresh import RefreshWorker
from gateway.store import open_store
from tests.connect.conftest import BACKENDS, Api, Browser, connect_account, wait_for_events
from tests.gateway_harness import RunningGateway

DAY = timedelta(days=1)


def worker(gw: RunningGateway) -> RefreshWorker:
    assert gw.gateway.refresher is not None
    return gw.gateway.refresher


async def token_of(gw: RunningGateway, connection_id: str) -> str:
    assert gw.gateway.keyring is not None
    async with gw.gateway.store.transaction() as tx:
        credential = await tx.get_credential(connection_id)
    assert credential is not None
    return unseal(gw.gateway.keyring, credential).value.reveal()


async def test_a_fresh_token_is_not_due(gw: RunningGateway, api: Api, browser: Browser) -> None:
    await connect_account(api, browser, "acme")
    assert sum((await worker(gw).refresh_due()).values()) == 0
    assert sum((await worker(gw).refresh_due(datetime.now(UTC) + 29 * DAY)).values()) == 0


async def test_a_token_within_the_margin_is_refreshed(
    gw: RunningGateway, api: Api, browser: Browser, control: SandboxClient
) -> None:
    conn = await connect_account(api, browser, "acme")
    before = await token_of(gw, conn.id)
    later = datetime.now(UTC) + 31 * DAY
    await control.advance_clock((31 * DAY).total_seconds())

    outcomes = await worker(gw).refresh_due(later)

    assert outcomes == {"refreshed": 1}
    assert await token_of(gw, conn.id) != before
    refreshed = await api.get(conn.id)
    assert refreshed.status == common_pb2.CONNECTION_STATUS_CONNECTED
    expires = refreshed.token_expires_at.ToDatetime(tzinfo=UTC)
    assert abs(expires - (later + timedelta(seconds=5183944))) < timedelta(minutes=1)
    # Refreshed: not due again at the same time.
    assert sum((await worker(gw).refresh_due(later)).values()) == 0


async def test_facebook_page_tokens_are_never_claimed_for_refresh(
    gw: RunningGateway, api: Api, browser: Browser
) -> None:
    await connect_account(api, browser, "acme", "facebook")
    assert sum((await worker(gw).refresh_due(datetime.now(UTC) + 365 * DAY)).values()) == 0


async def test_a_failed_refresh_backs_off_then_succeeds(
    gw: RunningGateway, api: Api, browser: Browser, control: SandboxClient
) -> None:
    conn = await connect_account(api, browser, "acme")
    later = datetime.now(UTC) + 31 * DAY
    await control.advance_clock((31 * DAY).total_seconds())
    await control.inject_error(2, endpoint="oauth")

    assert await worker(gw).refresh_due(later) == {"failed": 1}
    # Held back until its retry time: not claimed again right away...
    assert sum((await worker(gw).refresh_due(later)).values()) == 0
    # ... but after the back-off (a minute or so for the first failure).
    assert await worker(gw).refresh_due(later + timedelta(minutes=5)) == {"refreshed": 1}
    assert (await api.get(conn.id)).last_error == ""


async def test_a_token_meta_refuses_to_refresh_yet_is_retried_later(
    gw: RunningGateway, api: Api, browser: Browser
) -> None:
    # The gateway thinks a month passed, the sandbox (Meta) does not: Meta's 24-hour rule.
    await connect_account(api, browser, "acme")
    assert await worker(gw).refresh_due(datetime.now(UTC) + 31 * DAY) == {"failed": 1}


async def test_a_revoked_token_turns_the_connection_needs_reauth_with_an_event(
    gw: RunningGateway, api: Api, browser: Browser, control: SandboxClient
) -> None:
    conn = await connect_account(api, browser, "acme")
    await control.revoke(account=conn.account.external_id)
    await control.advance_clock((31 * DAY).total_seconds())

    outcomes = await worker(gw).refresh_due(datetime.now(UTC) + 31 * DAY)

    assert outcomes == {"needs_reauth": 1}
    stale = await api.get(conn.id)
    assert stale.status == common_pb2.CONNECTION_STATUS_NEEDS_REAUTH
    assert "rejected the token" in stale.last_error
    events = await wait_for_events(gw, conn.id, 2)
    assert events[-1]["previous_status"] == "CONNECTION_STATUS_CONNECTED"
    assert events[-1]["connection"]["status"] == "CONNECTION_STATUS_NEEDS_REAUTH"
    assert "rejected the token" in events[-1]["reason"]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_two_replicas_never_refresh_the_same_token(
    gw: RunningGateway,
    tenant: str,
    api: Api,
    browser: Browser,
    control: SandboxClient,
    sandbox: RunningSandbox,
) -> None:
    conns = [await connect_account(api, browser, tenant) for _ in range(4)]
    later = datetime.now(UTC) + 31 * DAY
    await control.advance_clock((31 * DAY).total_seconds())
    gateway = gw.gateway
    assert gateway.keyring is not None
    async with (
        open_store(gateway.config.database_url.reveal()) as one,
        open_store(gateway.config.database_url.reveal()) as two,
    ):
        replicas = [RefreshWorker(s, gateway.channels, gateway.keyring) for s in (one, two)]
        results = await asyncio.gather(*(r.refresh_due(later) for r in replicas))

    assert sum(r.get("failed", 0) for r in results) == 0
    assert sum(r.get("refreshed", 0) for r in results) >= len(conns)
    # One long-lived token from the exchange and one from the single refresh, per account.
    for conn in conns:
        issued = [
            t
            for t in sandbox.state.tokens.values()
            if t.ig_id == conn.account.external_id and t.kind == "instagram_long"
        ]
        assert len(issued) == 2


async def test_reconciliation_restores_a_vanished_subscription(
    gw: RunningGateway, api: Api, browser: Browser, control: SandboxClient, sandbox: RunningSandbox
) -> None:
    conn = await connect_account(api, browser, "acme")
    issued = await control.issue_token(conn.account.external_id, "instagram_long")
    async with (
        aiohttp.ClientSession() as http,
        http.delete(
            f"{sandbox.url}/graph-instagram/v21.0/me/subscribed_apps",
            headers={"Authorization": f"Bearer {issued['access_token']}"},
        ) as reply,
    ):
        assert reply.status == 200
    assert conn.account.external_id not in {s["object_id"] for s in await control.subscriptions()}

    outcomes = await worker(gw).reconcile()

    assert outcomes["resubscribed"] == 1
    assert conn.account.external_id in {s["object_id"] for s in await control.subscriptions()}
    assert (await worker(gw).reconcile())["active"] == 1


async def test_reconciliation_marks_a_revoked_connection(
    gw: RunningGateway, api: Api, browser: Browser, control: SandboxClient
) -> None:
    conn = await connect_account(api, browser, "acme", "facebook")
    await control.revoke(account=conn.account.external_id)
    assert (await worker(gw).reconcile())["needs_reauth"] == 1
    assert (await api.get(conn.id)).status == common_pb2.CONNECTION_STATUS_NEEDS_REAUTH


async def test_metrics_show_connections_refreshes_and_the_nearest_expiry(
    gw: RunningGateway, api: Api, browser: Browser, control: SandboxClient
) -> None:
    await connect_account(api, browser, "acme")
    await control.advance_clock((31 * DAY).total_seconds())
    await worker(gw).refresh_due(datetime.now(UTC) + 31 * DAY)
    await worker(gw).update_metrics()
    async with aiohttp.ClientSession() as http, http.get(gw.metrics_url) as reply:
        text = await reply.text()
    assert 'switchboard_connections{channel="instagram",status="CONNECTED"} 1.0' in text
    assert 'switchboard_connections{channel="instagram",status="NEEDS_REAUTH"} 0.0' in text
    assert 'switchboard_token_refreshes_total{channel="instagram",outcome="refreshed"}' in text
    line = next(
        x for x in text.splitlines() if x.startswith("switchboard_token_nearest_expiry_seconds ")
    )
    assert float(line.split()[1]) > 59 * 86400
