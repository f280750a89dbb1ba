from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import aiohttp
import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from switchboard.v1 import connect_pb2, connect_pb2_grpc, messaging_pb2, messaging_pb2_grpc

from gateway.security.tokens import create_token
from tests.gateway_harness import RunningGateway
from tests.helpers import bearer, error_info
from tests.store import factories


async def test_health_is_serving_for_the_server_and_both_services(
    channel: grpc.aio.Channel,
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "switchboard.v1.ChannelConnect", "switchboard.v1.Messaging"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_both_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names: set[str] = set()
    async for reply in stub.ServerReflectionInfo(iter([request])):
        names |= {s.name for s in reply.list_services_response.service}
    assert {"switchboard.v1.ChannelConnect", "switchboard.v1.Messaging"} <= names


async def test_reflection_answers_under_v1_too(channel: grpc.aio.Channel) -> None:
    """Tools ask grpc.reflection.v1 first. Its messages are v1alpha's, field for field, so
    v1alpha's classes speak it."""
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="switchboard.v1.Messaging"),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection"
        ),
    ]
    replies = [reply async for reply in call(iter(requests))]
    assert len(replies) == 3
    listed = {s.name for s in replies[0].list_services_response.service}
    assert {
        "switchboard.v1.Messaging",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= listed
    for reply, package in ((replies[1], "switchboard.v1"), (replies[2], "grpc.reflection.v1")):
        assert not reply.HasField("error_response"), reply.error_response
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in reply.file_descriptor_response.file_descriptor_proto
        ]
        assert package in {f.package for f in files}
    [v1] = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in replies[2].file_descriptor_response.file_descriptor_proto
    ]
    [method] = v1.service[0].method
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"


async def test_list_channels_names_instagram_with_both_login_flows(
    embedded: RunningGateway, channel: grpc.aio.Channel
) -> None:
    stub = connect_pb2_grpc.ChannelConnectStub(channel)
    reply = await stub.ListChannels(
        connect_pb2.ListChannelsRequest(), metadata=bearer(embedded.token)
    )
    instagram = {c.name: c for c in reply.channels}["instagram"]
    assert {f.name for f in instagram.login_flows} == {"facebook", "instagram"}
    assert "text" in instagram.capabilities
    flows = {f.name: f for f in instagram.login_flows}
    assert "instagram_business_manage_messages" in flows["instagram"].scopes
    assert "instagram_manage_messages" in flows["facebook"].scopes


