"""The gateway on PostgreSQL and Redis Streams, as deployed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchboard.v1 import connect_pb2, connect_pb2_grpc

from gateway.store.postgres import PostgresStore
from tests.gateway_harness import gateway_environ, run_gateway
from tests.helpers import bearer, redis_node

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_postgres_and_redis_gateway_serves_and_is_healthy(
    postgres_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    env = gateway_environ(
        postgres_url,
        str(tmp_path),
        SWITCHBOARD_REDIS_URL=redis_url,
        SWITCHBOARD_REDIS_KEY_PREFIX=f"{redis_prefix}wiring:",
        SWITCHBOARD_DATABASE_POOL_SIZE="7",
    )
    async with run_gateway(env) as running:
        assert running.gateway.store.backend == "postgres"
        assert isinstance(running.gateway.store, PostgresStore)
        assert running.gateway.store.pool_size == 7
        assert running.gateway.bus is not None
        assert running.gateway.bus.backend == "redis"
        async with grpc.aio.insecure_channel(running.grpc_target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = connect_pb2_grpc.ChannelConnectStub(channel)
            channels = await stub.ListChannels(
                connect_pb2.ListChannelsRequest(), metadata=bearer(running.token)
            )
            assert [c.name for c in channels.channels] == ["instagram"]


async def test_a_redis_outage_leaves_the_replica_ready_and_only_messaging_not_serving(
    postgres_url: str, tmp_path: Path
) -> None:
    """Redis is shared by every replica: failing readiness on it would take every pod, and
    the webhook sidecar in it, out of the endpoints, refusing deliveries the store takes.
    Kubernetes reads the overall status ("") and /readyz; Messaging (Subscribe) says it
    cannot serve until Redis is back."""
    with redis_node() as node:
        env = gateway_environ(postgres_url, str(tmp_path), SWITCHBOARD_REDIS_URL=node.url)
        async with (
            run_gateway(env) as running,
            grpc.aio.insecure_channel(running.grpc_target) as channel,
            aiohttp.ClientSession() as http,
        ):
            health = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                return (await health.Check(request)).status

            async def until(service: str, wanted: int) -> None:
                watch = health.Watch(health_pb2.HealthCheckRequest(service=service))
                async with asyncio.timeout(30):
                    async for reply in watch:
                        if reply.status == wanted:
                            break
                watch.cancel()

            assert await status("switchboard.v1.Messaging") == SERVING
            node.stop()
            await until("switchboard.v1.Messaging", NOT_SERVING)
            assert await status("") == SERVING
            assert await status("switchboard.v1.ChannelConnect") == SERVING
            async with http.get(running.http_url + "/readyz") as ready:
                assert ready.status == 200
            node.start()
            await until("switchboard.v1.Messaging", SERVING)
