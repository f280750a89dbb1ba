"""The gateway on PostgreSQL and Redis Streams, as deployed."""

from __future__ import annotations

from pathlib import Path

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchboard.v1 import connect_pb2, connect_pb2_grpc

from tests.gateway_harness import gateway_environ, run_gateway
from tests.helpers import bearer


async def test_postgres_and_redis_gateway_serves_and_is_healthy(
    postgres_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    env = gateway_environ(
        postgres_url,
        str(tmp_path),
        SWITCHBOARD_REDIS_URL=redis_url,
        SWITCHBOARD_REDIS_KEY_PREFIX=f"{redis_prefix}wiring:",
    )
    async with run_gateway(env) as running:
        assert running.gateway.store.backend == "postgres"
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
