"""What a client generated in any language meets: proto3 cannot tell an unset string from
an empty one, so a missing required field must read as the request's fault, the same
whatever the token; and a bad field is named by the standard google.rpc details, read
from the raw trailer without grpcio-status."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import grpc.aio
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from switchboard.v1 import connect_pb2, connect_pb2_grpc, messaging_pb2, messaging_pb2_grpc

from gateway.security.tokens import create_token
from tests.gateway_harness import RunningGateway
from tests.helpers import bearer, error_info


@pytest.mark.parametrize("tenants", [["acme"], ["*"]], ids=["one-tenant token", "any-tenant token"])
async def test_an_empty_tenant_id_is_invalid_argument_naming_the_field(
    embedded: RunningGateway, channel: grpc.aio.Channel, tenants: list[str]
) -> None:
    token, _ = await create_token(embedded.gateway.store, name="t", tenants=tenants, scopes=[])
    auth = bearer(token)
    connect = connect_pb2_grpc.ChannelConnectStub(channel)
    messaging = messaging_pb2_grpc.MessagingStub(channel)
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "ListConnections": lambda: connect.ListConnections(
            connect_pb2.ListConnectionsRequest(), metadata=auth
        ),
        "StartConnect": lambda: connect.StartConnect(
            connect_pb2.StartConnectRequest(channel="instagram"), metadata=auth
        ),
        "ListConversations": lambda: messaging.ListConversations(
            messaging_pb2.ListConversationsRequest(), metadata=auth
        ),
        "SendMessage": lambda: messaging.SendMessage(
            messaging_pb2.SendMessageRequest(
                connection_id="conn_x", conversation_id="cnv_x", text="hi"
            ),
            metadata=auth,
        ),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert error_info(caught.value).metadata["field"] == "tenant_id", name
        assert (caught.value.details() or "").startswith("tenant_id:"), name


async def test_another_tenant_is_still_permission_denied(
    embedded: RunningGateway, channel: grpc.aio.Channel
) -> None:
    token, _ = await create_token(embedded.gateway.store, name="t", tenants=["acme"], scopes=[])
    messaging = messaging_pb2_grpc.MessagingStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await messaging.ListConversations(
            messaging_pb2.ListConversationsRequest(tenant_id="globex"), metadata=bearer(token)
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "TENANT_NOT_ALLOWED"


async def test_a_bad_field_is_named_by_error_info_and_bad_request_in_the_raw_trailer(
    embedded: RunningGateway, channel: grpc.aio.Channel
) -> None:
    """Decoded as another language's client does it: the grpc-status-details-bin trailer
    is a google.rpc.Status; its details are ErrorInfo, then BadRequest."""
    connect = connect_pb2_grpc.ChannelConnectStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await connect.ListConnections(
            connect_pb2.ListConnectionsRequest(tenant_id="acme", page_size=501),
            metadata=bearer(embedded.token),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailers = dict(caught.value.trailing_metadata() or ())
    raw = trailers["grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    status = status_pb2.Status.FromString(raw)
    assert status.code == code_pb2.INVALID_ARGUMENT
    assert status.message == caught.value.details()
    assert [d.type_url for d in status.details] == [
        "type.googleapis.com/google.rpc.ErrorInfo",
        "type.googleapis.com/google.rpc.BadRequest",
    ]
    info = error_details_pb2.ErrorInfo.FromString(status.details[0].value)
    assert (info.domain, info.metadata["field"]) == ("switchboard.dev", "page_size")
    bad = error_details_pb2.BadRequest.FromString(status.details[1].value)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("page_size", "must be at most 500")
    ]


async def test_other_errors_carry_error_info_alone(
    embedded: RunningGateway, channel: grpc.aio.Channel
) -> None:
    messaging = messaging_pb2_grpc.MessagingStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await messaging.GetMessage(
            messaging_pb2.GetMessageRequest(message_id="msg_nope"),
            metadata=bearer(embedded.token),
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    raw = dict(caught.value.trailing_metadata() or ())["grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    status = status_pb2.Status.FromString(raw)
    assert [d.type_url for d in status.details] == ["type.googleapis.com/google.rpc.ErrorInfo"]


async def test_send_message_names_the_recipient_field_it_lacks_or_cannot_use(
    embedded: RunningGateway, channel: grpc.aio.Channel
) -> None:
    """connection_id may be left empty with a conversation_id, so an empty one is not what
    a client is told about: the recipient oneof when neither is set, conversation_id when
    it names no conversation of the tenant; connection_id only with a recipient_id."""
    messaging = messaging_pb2_grpc.MessagingStub(channel)
    cases: list[tuple[dict[str, str], str, str]] = [
        ({}, "recipient", "set conversation_id or recipient_id"),
        (
            {"conversation_id": "cnv_nope"},
            "conversation_id",
            "is not a conversation of this tenant's connections",
        ),
        (
            {"recipient_id": "1234"},
            "connection_id",
            "must not be empty when recipient_id is set (or set conversation_id instead)",
        ),
    ]
    for fields, field, description in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await messaging.SendMessage(
                messaging_pb2.SendMessageRequest(tenant_id="acme", text="hi", **fields),
                metadata=bearer(embedded.token),
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        raw = dict(caught.value.trailing_metadata() or ())["grpc-status-details-bin"]
        assert isinstance(raw, bytes)
        status = status_pb2.Status.FromString(raw)
        bad = error_details_pb2.BadRequest.FromString(status.details[1].value)
        assert [(v.field, v.description) for v in bad.field_violations] == [(field, description)]
