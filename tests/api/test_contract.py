"""The fixed names of DESIGN.md §3: other services and clients rely on them."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor
from switchboard.v1 import common_pb2, connect_pb2, events_pb2, messaging_pb2

from gateway.domain.events import EventKind


def fields(message: Descriptor) -> set[str]:
    return {f.name for f in message.fields}


def test_services_have_every_rpc() -> None:
    connect = connect_pb2.DESCRIPTOR.services_by_name["ChannelConnect"]
    assert {m.name for m in connect.methods} == {
        "ListChannels", "StartConnect", "CompleteConnect", "GetConnection", "ListConnections",
        "Disconnect",
    }  # fmt: skip
    messaging = messaging_pb2.DESCRIPTOR.services_by_name["Messaging"]
    assert {m.name for m in messaging.methods} == {
        "SendMessage", "GetMessage", "ListConversations", "GetConversation", "ListMessages",
        "Subscribe",
    }  # fmt: skip
    subscribe = messaging.methods_by_name["Subscribe"]
    assert subscribe.client_streaming
    assert subscribe.server_streaming


@pytest.mark.parametrize(
    ("message", "names"),
    [
        (connect_pb2.StartConnectRequest, {"tenant_id", "channel", "return_url", "login_flow"}),
        (connect_pb2.StartConnectResponse, {"authorization_url", "state", "expires_at"}),
        (connect_pb2.CompleteConnectRequest, {"channel", "code", "state"}),
        (connect_pb2.GetConnectionRequest, {"connection_id"}),
        (connect_pb2.DisconnectRequest, {"connection_id"}),
        (connect_pb2.ListConnectionsRequest, {"tenant_id", "page_size", "page_token"}),
        (common_pb2.Account, {"external_id", "username", "display_name", "picture_url"}),
        (
            common_pb2.Connection,
            {
                "id", "tenant_id", "channel", "status", "account", "scopes", "token_expires_at",
                "connected_at", "last_event_at", "last_error",
            },
        ),
        (
            common_pb2.Message,
            {
                "id", "conversation_id", "direction", "external_id", "sender", "text",
                "attachments", "reply_to", "quick_reply_payload", "created_at", "status", "error",
            },
        ),
        (
            messaging_pb2.SubscribeStart,
            {
                "group", "consumer", "tenant_ids", "channels", "kinds", "max_in_flight",
                "ack_deadline", "max_batch",
            },
        ),
        (messaging_pb2.Ack, {"delivery_ids"}),
        (messaging_pb2.Nack, {"delivery_id", "delay"}),
        (messaging_pb2.Delivery, {"delivery_id", "attempt", "event"}),
        (messaging_pb2.SubscribeResponse, {"deliveries"}),
        (
            messaging_pb2.SendMessageRequest,
            {
                "tenant_id", "connection_id", "conversation_id", "recipient_id",
                "idempotency_key", "text", "attachment", "sticker", "share", "template",
                "reaction", "sender_action", "quick_replies", "reply_to_message_id", "tag",
            },
        ),
        (messaging_pb2.SendMessageResponse, {"message"}),
        (
            events_pb2.Event,
            {
                "event_id", "tenant_id", "connection_id", "channel", "conversation_id",
                "occurred_at", "received_at",
            },
        ),
    ],
)  # fmt: skip
def test_fixed_field_names(message: type, names: set[str]) -> None:
    assert names <= fields(message.DESCRIPTOR)  # type: ignore[attr-defined]


def test_oneofs_and_enums() -> None:
    event = events_pb2.Event.DESCRIPTOR
    assert {f.name for f in event.oneofs_by_name["payload"].fields} == {k.value for k in EventKind}
    send = messaging_pb2.SendMessageRequest.DESCRIPTOR
    assert {f.name for f in send.oneofs_by_name["content"].fields} == {
        "text", "attachment", "sticker", "share", "template", "reaction", "sender_action",
    }  # fmt: skip
    kinds = messaging_pb2.SubscribeRequest.DESCRIPTOR.oneofs_by_name["kind"]
    assert {f.name for f in kinds.fields} == {"start", "ack", "nack"}
    assert set(common_pb2.ConnectionStatus.keys()) >= {
        "CONNECTION_STATUS_PENDING", "CONNECTION_STATUS_CONNECTED",
        "CONNECTION_STATUS_NEEDS_REAUTH", "CONNECTION_STATUS_DISCONNECTED",
    }  # fmt: skip
    assert set(common_pb2.MessageStatus.keys()) >= {
        "MESSAGE_STATUS_QUEUED", "MESSAGE_STATUS_SENT", "MESSAGE_STATUS_FAILED",
        "MESSAGE_STATUS_RECEIVED",
    }  # fmt: skip
