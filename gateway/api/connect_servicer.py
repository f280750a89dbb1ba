"""switchboard.v1.ChannelConnect."""

from __future__ import annotations

from switchboard.v1 import common_pb2, connect_pb2, connect_pb2_grpc

from gateway.api import convert
from gateway.api.context import Ctx
from gateway.api.interceptors import require_tenant
from gateway.domain.errors import Unimplemented
from gateway.domain.models import ConnectionStatus
from gateway.plugins import ChannelRegistry
from gateway.services.history import History

_NOT_YET = "the OAuth connect flow is not implemented yet"


class ChannelConnectServicer(connect_pb2_grpc.ChannelConnectServicer):
    def __init__(self, channels: ChannelRegistry, history: History) -> None:
        self._channels = channels
        self._history = history

    async def ListChannels(
        self, request: connect_pb2.ListChannelsRequest, context: Ctx
    ) -> connect_pb2.ListChannelsResponse:
        return connect_pb2.ListChannelsResponse(
            channels=[convert.channel_info(self._channels[name].info()) for name in self._channels]
        )

    async def StartConnect(
        self, request: connect_pb2.StartConnectRequest, context: Ctx
    ) -> connect_pb2.StartConnectResponse:
        raise Unimplemented(_NOT_YET)

    async def CompleteConnect(
        self, request: connect_pb2.CompleteConnectRequest, context: Ctx
    ) -> connect_pb2.CompleteConnectResponse:
        raise Unimplemented(_NOT_YET)

    async def GetConnection(
        self, request: connect_pb2.GetConnectionRequest, context: Ctx
    ) -> common_pb2.Connection:
        conn = await self._history.get_connection(request.connection_id)
        require_tenant(conn.tenant_id)
        return convert.connection(conn)

    async def ListConnections(
        self, request: connect_pb2.ListConnectionsRequest, context: Ctx
    ) -> connect_pb2.ListConnectionsResponse:
        require_tenant(request.tenant_id)
        statuses = tuple(
            ConnectionStatus(common_pb2.ConnectionStatus.Name(s).removeprefix("CONNECTION_STATUS_"))
            for s in request.statuses
            if s != common_pb2.CONNECTION_STATUS_UNSPECIFIED
        )
        page = await self._history.list_connections(
            request.tenant_id,
            size=request.page_size,
            token=request.page_token,
            channel=request.channel,
            statuses=statuses,
        )
        return connect_pb2.ListConnectionsResponse(
            connections=[convert.connection(c) for c in page.items],
            next_page_token=page.next_token,
        )

    async def Disconnect(
        self, request: connect_pb2.DisconnectRequest, context: Ctx
    ) -> common_pb2.Connection:
        raise Unimplemented("disconnecting is not implemented yet")
