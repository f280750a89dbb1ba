"""Reconnecting, the same account for another tenant, disconnecting, and what is stored."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from switchboard.v1 import common_pb2

from channels.instagram.sandbox import RunningSandbox, SandboxClient
from gateway.security.keyring import DecryptionError
from gateway.services.credentials import unseal
from tests.connect.conftest import (
    Api,
    Browser,
    code_and_state,
    connect_account,
    sandbox_secrets,
    wait_for_events,
)
from tests.gateway_harness import RunningGateway


async def test_reconnecting_the_same_account_updates_the_connection(
    gw: RunningGateway, api: Api, browser: Browser, control: SandboxClient
) -> None:
    account = await control.create_account(page=False)
    await control.next_approval(accounts=[account["ig_id"]])
    first = await connect_account(api, browser, "acme")
    await control.next_approval(accounts=[account["ig_id"]])

    second = await connect_account(api, browser, "acme")

    assert second.id == first.id
    assert second.created_at == first.created_at
    assert [c.id for c in await api.list("acme")] == [first.id]
    reasons = [p.get("reason") for p in await wait_for_events(gw, first.id, 2)]
    assert reasons == ["connected", "reconnected"]


async def test_another_tenant_cannot_take_a_connected_account_until_it_is_disconnected(
    api: Api, browser: Browser, control: SandboxClient
) -> None:
    account = await control.create_account(page=False)
    await control.next_approval(accounts=[account["ig_id"]])
    owned = await connect_account(api, browser, "acme")

    await control.next_approval(accounts=[account["ig_id"]])
    started = await api.start("globex")
    landing = await browser.connect(started.authorization_url)
    assert landing.query["status"] == "error"
    assert landing.query["reason"] == "ACCOUNT_ALREADY_CONNECTED"

    await control.next_approval(accounts=[account["ig_id"]])
    started = await api.start("globex")
    code, state = code_and_state(await browser.authorize(started.authorization_url))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.complete(code, state)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await api.list("globex") == []

    await api.disconnect(owned.id)
    await control.next_approval(accounts=[account["ig_id"]])
    taken = await connect_account(api, browser, "globex")
    assert taken.id != owned.id
    assert taken.account.external_id == account["ig_id"]


async def test_a_needs_reauth_connection_is_restored_by_connecting_again(
    gw: RunningGateway, api: Api, browser: Browser, control: SandboxClient
) -> None:
    from gateway.services.connection_status import mark_needs_reauth

    account = await control.create_account(page=False)
    await control.next_approval(accounts=[account["ig_id"]])
    conn = await connect_account(api, browser, "acme")
    await mark_needs_reauth(gw.gateway.store, conn.id, "token revoked")
    assert (await api.get(conn.id)).status == common_pb2.CONNECTION_STATUS_NEEDS_REAUTH

    await control.next_approval(accounts=[account["ig_id"]])
    again = await connect_account(api, browser, "acme")

    assert again.id == conn.id
    assert again.status == common_pb2.CONNECTION_STATUS_CONNECTED
    assert again.last_error == ""
    events = await wait_for_events(gw, conn.id, 3)
    assert events[-1]["previous_status"] == "CONNECTION_STATUS_NEEDS_REAUTH"


async def test_disconnect_unsubscribes_destroys_credentials_and_is_idempotent(
    gw: RunningGateway, api: Api, browser: Browser, control: SandboxClient
) -> None:
    conn = await connect_account(api, browser, "acme")
    assert conn.account.external_id in {s["object_id"] for s in await control.subscriptions()}

    gone = await api.disconnect(conn.id)
    again = await api.disconnect(conn.id)

    assert gone.status == common_pb2.CONNECTION_STATUS_DISCONNECTED
    assert gone.last_error == ""
    assert again == gone
    assert conn.account.external_id not in {s["object_id"] for s in await control.subscriptions()}
    async with gw.gateway.store.transaction() as tx:
        assert await tx.get_credential(conn.id) is None
    events = await wait_for_events(gw, conn.id, 2)
    assert len(events) == 2  # the second Disconnect changed nothing, so said nothing
    assert events[-1]["connection"]["status"] == "CONNECTION_STATUS_DISCONNECTED"
    assert events[-1]["previous_status"] == "CONNECTION_STATUS_CONNECTED"
    assert events[-1]["reason"] == "disconnected; webhooks unsubscribed"


async def test_disconnect_records_a_failed_unsubscribe_and_still_disconnects(
    gw: RunningGateway, api: Api, browser: Browser, control: SandboxClient
) -> None:
    conn = await connect_account(api, browser, "acme")
    await control.inject_error(2, endpoint="subscribed_apps", account=conn.account.external_id)

    gone = await api.disconnect(conn.id)

    assert gone.status == common_pb2.CONNECTION_STATUS_DISCONNECTED
    assert "not" in gone.last_error or "refused" in gone.last_error
    assert "CHANNEL_TRANSIENT" in gone.last_error
    async with gw.gateway.store.transaction() as tx:
        assert await tx.get_credential(conn.id) is None


async def test_disconnect_of_an_unknown_connection_is_not_found(api: Api) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.disconnect("conn_nope")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("flow", ["instagram", "facebook"])
async def test_stored_credentials_hold_no_token_and_open_only_on_their_row(
    gw: RunningGateway, api: Api, browser: Browser, sandbox: RunningSandbox, flow: str
) -> None:
    conn = await connect_account(api, browser, "acme", flow)
    other = await connect_account(api, browser, "acme", flow)
    async with gw.gateway.store.transaction() as tx:
        credential = await tx.get_credential(conn.id)
    assert credential is not None
    assert credential.key_id == "test1"
    for secret in sandbox_secrets(sandbox):
        assert secret.encode() not in credential.ciphertext

    assert gw.gateway.keyring is not None
    token = unseal(gw.gateway.keyring, credential)
    assert token.value.reveal() in sandbox.state.tokens
    assert "***" in repr(token)
    moved = type(credential)(
        connection_id=other.id, key_id=credential.key_id, ciphertext=credential.ciphertext
    )
    with pytest.raises(DecryptionError):
        unseal(gw.gateway.keyring, moved)
