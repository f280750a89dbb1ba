"""Everything that must not connect: refused dialogs, bad states, foreign return URLs, Meta
errors during the exchange. None of them leaves a connection or a credential behind."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import grpc.aio
import pytest
from switchboard.v1 import connect_pb2
from yarl import URL

from channels.instagram.sandbox import SandboxClient
from gateway.security.tokens import create_token
from tests.connect.conftest import BACKENDS, RETURN_URL, Api, Browser, code_and_state
from tests.gateway_harness import RunningGateway
from tests.helpers import bearer, error_info


async def assert_nothing_stored(gw: RunningGateway, api: Api, tenant: str) -> None:
    # Credentials belong to a connection row (foreign key): no row, no credential.
    assert await api.list(tenant) == []


async def test_a_refused_dialog_sends_the_browser_back_with_status_denied(
    gw: RunningGateway, api: Api, browser: Browser, control: SandboxClient
) -> None:
    await control.next_approval(refuse=True)
    started = await api.start("acme", "instagram")
    callback = await browser.authorize(started.authorization_url)
    assert "error=access_denied" in callback

    landing = await browser.get(callback)

    assert landing.status == 302
    assert landing.location.startswith(RETURN_URL)
    assert landing.query["status"] == "denied"
    await assert_nothing_stored(gw, api, "acme")


async def test_a_refused_facebook_dialog_without_return_url_answers_a_page(
    gw: RunningGateway, api: Api, browser: Browser, control: SandboxClient
) -> None:
    await control.next_approval(refuse=True)
    started = await api.start("acme", "facebook", return_url="")
    landing = await browser.connect(started.authorization_url)
    assert landing.status == 200
    assert "declined" in landing.text
    await assert_nothing_stored(gw, api, "acme")


async def test_an_access_denied_without_error_reason_is_a_refusal_too(
    gw: RunningGateway, api: Api, browser: Browser
) -> None:
    started = await api.start("acme", "instagram")
    url = URL(gw.http_url + "/oauth/instagram/callback").with_query(
        error="access_denied", state=started.state
    )
    landing = await browser.get(str(url))
    assert landing.status == 302
    assert landing.query == {"tab": "instagram", "status": "denied"}


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ({"error": "server_error"}, "OAUTH_SERVER_ERROR"),
        ({"error": "temporarily_unavailable"}, "OAUTH_TEMPORARILY_UNAVAILABLE"),
        ({"error": "invalid_scope", "error_description": "bad scope"}, "OAUTH_INVALID_SCOPE"),
        ({"error": "access_denied", "error_reason": "other_reason"}, "OAUTH_ACCESS_DENIED"),
        ({"error": "<b>made up</b>", "error_reason": "user_denied"}, "OAUTH_ERROR"),
    ],
)
async def test_an_error_other_than_the_users_refusal_is_status_error_with_its_reason(
    gw: RunningGateway, api: Api, browser: Browser, query: dict[str, str], reason: str
) -> None:
    started = await api.start("acme", "instagram")
    url = URL(gw.http_url + "/oauth/instagram/callback").with_query(
        {**query, "state": started.state}
    )

    landing = await browser.get(str(url))

    assert landing.status == 302
    assert landing.location.startswith(RETURN_URL)
    assert landing.query == {"tab": "instagram", "status": "error", "reason": reason}
    await assert_nothing_stored(gw, api, "acme")
    # The flow is over: the state was spent.
    assert (await browser.get(str(url))).status == 400


async def test_a_channel_error_without_return_url_answers_an_error_page(
    gw: RunningGateway, api: Api, browser: Browser
) -> None:
    started = await api.start("acme", "instagram", return_url="")
    url = URL(gw.http_url + "/oauth/instagram/callback").with_query(
        error="server_error", state=started.state
    )
    landing = await browser.get(str(url))
    assert landing.status == 502
    assert "OAUTH_SERVER_ERROR" in landing.text
    assert "declined" not in landing.text


async def test_a_head_on_the_callback_is_405_and_leaves_the_flow_to_the_get(
    gw: RunningGateway, api: Api, browser: Browser
) -> None:
    started = await api.start("acme", "instagram")
    callback = await browser.authorize(started.authorization_url)

    # A link scanner or a preview fetching the URL first.
    async with browser.session.head(callback, allow_redirects=False) as reply:
        assert reply.status == 405
    await assert_nothing_stored(gw, api, "acme")

    landing = await browser.get(callback)
    assert landing.status == 302
    assert landing.query["status"] == "connected"


async def test_a_forged_state_is_refused_with_400_and_nothing_stored(
    gw: RunningGateway, api: Api, browser: Browser
) -> None:
    started = await api.start("acme", "instagram")
    callback = await browser.authorize(started.authorization_url)
    forged = callback.replace(started.state, "forged" + started.state[6:])

    landing = await browser.get(forged)

    assert landing.status == 400
    assert "no longer valid" in landing.text
    await assert_nothing_stored(gw, api, "acme")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_a_reused_state_is_refused_the_second_time(
    gw: RunningGateway, tenant: str, api: Api, browser: Browser
) -> None:
    started = await api.start(tenant, "instagram")
    callback = await browser.authorize(started.authorization_url)
    first, second = await asyncio.gather(browser.get(callback), browser.get(callback))
    assert sorted([first.status, second.status]) == [302, 400]
    assert len(await api.list(tenant)) == 1


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_an_expired_state_is_refused(
    gw: RunningGateway, tenant: str, api: Api, browser: Browser
) -> None:
    assert gw.gateway.connect is not None
    gw.gateway.connect.state_ttl = timedelta(milliseconds=50)
    started = await api.start(tenant, "instagram")
    callback = await browser.authorize(started.authorization_url)
    await asyncio.sleep(0.2)

    landing = await browser.get(callback)

    assert landing.status == 400
    await assert_nothing_stored(gw, api, tenant)


async def test_complete_connect_refuses_unknown_states_as_invalid_argument(
    api: Api, browser: Browser
) -> None:
    started = await api.start("acme", "instagram")
    code, state = code_and_state(await browser.authorize(started.authorization_url))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.complete(code, "not-" + state)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert (info.reason, info.metadata["field"]) == ("OAUTH_STATE_INVALID", "state")


@pytest.mark.parametrize(
    "return_url",
    [
        "https://evil.example/callback",
        "http://dashboard.example/settings",  # another scheme is another origin
        "https://dashboard.example.evil.example/",
        "https://dashboard.example@evil.example/",
        "javascript:alert(1)",
        "/relative/path",
        "https://[::1/settings",  # urllib refuses to split it at all
    ],
)
async def test_a_return_url_outside_the_allowed_origins_is_invalid_argument(
    api: Api, return_url: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.start("acme", "instagram", return_url=return_url)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "return_url"


async def test_start_connect_validates_tenant_channel_and_flow(
    gw: RunningGateway, api: Api
) -> None:
    cases = [
        (connect_pb2.StartConnectRequest(channel="instagram"), "INVALID_ARGUMENT", "tenant_id"),
        (connect_pb2.StartConnectRequest(tenant_id="acme"), "INVALID_ARGUMENT", "channel"),
        (
            connect_pb2.StartConnectRequest(tenant_id="acme", channel="instagram", login_flow="x"),
            "INVALID_ARGUMENT",
            "login_flow",
        ),
        (connect_pb2.StartConnectRequest(tenant_id="acme", channel="telegraph"), "NOT_FOUND", ""),
    ]
    for request, code, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.stub.StartConnect(request, metadata=api.meta)
        assert caught.value.code().name == code, request
        if field:
            assert error_info(caught.value).metadata["field"] == field

    token, _ = await create_token(gw.gateway.store, name="acme", tenants=["acme"], scopes=[])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.StartConnect(
            connect_pb2.StartConnectRequest(tenant_id="globex", channel="instagram"),
            metadata=bearer(token),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_complete_connect_checks_the_flows_tenant_against_the_caller(
    gw: RunningGateway, api: Api, browser: Browser
) -> None:
    started = await api.start("globex", "instagram")
    code, state = code_and_state(await browser.authorize(started.authorization_url))
    token, _ = await create_token(gw.gateway.store, name="acme", tenants=["acme"], scopes=[])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.CompleteConnect(
            connect_pb2.CompleteConnectRequest(channel="instagram", code=code, state=state),
            metadata=bearer(token),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await assert_nothing_stored(gw, api, "globex")
    # The refused caller did not spend the flow: the tenant's own call still completes it.
    done = await api.stub.CompleteConnect(
        connect_pb2.CompleteConnectRequest(channel="instagram", code=code, state=state),
        metadata=bearer(gw.token),
    )
    assert done.connection.tenant_id == "globex"


async def test_complete_connect_takes_the_channel_from_the_state_and_refuses_others_first(
    gw: RunningGateway, api: Api, browser: Browser
) -> None:
    started = await api.start("acme", "instagram")
    code, state = code_and_state(await browser.authorize(started.authorization_url))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.CompleteConnect(
            connect_pb2.CompleteConnectRequest(channel="telegram", code=code, state=state),
            metadata=bearer(gw.token),
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "CHANNEL_NOT_FOUND"
    # A redirect gives the dashboard code and state: the state knows its channel.
    done = await api.stub.CompleteConnect(
        connect_pb2.CompleteConnectRequest(code=code, state=state), metadata=bearer(gw.token)
    )
    assert done.connection.channel == "instagram"
    assert done.connection.tenant_id == "acme"


@pytest.mark.parametrize("flow", ["instagram", "facebook"])
async def test_a_meta_error_during_the_exchange_stores_nothing_and_says_why(
    gw: RunningGateway, api: Api, browser: Browser, control: SandboxClient, flow: str
) -> None:
    await control.inject_error(100, endpoint="oauth", message="(#100) Sandbox says no")
    started = await api.start("acme", flow)

    landing = await browser.connect(started.authorization_url)

    assert landing.status == 302
    assert landing.query["status"] == "error"
    assert landing.query["reason"] == "CHANNEL_REQUEST_INVALID"
    await assert_nothing_stored(gw, api, "acme")


async def test_an_invalid_code_through_complete_connect_names_metas_reason(
    gw: RunningGateway, api: Api
) -> None:
    started = await api.start("acme", "instagram", return_url="")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.complete("not-a-code", started.state)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Invalid authorization code" in (caught.value.details() or "")
    # Like every INVALID_ARGUMENT, it names the field, with Meta's reason beside it.
    info = error_info(caught.value)
    assert info.metadata["field"] == "code"
    assert info.reason == "CHANNEL_REQUEST_INVALID"
    assert (caught.value.details() or "").startswith("code: ")
    await assert_nothing_stored(gw, api, "acme")


async def test_a_failing_subscription_stores_nothing(
    gw: RunningGateway, api: Api, browser: Browser, control: SandboxClient
) -> None:
    await control.inject_error(2, endpoint="subscribed_apps")
    started = await api.start("acme", "instagram", return_url="")
    landing = await browser.connect(started.authorization_url)
    assert landing.status == 502
    assert "Not connected" in landing.text
    await assert_nothing_stored(gw, api, "acme")