async def test_missing_token_is_unauthenticated_with_a_reason(channel: grpc.aio.Channel) -> None:
    stub = connect_pb2_grpc.ChannelConnectStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListChannels(connect_pb2.ListChannelsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(caught.value)
    assert info.reason == "MISSING_TOKEN"
    assert info.domain == "switchboard.dev"
    trailers = dict(caught.value.trailing_metadata() or ())
    assert len(str(trailers["x-request-id"])) >= 8


async def test_a_token_without_its_scheme_is_told_apart_from_a_missing_one(
    embedded: RunningGateway, channel: grpc.aio.Channel
) -> None:
    stub = connect_pb2_grpc.ChannelConnectStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListChannels(
            connect_pb2.ListChannelsRequest(), metadata=(("authorization", embedded.token),)
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "MALFORMED_TOKEN"
    assert "Bearer <token>" in (caught.value.details() or "")


async def test_unknown_and_revoked_tokens_are_unauthenticated(
    embedded: RunningGateway, channel: grpc.aio.Channel
) -> None:
    stub = connect_pb2_grpc.ChannelConnectStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListChannels(connect_pb2.ListChannelsRequest(), metadata=bearer("sb_nobody"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_token_without_the_scope_is_denied(
    embedded: RunningGateway, channel: grpc.aio.Channel
) -> None:
    token, _ = await create_token(
        embedded.gateway.store, name="reader", tenants=["*"], scopes=["read"]
    )
    stub = connect_pb2_grpc.ChannelConnectStub(channel)
    await stub.ListChannels(connect_pb2.ListChannelsRequest(), metadata=bearer(token))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.StartConnect(
            connect_pb2.StartConnectRequest(tenant_id="acme", channel="instagram"),
            metadata=bearer(token),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).metadata["scope"] == "connect"


async def test_a_token_is_limited_to_its_tenants(
    embedded: RunningGateway, channel: grpc.aio.Channel
) -> None:
    token, _ = await create_token(embedded.gateway.store, name="acme", tenants=["acme"], scopes=[])
    stub = connect_pb2_grpc.ChannelConnectStub(channel)
    own = await stub.ListConnections(
        connect_pb2.ListConnectionsRequest(tenant_id="acme"), metadata=bearer(token)
    )
    assert list(own.connections) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListConnections(
            connect_pb2.ListConnectionsRequest(tenant_id="globex"), metadata=bearer(token)
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "TENANT_NOT_ALLOWED"


async def test_another_tenants_resources_named_by_id_are_not_found(
    embedded: RunningGateway, channel: grpc.aio.Channel
) -> None:
    """As if they did not exist: neither their existence nor their tenant is revealed."""
    store = embedded.gateway.store
    conn = factories.connection("globex")
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        part = await tx.upsert_participant(factories.participant(conn))
        conv = await tx.upsert_conversation(factories.conversation(conn, part))
        message, _ = await tx.insert_message(factories.message(conv))
    token, _ = await create_token(store, name="acme", tenants=["acme"], scopes=[])
    auth = bearer(token)
    connect = connect_pb2_grpc.ChannelConnectStub(channel)
    messaging = messaging_pb2_grpc.MessagingStub(channel)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: connect.GetConnection(
            connect_pb2.GetConnectionRequest(connection_id=conn.id), metadata=auth
        ),
        lambda: connect.Disconnect(
            connect_pb2.DisconnectRequest(connection_id=conn.id), metadata=auth
        ),
        lambda: messaging.GetConversation(
            messaging_pb2.GetConversationRequest(conversation_id=conv.id), metadata=auth
        ),
        lambda: messaging.ListMessages(
            messaging_pb2.ListMessagesRequest(conversation_id=conv.id), metadata=auth
        ),
        lambda: messaging.GetMessage(
            messaging_pb2.GetMessageRequest(message_id=message.id), metadata=auth
        ),
        lambda: messaging.SendMessage(
            messaging_pb2.SendMessageRequest(
                tenant_id="acme", connection_id=conn.id, conversation_id=conv.id, text="hi"
            ),
            metadata=auth,
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "globex" not in (caught.value.details() or "")
    # SendMessage's recipient alone: the field is wrong, as an unknown id would be.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await messaging.SendMessage(
            messaging_pb2.SendMessageRequest(tenant_id="acme", conversation_id=conv.id, text="hi"),
            metadata=auth,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "conversation_id"
    assert "globex" not in (caught.value.details() or "")
    # The connection is untouched, and its own tenant still sees it.
    async with store.transaction() as tx:
        stored = await tx.get_connection(conn.id)
    assert stored is not None
    assert stored.status == conn.status
    own = await connect.GetConnection(
        connect_pb2.GetConnectionRequest(connection_id=conn.id), metadata=bearer(embedded.token)
    )
    assert own.tenant_id == "globex"


async def test_bad_arguments_name_the_field(
    embedded: RunningGateway, channel: grpc.aio.Channel
) -> None:
    stub = messaging_pb2_grpc.MessagingStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListConversations(
            messaging_pb2.ListConversationsRequest(tenant_id="acme", page_size=-1),
            metadata=bearer(embedded.token),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "page_size"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetMessage(messaging_pb2.GetMessageRequest(), metadata=bearer(embedded.token))
    assert error_info(caught.value).metadata["field"] == "message_id"


async def test_enum_numbers_this_build_does_not_know_name_their_field(
    embedded: RunningGateway, channel: grpc.aio.Channel
) -> None:
    """proto3 lets any number through (a newer client, a hand-built request): it is the
    caller's mistake, not the server's."""
    auth = bearer(embedded.token)
    connect = connect_pb2_grpc.ChannelConnectStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await connect.ListConnections(
            connect_pb2.ListConnectionsRequest(tenant_id="acme", statuses=[99]), metadata=auth
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "statuses"

    messaging = messaging_pb2_grpc.MessagingStub(channel)
    to = {"tenant_id": "acme", "connection_id": "conn_x", "recipient_id": "1"}
    button = messaging_pb2.TemplateButton(type=99, title="Go")  # type: ignore[arg-type]
    element = messaging_pb2.TemplateElement(title="A", buttons=[button])
    for content, field in [
        ({"attachment": messaging_pb2.OutboundAttachment(type=99)}, "attachment.type"),
        ({"sticker": messaging_pb2.Sticker(kind=99)}, "sticker.kind"),  # type: ignore[arg-type]
        (
            {"sender_action": messaging_pb2.SenderAction(action=99)},  # type: ignore[arg-type]
            "sender_action.action",
        ),
        (
            {"template": messaging_pb2.Template(elements=[element])},
            "template.elements[0].buttons[0].type",
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await messaging.SendMessage(
                messaging_pb2.SendMessageRequest(**to, **content), metadata=auth
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert error_info(caught.value).metadata["field"] == field


async def test_missing_resources_are_not_found(
    embedded: RunningGateway, channel: grpc.aio.Channel
) -> None:
    stub = connect_pb2_grpc.ChannelConnectStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetConnection(
            connect_pb2.GetConnectionRequest(connection_id="conn_missing"),
            metadata=bearer(embedded.token),
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_send_message_is_served_and_names_a_missing_field(
    embedded: RunningGateway, channel: grpc.aio.Channel
) -> None:
    stub = messaging_pb2_grpc.MessagingStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SendMessage(
            messaging_pb2.SendMessageRequest(tenant_id="acme", text="hi"),
            metadata=bearer(embedded.token),
        )
    # Not connection_id: with a conversation_id it may be left empty.
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "recipient"
    assert caught.value.details() == "recipient: set conversation_id or recipient_id"


async def test_request_id_is_returned_and_logged(
    embedded: RunningGateway, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    stub = connect_pb2_grpc.ChannelConnectStub(channel)
    caplog.set_level(logging.INFO, logger="gateway.api")
    call = stub.ListChannels(
        connect_pb2.ListChannelsRequest(),
        metadata=(*bearer(embedded.token), ("x-request-id", "req-abc-123")),
    )
    await call
    trailers = dict(await call.trailing_metadata())
    assert trailers["x-request-id"] == "req-abc-123"
    finished = [r for r in caplog.records if r.getMessage() == "rpc finished"]
    assert any(getattr(r, "method", "").endswith("/ListChannels") for r in finished)
    assert embedded.token not in caplog.text


async def test_metrics_use_the_grpc_prometheus_names(
    embedded: RunningGateway, channel: grpc.aio.Channel
) -> None:
    stub = connect_pb2_grpc.ChannelConnectStub(channel)
    await stub.ListChannels(connect_pb2.ListChannelsRequest(), metadata=bearer(embedded.token))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.ListChannels(connect_pb2.ListChannelsRequest())
    async with aiohttp.ClientSession() as http, http.get(embedded.metrics_url) as reply:
        assert reply.status == 200
        text = await reply.text()
    assert "grpc_server_started_total{" in text
    assert 'grpc_code="OK"' in text
    # Go's spelling of the code, as grpc-prometheus dashboards filter on it.
    assert 'grpc_code="Unauthenticated"' in text
    assert 'grpc_method="ListChannels"' in text
    assert 'grpc_service="switchboard.v1.ChannelConnect"' in text
    assert "grpc_server_handling_seconds_bucket{" in text
    assert "process_cpu_seconds_total" in text
