"""Meta's echo of a message the gateway sent confirms it; it is not a MessageEchoed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import aiohttp
import orjson
from switchboard.v1 import common_pb2

from channels.instagram.parser import parse_delivery
from gateway.domain.connect import AccessToken
from gateway.domain.events import EventKind
from gateway.domain.inbound import IngestResult, RoutedItem
from gateway.domain.models import (
    Account,
    Connection,
    ConnectionStatus,
    Direction,
    Message,
    MessageStatus,
)
from gateway.services.credentials import unseal
from gateway.services.inbound_events import build_events
from tests.inbound.samples import IG_ID, envelope, samples
from tests.outbound.conftest import Out


async def subscribe(out: Out) -> None:
    gateway = out.gateway.gateway
    assert gateway.keyring is not None
    async with gateway.store.transaction() as tx:
        credential = await tx.get_credential(out.connection.id)
    assert credential is not None
    token: AccessToken = unseal(gateway.keyring, credential)
    connector = gateway.channels["instagram"].connector  # type: ignore[attr-defined]
    await connector.subscribe("instagram", out.connection.account, token)


async def test_our_echo_confirms_the_message(out: Out) -> None:
    await subscribe(out)
    reply = await out.send(text="Confirm me", idempotency_key="echo-1")
    await out.control.drain_echoes()
    updates = []
    for _ in range(100):
        updates = [
            e for e in await out.events(EventKind.DELIVERY_UPDATE, 3) if "confirmed_at" in e.payload
        ]
        if updates:
            break
    [confirmed] = updates
    assert confirmed.payload["message_id"] == reply.message.id
    assert confirmed.payload["status"] == "MESSAGE_STATUS_SENT"
    assert confirmed.payload["external_id"] == reply.message.external_id
    got = await out.get(reply.message.id)
    assert got.HasField("confirmed_at")
    # The echo carries Meta's clock, to the millisecond: never shown before sent_at.
    assert got.confirmed_at.ToDatetime() >= got.sent_at.ToDatetime()
    assert got.status == reply.message.status
    assert await out.events(EventKind.MESSAGE_ECHOED, timeout_s=0.3) == []
    async with out.gateway.gateway.store.transaction() as tx:
        page = await tx.list_messages(out.conversation.id, page_size=50)
    assert [m.id for m in page.items if m.direction.value == "OUTBOUND"] == [reply.message.id]


async def test_an_echo_of_another_app_is_still_a_message_echoed(out: Out) -> None:
    await subscribe(out)
    token = (await out.control.issue_token(out.ig_id, "instagram_long"))["access_token"]
    url = f"{out.sandbox.url}/graph-instagram/v21.0/{out.ig_id}/messages"
    body = {"recipient": {"id": out.customer}, "message": {"text": "From another app"}}
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as reply,
    ):
        assert reply.status == 200
    await out.control.drain_echoes()
    echoed = await out.events(EventKind.MESSAGE_ECHOED)
    assert [e.payload["message"]["text"] for e in echoed] == ["From another app"]


async def test_an_echo_that_overtakes_metas_answer_still_only_confirms(out: Out) -> None:
    """Meta's echo may arrive before its answer to the Send API call is recorded: the echo's
    message id is unknown then, and it must still not surface as a message sent from another
    app. The sandbox delivers it (and the gateway commits it) before answering."""
    await subscribe(out)
    await out.control.update_settings(echo_timing="before")
    reply = await out.send(text="Overtaken", idempotency_key="echo-race")
    assert reply.message.status == common_pb2.MESSAGE_STATUS_SENT
    [delivery] = [d for d in await out.control.deliveries() if d["kind"] == "echo"]
    assert delivery["status"] == 200  # stored before the answer came back
    got = await out.get(reply.message.id)
    assert got.HasField("confirmed_at")
    assert got.confirmed_at.ToDatetime() >= got.sent_at.ToDatetime()
    updates = await out.events(EventKind.DELIVERY_UPDATE, 3)
    assert [u.payload["status"] for u in updates] == ["MESSAGE_STATUS_QUEUED"] + [
        "MESSAGE_STATUS_SENT"
    ] * 2
    assert "confirmed_at" not in updates[1].payload  # the send, then its confirmation
    assert "confirmed_at" in updates[-1].payload
    assert await out.events(EventKind.MESSAGE_ECHOED, timeout_s=0.5) == []
    async with out.gateway.gateway.store.transaction() as tx:
        page = await tx.list_messages(out.conversation.id, page_size=50)
    assert [m.id for m in page.items if m.direction.value == "OUTBOUND"] == [reply.message.id]


def test_a_confirmation_is_dated_when_recorded_not_when_its_echo_came() -> None:
    """An echo received while our send's outcome was still being recorded waits for that
    commit to confirm the message: its update follows the SENT one on the stream, and must
    not be dated before it (a consumer ordering by time would see it confirmed, then sent)."""
    echo_received = datetime(2026, 1, 5, 10, 0, 0, tzinfo=UTC)
    sent_recorded = echo_received + timedelta(milliseconds=3)
    confirmed_at = echo_received + timedelta(milliseconds=5)
    parsed = parse_delivery(orjson.dumps(envelope(samples()["echo"])))
    [item] = parsed.items
    assert item.kind is EventKind.MESSAGE_ECHOED
    connection = Connection(
        id="conn_1",
        tenant_id="t1",
        channel="instagram",
        status=ConnectionStatus.CONNECTED,
        account=Account(external_id=IG_ID),
        login_flow="instagram",
    )
    ours = Message(
        id="msg_1",
        tenant_id="t1",
        connection_id="conn_1",
        conversation_id="cnv_1",
        channel="instagram",
        direction=Direction.OUTBOUND,
        status=MessageStatus.SENT,
        external_id=item.external_id,
        sent_at=sent_recorded,
        confirmed_at=sent_recorded,
    )
    routed = [RoutedItem(connection, item, echo_received)]
    results = [IngestResult(duplicate=True, message_id="msg_1", confirmed=ours)]

    [update] = build_events(routed, results, recorded_at=confirmed_at)
    assert update.kind is EventKind.DELIVERY_UPDATE
    assert update.payload["confirmed_at"]
    assert update.occurred_at == confirmed_at

    # Unless told, the time it runs: after the echo came, whatever the echo's own clock.
    before = datetime.now(UTC)
    [update] = build_events(routed, results)
    assert update.occurred_at >= before > echo_received
