"""Connecting when things overlap: a reconnect with the other login flow, a code that is
only the provider's redirect suffix, a Disconnect while a token is being refreshed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import grpc.aio
import pytest
from switchboard.v1 import common_pb2

from channels.instagram.sandbox import SandboxClient
from gateway.domain.models import Connection
from gateway.services.refresh import RefreshWorker
from tests.connect.conftest import BACKENDS, Api, Browser, code_and_state, connect_account
from tests.gateway_harness import RunningGateway
from tests.helpers import error_info


async def test_switching_login_flow_on_reconnect_leaves_no_subscription_after_disconnect(
    gw: RunningGateway, api: Api, browser: Browser, control: SandboxClient
) -> None:
    """Connected with Instagram Login (subscription on the IG account), reconnected with
    Facebook Login (subscription on the page): the first subscription is removed with its
    own token at the reconnect, so that after Disconnect Meta sends nothing more."""
    account = await control.create_account(page=True)
    ig_id = account["ig_id"]
    await control.next_approval(accounts=[ig_id])
    first = await connect_account(api, browser, "acme", "instagram")
    await control.next_approval(accounts=[ig_id])
    second = await connect_account(api, browser, "acme", "facebook")
    assert second.id == first.id
    assert second.login_flow == "facebook"

    gone = await api.disconnect(second.id)

    assert gone.status == common_pb2.CONNECTION_STATUS_DISCONNECTED
    left = [s for s in await control.subscriptions() if ig_id in (s["object_id"], s["account"])]
    assert left == [], f"still subscribed after Disconnect ({gone.last_error!r}): {left}"


async def test_a_code_that_is_only_the_instagram_suffix_is_refused_before_spending_the_state(
    api: Api, browser: Browser
) -> None:
    """connect.proto: "A refusal before the code exchange leaves the state usable". A code
    of just "#_" (Instagram's redirect suffix) is no code: INVALID_ARGUMENT naming it, and
    the real code still completes with the same state."""
    started = await api.start("acme", "instagram", return_url="")
    code, state = code_and_state(await browser.authorize(started.authorization_url))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.complete("#_", state)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "code"

    done = await api.complete(code, state)
    assert done.connection.status == common_pb2.CONNECTION_STATUS_CONNECTED


class _PausingTx:
    """A transaction whose get_connection runs ``after_read`` once the row was read."""

    def __init__(self, tx: Any, after_read: Callable[[], Awaitable[None]]) -> None:
        self._tx = tx
        self._after_read = after_read

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    async def get_connection(
        self, connection_id: str, *, for_update: bool = False
    ) -> Connection | None:
        found = await self._tx.get_connection(connection_id, for_update=for_update)
        await self._after_read()
        return found


class _PausingStore:
    def __init__(self, store: Any, after_read: Callable[[], Awaitable[None]]) -> None:
        self._store = store
        self._after_read = after_read

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    @contextlib.asynccontextmanager
    async def transaction(self, *, pipelined: bool = False) -> AsyncIterator[Any]:
        async with self._store.transaction(pipelined=pipelined) as tx:
            yield _PausingTx(tx, self._after_read)


@pytest.mark.parametrize("backend", [BACKENDS[1]], indirect=True)
async def test_a_disconnect_during_a_refresh_stays_disconnected(
    gw: RunningGateway, tenant: str, api: Api, browser: Browser, control: SandboxClient
) -> None:
    """The refresh writes back the connection row it read: it locks it, so a Disconnect
    that comes meanwhile waits and then disconnects what the refresh wrote, rather than
    being undone by it (CONNECTED again with a live credential, on PostgreSQL)."""
    conn = await connect_account(api, browser, tenant)
    later = datetime.now(UTC) + timedelta(days=31)
    await control.advance_clock(timedelta(days=31).total_seconds())
    gateway = gw.gateway
    assert gateway.connect is not None
    assert gateway.keyring is not None
    connect = gateway.connect
    disconnecting: list[asyncio.Task[Any]] = []

    async def disconnect_now() -> None:
        # Once: the Disconnect runs beside the refresh, which goes on after a second (the
        # Disconnect is over by then, or waits for the refresh's row lock).
        if not disconnecting:
            disconnecting.append(asyncio.create_task(connect.disconnect(conn.id)))
            await asyncio.wait(disconnecting, timeout=1.0)

    worker = RefreshWorker(
        _PausingStore(gateway.store, disconnect_now),  # type: ignore[arg-type]
        gateway.channels,
        gateway.keyring,
    )
    await worker.refresh_due(later)
    assert disconnecting
    await disconnecting[0]

    after = await api.get(conn.id)
    async with gateway.store.transaction() as tx:
        credential = await tx.get_credential(conn.id)
    assert (common_pb2.ConnectionStatus.Name(after.status), credential is None) == (
        "CONNECTION_STATUS_DISCONNECTED",
        True,
    )
