from __future__ import annotations

from switchboard.v1 import connect_pb2

from clients import SwitchboardClient
from tests.gateway_harness import RunningGateway


async def test_client_sends_the_token_on_every_call(embedded: RunningGateway) -> None:
    async with SwitchboardClient(embedded.grpc_target, embedded.token) as sb:
        reply = await sb.connect.ListChannels(connect_pb2.ListChannelsRequest())
        listed = await sb.connect.ListConnections(connect_pb2.ListConnectionsRequest(tenant_id="t"))
    assert "instagram" in [c.name for c in reply.channels]
    assert list(listed.connections) == []
