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

SERVING = health_pb2.HealthCheckResponse.SERVING


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


async def test_a_bus_outage_leaves_the_server_serving_but_not_messaging(tmp_path: object) -> None:
    """Kubernetes reads the server's overall status: a Redis outage, which every replica
    shares, must not take the pod (and the webhook sidecar beside it) out of the endpoints.
    Messaging, whose Subscribe streams from the bus, says it is not serving."""
    bus_up = True

    async def store() -> bool:
        return True

    async def bus() -> bool:
        return bus_up

    async with open_store(f"sqlite:///{tmp_path}/b.db") as st:
        history = History(st)
        server = GrpcServer(
            Address("127.0.0.1", 0),
            connect=ChannelConnectServicer(ChannelRegistry(()), history),
            messaging=MessagingServicer(history, None),
            authority=TokenAuthority(st),
            probe=store,
            bus_probe=bus,
            probe_interval_s=0.05,
        )
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                messaging = health_pb2.HealthCheckRequest(service="switchboard.v1.Messaging")
                assert (await stub.Check(messaging)).status == SERVING
                bus_up = False
                statuses = stub.Watch(messaging)
                async for reply in statuses:
                    if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                statuses.cancel()
                for name in ("", "switchboard.v1.ChannelConnect"):
                    request = health_pb2.HealthCheckRequest(service=name)
                    assert (await stub.Check(request)).status == SERVING, name
        finally:
            await server.stop(0.5)
