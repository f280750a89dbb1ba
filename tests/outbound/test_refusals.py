"""What SendMessage refuses, and that a refused call stores and sends nothing."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from switchboard.v1 import common_pb2, messaging_pb2

from gateway.domain.models import ConnectionStatus
from tests.gateway_harness import store_connection
from tests.helpers import error_info
from tests.outbound.conftest import Out, customer_writes


async def refused(out: Out, **fields: Any) -> tuple[grpc.StatusCode, error_details_pb2.ErrorInfo]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await out.send(**fields)
    return caught.value.code(), error_info(caught.value)


async def stored_messages(out: Out) -> int:
    async with out.gateway.gateway.store.transaction() as tx:
        page = await tx.list_messages(out.conversation.id, page_size=100)
    return sum(1 for m in page.items if m.direction.value == "OUTBOUND")


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("text_over_1000_bytes", {"text": "é" * 501}, "text"),
    (
        "fourteen_quick_replies",
        {
            "text": "pick",
            "quick_replies": [
                messaging_pb2.QuickReply(title=f"o{i}", payload="p") for i in range(14)
            ],
        },
        "quick_replies",
    ),
    (
        "quick_reply_title_over_20",
        {"text": "pick", "quick_replies": [messaging_pb2.QuickReply(title="x" * 21, payload="p")]},
        "quick_replies[0].title",
    ),
    (
        "http_attachment",
        {
            "attachment": messaging_pb2.OutboundAttachment(
                type=common_pb2.ATTACHMENT_TYPE_IMAGE, url="http://cdn.example/a.png"
            )
        },
        "attachment.url",
    ),
    (
        "attachment_url_that_does_not_parse",
        {
            "attachment": messaging_pb2.OutboundAttachment(
                type=common_pb2.ATTACHMENT_TYPE_IMAGE, url="https://[::1/a.png"
            )
        },
        "attachment.url",
    ),
    ("no_content", {}, "content"),
    ("unknown_recipient", {"text": "hi", "recipient_id": "999999"}, "recipient_id"),
    ("no_recipient", {"text": "hi", "recipient_id": ""}, "recipient"),
    # A channel user id means something only within one connection.
    ("recipient_id_without_connection", {"text": "hi", "connection_id": ""}, "connection_id"),
    ("unknown_conversation", {"text": "hi", "conversation_id": "cnv_nope"}, "conversation_id"),
    (
        "unknown_conversation_without_connection",
        {"text": "hi", "connection_id": "", "conversation_id": "cnv_nope"},
        "conversation_id",
    ),
    ("bad_tag", {"text": "hi", "tag": "CONFIRMED_EVENT_UPDATE"}, "tag"),
    # U+0000 is valid in a proto3 string but PostgreSQL stores it nowhere: refused on every
    # backend rather than INTERNAL on one and sent on the other.
    ("nul_in_text", {"text": "a\x00b"}, "text"),
    (
        "nul_in_quick_reply_payload",
        {"text": "pick", "quick_replies": [messaging_pb2.QuickReply(title="A", payload="p\x00")]},
        "quick_replies[0].payload",
    ),
]


@pytest.mark.parametrize(("name", "fields", "field"), INVALID, ids=[c[0] for c in INVALID])
async def test_invalid_requests_name_the_field_and_store_nothing(
    out: Out, name: str, fields: dict[str, Any], field: str
) -> None:
    code, info = await refused(out, idempotency_key=f"k-{name}", **fields)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.metadata["field"] == field
    assert await stored_messages(out) == 0
    assert await out.bodies() == []


async def test_a_nul_in_the_idempotency_key_is_refused_naming_it(out: Out) -> None:
    code, info = await refused(out, text="hi", idempotency_key="k\x00")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.metadata["field"] == "idempotency_key"
    assert await stored_messages(out) == 0


async def details(out: Out, **fields: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await out.send(**fields)
    return caught.value.code(), caught.value.details() or ""


async def test_a_conversation_of_another_tenant_is_not_a_recipient(out: Out) -> None:
    """Named with our connection or alone: INVALID_ARGUMENT naming conversation_id, the
    answer an unknown id gets, so that nothing tells it exists elsewhere."""
    account = await out.control.create_account(username="other")
    other = await store_connection(out.gateway, out.control, account, tenant="someone-else")
    _, conversation, _ = await customer_writes(out.gateway, out.control, other)
    code, info = await refused(out, text="hi", conversation_id=conversation.id)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.metadata["field"] == "conversation_id"
    assert await details(out, text="hi", connection_id="", conversation_id=conversation.id) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "conversation_id: is not a conversation of this tenant's connections",
    )
    assert await details(out, text="hi", connection_id="", conversation_id="cnv_nope") == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "conversation_id: is not a conversation of this tenant's connections",
    )
    assert await out.control.sent(str(account["ig_id"])) == []


async def test_a_conversation_of_the_tenants_other_connection_is_refused_naming_it(
    out: Out,
) -> None:
    account = await out.control.create_account(username="second")
    second = await store_connection(out.gateway, out.control, account, tenant=out.tenant)
    _, conversation, _ = await customer_writes(out.gateway, out.control, second)
    assert await details(out, text="hi", conversation_id=conversation.id) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        f"conversation_id: is not a conversation of connection {out.connection.id}",
    )
    assert await out.control.sent(str(account["ig_id"])) == []
    assert await out.bodies() == []


async def test_a_missing_recipient_or_its_missing_connection_is_named(out: Out) -> None:
    for connection_id in (out.connection.id, ""):
        assert await details(out, text="hi", connection_id=connection_id, recipient_id="") == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "recipient: set conversation_id or recipient_id",
        )
    assert await details(out, text="hi", connection_id="") == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "connection_id: must not be empty when recipient_id is set"
        " (or set conversation_id instead)",
    )


async def test_a_connection_of_another_tenant_is_not_found(out: Out) -> None:
    code, _ = await refused(out, text="hi", tenant_id="not-the-owner")
    assert code == grpc.StatusCode.NOT_FOUND
    account = await out.control.create_account(username="foreign")
    foreign = await store_connection(out.gateway, out.control, account, tenant="someone-else")
    igsid, conversation, _ = await customer_writes(out.gateway, out.control, foreign)
    # Named by the caller's tenant: as if it did not exist, whatever the recipient.
    for recipient in ({"recipient_id": igsid}, {"conversation_id": conversation.id}):
        code, info = await refused(out, text="hi", connection_id=foreign.id, **recipient)
        assert code == grpc.StatusCode.NOT_FOUND
        assert info.metadata["connection_id"] == foreign.id
    assert await out.control.sent(str(account["ig_id"])) == []


async def test_an_unknown_connection_is_not_found(out: Out) -> None:
    assert await details(out, text="hi", connection_id="conn_nope") == (
        grpc.StatusCode.NOT_FOUND,
        "no connection 'conn_nope' for this tenant",
    )


@pytest.mark.parametrize("status", [ConnectionStatus.DISCONNECTED, ConnectionStatus.NEEDS_REAUTH])
async def test_a_connection_that_cannot_send_is_a_failed_precondition(
    out: Out, status: ConnectionStatus
) -> None:
    conn = out.connection
    conn.status = status
    conn.last_error = "token expired"
    async with out.gateway.gateway.store.transaction() as tx:
        await tx.save_connection(conn)
    code, info = await refused(out, text="hi")
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.reason == f"CONNECTION_{status.value}"
    assert info.metadata["status"] == status.value
    assert await stored_messages(out) == 0
    assert await out.bodies() == []
