from __future__ import annotations

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.api.connect_servicer import ChannelConnectServicer
from gateway.api.messaging_servicer import MessagingServicer
from gateway.api.server import GrpcServer
from gateway.config import Address
from gateway.plugins import ChannelRegistry
from gateway.security.tokens import TokenAuthority
from gateway.services.history import History
from gateway.store import open_store


async def test_health_follows_the_dependency_probe(tmp_path: object) -> None:
    healthy = True

    async def probe() -> bool:
        return healthy

    async with open_store(f"sqlite:///{tmp_path}/h.db") as store:
        history = History(store)
        server = GrpcServer(
            Address("127.0.0.1", 0),
            connect=ChannelConnectServicer(ChannelRegistry(()), history),
            messaging=MessagingServicer(history, None),
            authority=TokenAuthority(store),
            probe=probe,
            probe_interval_s=0.05,
        )
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest(service="switchboard.v1.Messaging")
                assert (await stub.Check(request)).status == health_pb2.HealthCheckResponse.SERVING
                healthy = False
                statuses = stub.Watch(request)
                async for reply in statuses:
                    if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                statuses.cancel()
        finally:
            await server.stop(0.5)
