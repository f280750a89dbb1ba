"""switchboard.v1.ChannelConnect."""

from __future__ import annotations

from switchboard.v1 import common_pb2, connect_pb2, connect_pb2_grpc

from gateway.api import convert
from gateway.api.context import Ctx
from gateway.api.interceptors import require_owner, require_tenant
from gateway.domain.errors import Unimplemented
from gateway.domain.models import ConnectionStatus
from gateway.plugins import ChannelRegistry
from gateway.services.connect import ConnectService
from gateway.services.history import History


class ChannelConnectServicer(connect_pb2_grpc.ChannelConnectServicer):
    def __init__(
        self, channels: ChannelRegistry, history: History, connect: ConnectService | None = None
    ) -> None:
        self._channels = channels
        self._history = history
        self._connect_service = connect

    @property
    def _connect(self) -> ConnectService:
        if self._connect_service is None:
            raise Unimplemented("connecting accounts is not enabled on this server")
        return self._connect_service

    async def ListChannels(
        self, request: connect_pb2.ListChannelsRequest, context: Ctx
    ) -> connect_pb2.ListChannelsResponse:
        return connect_pb2.ListChannelsResponse(
            channels=[convert.channel_info(self._channels[name].info()) for name in self._channels]
        )

    async def StartConnect(
        self, request: connect_pb2.StartConnectRequest, context: Ctx
    ) -> connect_pb2.StartConnectResponse:
        started = await self._connect.start(
            tenant_id=request.tenant_id,
            channel=request.channel,
            return_url=request.return_url,
            login_flow=request.login_flow,
            authorize=require_tenant,
        )
        return connect_pb2.StartConnectResponse(
            authorization_url=started.authorization_url,
            state=started.state,
            expires_at=convert.timestamp(started.expires_at),
        )

    async def CompleteConnect(
        self, request: connect_pb2.CompleteConnectRequest, context: Ctx
    ) -> connect_pb2.CompleteConnectResponse:
        done = await self._connect.complete(
            channel=request.channel,
            code=request.code,
            state=request.state,
            account_external_id=request.account_external_id,
            authorize=require_tenant,
        )
        return connect_pb2.CompleteConnectResponse(
            connection=convert.connection(done.connection),
            available_accounts=[convert.account(a) for a in done.available_accounts],
            return_url=done.return_url,
        )

    async def GetConnection(
        self, request: connect_pb2.GetConnectionRequest, context: Ctx
    ) -> common_pb2.Connection:
        conn = await self._history.get_connection(request.connection_id)
        require_owner(conn.tenant_id, "connection", request.connection_id)
        return convert.connection(conn)

    async def ListConnections(
        self, request: connect_pb2.ListConnectionsRequest, context: Ctx
    ) -> connect_pb2.ListConnectionsResponse:
        require_tenant(request.tenant_id)
        statuses = tuple(
            ConnectionStatus(
                convert.enum_name(common_pb2.ConnectionStatus, s, "statuses").removeprefix(
                    "CONNECTION_STATUS_"
                )
            )
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
        conn = await self._connect.disconnect(
            request.connection_id,
            authorize=lambda tenant: require_owner(tenant, "connection", request.connection_id),
        )
        return convert.connection(conn)
