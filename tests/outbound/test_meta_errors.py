"""Meta's error table (INSTAGRAM.md §6) as SendMessage outcomes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from switchboard.v1 import common_pb2

from gateway.config import Secret
from gateway.domain.connect import AccessToken
from gateway.domain.events import EventKind
from gateway.security.keyring import KeyRing, generate_key_spec
from gateway.services.credentials import seal
from tests.outbound.conftest import Out


async def test_a_rejected_token_turns_the_connection_needs_reauth(out: Out) -> None:
    await out.control.revoke(account=out.ig_id)
    reply = await out.send(text="Hello?")
    message = reply.message
    assert message.status == common_pb2.MESSAGE_STATUS_FAILED
    assert message.error.reason == "NEEDS_REAUTH"
    assert message.error.channel_code == 190
    assert message.error.channel_subcode == 460
    assert message.error.message
    async with out.gateway.gateway.store.transaction() as tx:
        conn = await tx.get_connection(out.connection.id)
    assert conn is not None
    assert conn.status.value == "NEEDS_REAUTH"
    [changed] = await out.events(EventKind.CONNECTION_CHANGED)
    assert changed.payload["connection"]["status"] == "CONNECTION_STATUS_NEEDS_REAUTH"


@pytest.mark.parametrize(
    ("code", "subcode", "reason"),
    [
        (551, 1545041, "RECIPIENT_UNAVAILABLE"),
        (10, 2018108, "RECIPIENT_UNAVAILABLE"),
        (200, 1545041, "RECIPIENT_UNAVAILABLE"),
        (200, 2018028, "CHANNEL_REQUEST_INVALID"),
        (100, 2018001, "CHANNEL_REQUEST_INVALID"),
        (100, 2018047, "CHANNEL_REQUEST_INVALID"),
        (10, 0, "PERMISSION_MISSING"),
    ],
)
async def test_permanent_errors_fail_at_once_with_metas_code(
    out: Out, code: int, subcode: int, reason: str
) -> None:
    """Only a permission the login lacks stops the connection; a refusal about one
    customer fails that message alone."""
    await out.control.inject_error(
        code, subcode=subcode, account=out.ig_id, message=f"(#{code}) Meta refused"
    )
    reply = await out.send(text="no luck")
    error = reply.message.error
    assert reply.message.status == common_pb2.MESSAGE_STATUS_FAILED
    assert (error.reason, error.channel_code, error.channel_subcode) == (reason, code, subcode)
    assert "Meta refused" in error.message
    assert not error.retryable
    got = await out.get(reply.message.id)
    assert len(got.attempts) == 1
    assert len(await out.bodies()) == 1
    async with out.gateway.gateway.store.transaction() as tx:
        conn = await tx.get_connection(out.connection.id)
    assert conn is not None
    expected = "NEEDS_REAUTH" if reason == "PERMISSION_MISSING" else "CONNECTED"
    assert conn.status.value == expected


async def test_a_credential_the_key_ring_cannot_open_names_the_key_and_the_variable(
    out: Out,
) -> None:
    """A key ring that lost the credential's key (a rotation rolled out the wrong way)."""
    foreign = KeyRing.from_spec(generate_key_spec("k-elsewhere"))
    sealed = seal(
        foreign,
        out.connection.id,
        AccessToken(value=Secret("IGAA-unreadable"), issued_at=datetime.now(UTC)),
    )
    async with out.gateway.gateway.store.transaction() as tx:
        await tx.put_credential(sealed)
    reply = await out.send(text="Hello?")
    error = reply.message.error
    assert reply.message.status == common_pb2.MESSAGE_STATUS_FAILED
    assert error.reason == "NEEDS_REAUTH"
    assert "k-elsewhere" in error.message
    assert "SWITCHBOARD_ENCRYPTION_KEYS" in error.message
