"""A whole gateway against a sandbox, per backend, with a connected account and a customer
who has written to it: what every SendMessage test starts from.

``embedded`` is SQLite with the in-process bus and rate limiter; ``postgres+redis`` gets a
database of its own per test and a Redis key prefix of its own. Retries are configured
short so that the tests stay fast.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from switchboard.v1 import common_pb2, messaging_pb2, messaging_pb2_grpc

from channels.instagram.sandbox import (
    RunningSandbox,
    SandboxClient,
    SandboxSettings,
    start_sandbox,
)
from gateway.domain.events import Event, EventKind
from gateway.domain.models import Connection, Conversation
from gateway.domain.outbound import RateCategory
from gateway.domain.store import Store
from gateway.security.keyring import KeyRing, generate_key_spec
from gateway.services.outbound_delivery import Clock, Deliverer, DeliveryPolicy
from gateway.services.outbox import OutboxWriter
from gateway.services.ratelimit import MemoryRateLimiter
from tests.gateway_harness import RunningGateway, gateway_environ, run_gateway, store_connection
from tests.helpers import bearer, fresh_database, published_events

BACKENDS = ["embedded", pytest.param("postgres+redis", marks=[pytest.mark.postgres])]

FAST_RETRIES = {
    "SWITCHBOARD_SEND_RETRY_BASE_SECONDS": "0.05",
    "SWITCHBOARD_SEND_RETRY_MAX_SECONDS": "0.2",
    "SWITCHBOARD_SEND_POLL_SECONDS": "0.05",
    "SWITCHBOARD_SEND_MAX_ATTEMPTS": "3",
    "SWITCHBOARD_SEND_WAIT_SECONDS": "5",
}


@dataclass
class Out:
    backend: str
    gateway: RunningGateway
    sandbox: RunningSandbox
    control: SandboxClient
    account: dict[str, Any]
    connection: Connection
    customer: str
    conversation: Conversation
    stub: messaging_pb2_grpc.MessagingStub
    environ: dict[str, str] = field(default_factory=dict)

    @property
    def ig_id(self) -> str:
        return str(self.account["ig_id"])

    @property
    def tenant(self) -> str:
        return self.connection.tenant_id

    def request(self, **fields: Any) -> messaging_pb2.SendMessageRequest:
        fields.setdefault("tenant_id", self.tenant)
        fields.setdefault("connection_id", self.connection.id)
        if "conversation_id" not in fields:
            fields.setdefault("recipient_id", self.customer)
        return messaging_pb2.SendMessageRequest(**fields)

    async def send(self, **fields: Any) -> messaging_pb2.SendMessageResponse:
        return await self.stub.SendMessage(
            self.request(**fields), metadata=bearer(self.gateway.token)
        )

    async def get(self, message_id: str) -> common_pb2.Message:
        return await self.stub.GetMessage(
            messaging_pb2.GetMessageRequest(message_id=message_id),
            metadata=bearer(self.gateway.token),
        )

    async def throttle(self, minutes: int = 2) -> None:
        """Meta answers the account's next send with its throttling error (613), giving
        ``minutes`` until access comes back."""
        await self.control.inject_error(
            613,
            account=self.ig_id,
            message="Calls to this api have exceeded the rate limit.",
            estimated_time_to_regain_access=minutes,
        )

    async def bodies(self) -> list[dict[str, Any]]:
        """The Send API bodies the sandbox received for this account, in order."""
        return [r["body"] for r in await self.control.sent(self.ig_id)]

    async def wait_status(
        self, message_id: str, status: str, timeout_s: float = 10.0
    ) -> common_pb2.Message:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            message = await self.get(message_id)
            if common_pb2.MessageStatus.Name(message.status) == status:
                return message
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"message {message_id} is {common_pb2.MessageStatus.Name(message.status)},"
                    f" not {status}"
                )
            await asyncio.sleep(0.05)

    def advance(self, seconds: float) -> None:
        """Moves the gateway's send clock (the sandbox keeps its own)."""
        outbound = self.gateway.gateway.outbound
        assert outbound is not None
        outbound.deliverer.clock.advance(seconds)

    def other_deliverer(self, store: Store, policy: DeliveryPolicy | None = None) -> Deliverer:
        """A deliverer like the gateway's, as another replica's would be, on ``store``: the
        same channels, keys, limiter and clock (the caller closes it)."""
        gateway = self.gateway.gateway
        assert gateway.outbound is not None
        assert gateway.keyring is not None
        first = gateway.outbound.deliverer
        return Deliverer(
            store,
            gateway.channels,
            gateway.keyring,
            first.limiter,
            policy or first.policy,
            clock=first.clock,
            outbox=OutboxWriter(None),
        )

    async def events(self, kind: EventKind, count: int = 1, timeout_s: float = 10.0) -> list[Event]:
        """Published events of this connection of ``kind``, once at least ``count`` came."""
        bus = self.gateway.gateway.bus
        assert bus is not None
        return await published_events(
            bus,
            lambda e: e.connection_id == self.connection.id,
            kinds=[kind],
            count=count,
            timeout_s=timeout_s,
        )


