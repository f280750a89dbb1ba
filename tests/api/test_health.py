from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.api.connect_servicer import ChannelConnectServicer
from gateway.api.messaging_servicer import MessagingServicer
from gateway.api.server import GrpcServer, Probe
from gateway.config import Address
from gateway.plugins import ChannelRegistry
from gateway.security.tokens import TokenAuthority
from gateway.services.history import History
from gateway.store import open_store

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MESSAGING = health_pb2.HealthCheckRequest(service="switchboard.v1.Messaging")


@contextlib.asynccontextmanager
async def health_of(
    tmp_path: Path, probe: Probe, bus_probe: Probe | None = None
) -> AsyncIterator[health_pb2_grpc.HealthStub]:
    """A gRPC server whose health follows the probes, checked every 50 ms; its Health."""
    async with open_store(f"sqlite:///{tmp_path}/h.db") as store:
        history = History(store)
        server = GrpcServer(
            Address("127.0.0.1", 0),
            connect=ChannelConnectServicer(ChannelRegistry(()), history),
            messaging=MessagingServicer(history, None),
            authority=TokenAuthority(store),
            probe=probe,
            bus_probe=bus_probe,
            probe_interval_s=0.05,
        )
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield health_pb2_grpc.HealthStub(channel)
        finally:
            await server.stop(0.5)


async def until_not_serving(health: health_pb2_grpc.HealthStub) -> None:
    statuses = health.Watch(MESSAGING)
    async for reply in statuses:
        if reply.status == NOT_SERVING:
            break
    statuses.cancel()


async def test_health_follows_the_dependency_probe(tmp_path: Path) -> None:
    healthy = True

    async def probe() -> bool:
        return healthy

    async with health_of(tmp_path, probe) as health:
        assert (await health.Check(MESSAGING)).status == SERVING
        healthy = False
        await until_not_serving(health)


async def test_a_bus_outage_leaves_the_server_serving_but_not_messaging(tmp_path: Path) -> None:
    """Kubernetes reads the server's overall status: a Redis outage, which every replica
    shares, must not take the pod (and the webhook sidecar beside it) out of the endpoints.
    Messaging, whose Subscribe streams from the bus, says it is not serving."""
    bus_up = True

    async def store() -> bool:
        return True

    async def bus() -> bool:
        return bus_up

    async with health_of(tmp_path, store, bus) as health:
        assert (await health.Check(MESSAGING)).status == SERVING
        bus_up = False
        await until_not_serving(health)
        for name in ("", "switchboard.v1.ChannelConnect"):
            request = health_pb2.HealthCheckRequest(service=name)
            assert (await health.Check(request)).status == SERVING, name


async def test_stop_ends_the_probes_even_when_a_probe_spends_the_cancellation(
    tmp_path: Path,
) -> None:
    """redis-py may finish reading an answer when the cancellation comes, and return it:
    the bus probe (a PING) then spends the CancelledError. stop() must end all the same."""
    probing = asyncio.Event()

    async def store() -> bool:
        return True

    async def bus() -> bool:
        probing.set()
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            return True  # answered all the same, as redis-py may
        return True

    async with asyncio.timeout(10), health_of(tmp_path, store, bus):
        probing.clear()
        await probing.wait()  # stopped while a probe runs
