"""Both login flows end to end: StartConnect → the sandbox's dialog → the sidecar's callback
→ the dashboard's return_url, then the connection as the API shows it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import redis.asyncio
from google.protobuf import json_format
from switchboard.v1 import common_pb2, events_pb2

from channels.instagram.sandbox import SandboxClient
from gateway.security.oauth_state import hash_state, oauth_state_key
from tests.connect.conftest import (
    BACKENDS,
    RETURN_URL,
    Api,
    Browser,
    code_and_state,
    wait_for_events,
)
from tests.gateway_harness import RunningGateway, gateway_environ, run_gateway


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_instagram_login_connects_and_returns_to_the_dashboard(
    gw: RunningGateway, tenant: str, api: Api, browser: Browser, control: SandboxClient
) -> None:
    started = await api.start(tenant, "instagram")
    auth = urlsplit(started.authorization_url)
    query = parse_qs(auth.query)
    assert auth.path.endswith("/oauth/authorize")
    assert query["scope"] == ["instagram_business_basic,instagram_business_manage_messages"]
    assert query["state"] == [started.state]
    assert len(started.state) >= 43  # 256 bits, URL-safe base64
    assert query["redirect_uri"] == [f"{gw.gateway.config.public_url}/oauth/instagram/callback"]

    callback = await browser.authorize(started.authorization_url)
    assert callback.startswith(gw.gateway.config.public_url + "/oauth/instagram/callback?")
    landing = await browser.get(callback)

    assert landing.status == 302
    assert landing.location.startswith(RETURN_URL + "&")
    assert landing.query["tab"] == "instagram"
    assert landing.query["status"] == "connected"
    conn = await api.get(landing.query["connection_id"])
    assert conn.status == common_pb2.CONNECTION_STATUS_CONNECTED
    assert conn.tenant_id == tenant
    assert conn.login_flow == "instagram"
    assert conn.account.username.startswith("sandbox")
    assert conn.account.external_id
    assert set(conn.scopes) == {"instagram_business_basic", "instagram_business_manage_messages"}
    assert conn.HasField("token_expires_at")
    assert conn.HasField("connected_at")

    account = next(a for a in await control.accounts() if a["ig_id"] == conn.account.external_id)
    assert account["username"] == conn.account.username
    subscribed = {s["object_id"]: s for s in await control.subscriptions()}
    assert "messages" in subscribed[conn.account.external_id]["subscribed_fields"]
    assert [c.id for c in await api.list(tenant)] == [conn.id]

    (payload,) = await wait_for_events(gw, conn.id, 1)
    assert payload["previous_status"] == "CONNECTION_STATUS_PENDING"
    assert payload["connection"]["status"] == "CONNECTION_STATUS_CONNECTED"
    parsed = json_format.ParseDict(payload, events_pb2.ConnectionChanged())
    assert parsed.connection.account.username == conn.account.username


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_facebook_login_connects_the_page_with_an_instagram_account(
    gw: RunningGateway, tenant: str, api: Api, browser: Browser, control: SandboxClient
) -> None:
    started = await api.start(tenant, "facebook")
    auth = urlsplit(started.authorization_url)
    assert auth.path.endswith("/dialog/oauth")
    assert "instagram_manage_messages" in parse_qs(auth.query)["scope"][0]

    landing = await browser.connect(started.authorization_url)

    assert landing.query["status"] == "connected", landing.location
    conn = await api.get(landing.query["connection_id"])
    assert conn.status == common_pb2.CONNECTION_STATUS_CONNECTED
    assert conn.login_flow == "facebook"
    assert conn.account.page_id
    assert conn.account.username
    assert not conn.HasField("token_expires_at")  # page tokens from long-lived users last
    subscribed = {s["object_id"]: s for s in await control.subscriptions()}
    assert subscribed[conn.account.page_id]["flow"] == "facebook"
    # Messenger's names, which a Page takes, not Instagram Login's.
    fields = subscribed[conn.account.page_id]["subscribed_fields"]
    assert {"messages", "message_reads", "messaging_referrals"} <= set(fields)
    assert not {"messaging_seen", "messaging_referral", "message_edit"} & set(fields)


async def test_without_a_return_url_the_sidecar_answers_a_connected_page(
    api: Api, browser: Browser
) -> None:
    started = await api.start("acme", "instagram", return_url="")
    landing = await browser.connect(started.authorization_url)
    assert landing.status == 200
    (conn,) = await api.list("acme")
    assert f"Connected @{conn.account.username}" in landing.text


async def test_instagram_code_with_its_trailing_fragment_marker_still_works(
    api: Api, browser: Browser, control: SandboxClient
) -> None:
    await control.update_settings(instagram_exchange_shape="flat")
    started = await api.start("acme", "instagram")
    code, state = code_and_state(await browser.authorize(started.authorization_url))
    done = await api.complete(code + "#_", state)
    assert done.connection.status == common_pb2.CONNECTION_STATUS_CONNECTED
    assert done.return_url == RETURN_URL
    assert [a.external_id for a in done.available_accounts] == [done.connection.account.external_id]


async def test_complete_connect_chooses_among_several_pages(
    api: Api, browser: Browser, control: SandboxClient
) -> None:
    first = await control.create_account(flow="facebook")
    second = await control.create_account(flow="facebook")
    await control.next_approval(accounts=[first["ig_id"], second["ig_id"]])
    started = await api.start("acme", "facebook")
    code, state = code_and_state(await browser.authorize(started.authorization_url))

    done = await api.complete(code, state, account=second["ig_id"])

    assert done.connection.account.external_id == second["ig_id"]
    assert done.connection.account.page_id == second["page_id"]
    assert {a.external_id for a in done.available_accounts} == {first["ig_id"], second["ig_id"]}


async def test_several_pages_without_a_choice_connect_the_first(
    api: Api, browser: Browser, control: SandboxClient
) -> None:
    first = await control.create_account(flow="facebook")
    second = await control.create_account(flow="facebook")
    await control.next_approval(accounts=[first["ig_id"], second["ig_id"]])
    started = await api.start("acme", "facebook")

    landing = await browser.connect(started.authorization_url)

    conn = await api.get(landing.query["connection_id"])
    # The first page Meta lists (the sandbox lists them in the order they were granted).
    assert conn.account.external_id == first["ig_id"]


async def test_states_are_stored_hashed_for_ten_minutes(gw: RunningGateway, api: Api) -> None:
    started = await api.start("acme")
    async with gw.gateway.store.transaction() as tx:
        assert await tx.take_oauth_state(started.state, datetime.now(UTC)) is None
        taken = await tx.take_oauth_state(hash_state(started.state), datetime.now(UTC))
    assert taken is not None
    assert (taken.tenant_id, taken.channel, taken.login_flow) == ("acme", "instagram", "instagram")
    assert taken.return_url == RETURN_URL
    assert taken.created_at is not None
    assert (taken.expires_at - taken.created_at).total_seconds() == 600


async def test_the_embedded_sandbox_serves_the_authorization_url(tmp_path: Path) -> None:
    # With no credentials the plugin swaps its settings at start: the connector must follow.
    async with run_gateway(gateway_environ(f"sqlite:///{tmp_path}/sb.db", str(tmp_path))) as gw:
        assert gw.gateway.connect is not None
        started = await gw.gateway.connect.start(tenant_id="acme", channel="instagram")
    assert started.authorization_url.startswith("http://127.0.0.1:")
    assert "/instagram-www/oauth/authorize?" in started.authorization_url


@pytest.mark.parametrize("backend", [BACKENDS[1]], indirect=True)
async def test_with_redis_states_live_there_hashed_with_a_ten_minute_ttl(
    gw: RunningGateway, tenant: str, api: Api, redis_client: redis.asyncio.Redis
) -> None:
    started = await api.start(tenant)
    prefix = gw.gateway.config.redis_key_prefix
    key = oauth_state_key(prefix, hash_state(started.state))
    assert 590_000 <= await redis_client.pttl(key) <= 600_000
    assert [k async for k in redis_client.scan_iter(match=f"{prefix}*{started.state}*")] == []
    async with gw.gateway.store.transaction() as tx:
        # Not in the store: Redis alone holds pending states when it is configured.
        assert await tx.take_oauth_state(hash_state(started.state), datetime.now(UTC)) is None