async def customer_writes(
    gateway: RunningGateway, control: SandboxClient, conn: Connection, text: str = "Hi"
) -> tuple[str, Conversation, dict[str, Any]]:
    """A customer DMs the account; returns their IGSID, the conversation and the event."""
    sent = await control.send_dm(conn.account.external_id, text)
    assert sent["status"] == 200, sent
    igsid = str(sent["customer"])
    for _ in range(200):
        async with gateway.gateway.store.transaction() as tx:
            found = await tx.find_conversation_for_recipient(conn.id, igsid)
        if found is not None and found.last_inbound_at is not None:
            return igsid, found, sent
        await asyncio.sleep(0.02)
    raise AssertionError("the customer's message never reached the store")


@pytest.fixture(params=BACKENDS)
def out_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def out_database(out_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    if out_backend == "embedded":
        yield f"sqlite:///{tmp_path}/sb.db"
        return
    request.getfixturevalue("postgres_url")  # fails the run at once when PostgreSQL is down
    admin_url = str(request.getfixturevalue("postgres_admin_url"))
    with fresh_database(admin_url, "outbound") as url:
        yield url


@pytest.fixture
def out_extra() -> dict[str, str]:
    """Extra environment of the test's gateway (a test overrides it to tune limits)."""
    return {}


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    async with await start_sandbox(SandboxSettings.generate()) as running:
        yield running


@pytest.fixture
def out_environ(
    out_backend: str,
    out_database: str,
    out_extra: dict[str, str],
    sandbox: RunningSandbox,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> dict[str, str]:
    extra = {
        "INSTAGRAM_SANDBOX_URL": sandbox.url,
        **sandbox.settings.credentials(),
        **FAST_RETRIES,
        **out_extra,
    }
    if out_backend == "postgres+redis":
        prefix = str(request.getfixturevalue("redis_prefix"))
        extra["SWITCHBOARD_REDIS_URL"] = str(request.getfixturevalue("redis_url"))
        extra["SWITCHBOARD_REDIS_KEY_PREFIX"] = f"{prefix}out:{secrets.token_hex(3)}:"
    return gateway_environ(out_database, str(tmp_path), **extra)


@pytest.fixture
async def out(
    out_backend: str, out_environ: dict[str, str], sandbox: RunningSandbox
) -> AsyncIterator[Out]:
    async with (
        run_gateway(out_environ) as running,
        SandboxClient(sandbox.url) as control,
        grpc.aio.insecure_channel(running.grpc_target) as channel,
    ):
        account = await control.create_account(username="shop")
        await control.set_webhook(running.http_url + "/webhooks/instagram")
        tenant = f"t-{secrets.token_hex(3)}"
        conn = await store_connection(running, control, account, tenant=tenant)
        igsid, conversation, _ = await customer_writes(running, control, conn)
        yield Out(
            backend=out_backend,
            gateway=running,
            sandbox=sandbox,
            control=control,
            account=account,
            connection=conn,
            customer=igsid,
            conversation=conversation,
            stub=messaging_pb2_grpc.MessagingStub(channel),
            environ=out_environ,
        )


def channelless_deliverer(store: Store) -> Deliverer:
    """A Deliverer on ``store`` with no channel: for tests that record outcomes by hand."""
    return Deliverer(
        store,
        {},
        KeyRing.from_spec(generate_key_spec()),
        MemoryRateLimiter({RateCategory.TEXT: 100.0, RateCategory.MEDIA: 10.0}),
        DeliveryPolicy(),
        clock=Clock(),
    )
