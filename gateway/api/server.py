"""The gRPC server: both services, health, reflection and the interceptor chain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from switchboard.v1 import connect_pb2, connect_pb2_grpc, messaging_pb2, messaging_pb2_grpc

from gateway.api.interceptors import (
    AuthInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
    RequestIdInterceptor,
    TextInterceptor,
)
from gateway.api.messaging_servicer import MessagingServicer
from gateway.api.reflection import enable_reflection
from gateway.config import Address
from gateway.security.tokens import TokenAuthority
from gateway.tasks import leave_if_cancelled

log = logging.getLogger(__name__)

CONNECT_SERVICE = connect_pb2.DESCRIPTOR.services_by_name["ChannelConnect"].full_name
MESSAGING_SERVICE = messaging_pb2.DESCRIPTOR.services_by_name["Messaging"].full_name
SERVICE_NAMES = (CONNECT_SERVICE, MESSAGING_SERVICE)

Probe = Callable[[], Awaitable[bool]]


class GrpcServer:
    """Owns a grpc.aio server. Health follows the probes: the server as a whole (service
    "") and ChannelConnect are SERVING while ``probe`` (the store) answers; Messaging also
    needs ``bus_probe`` (Subscribe streams from the bus).

    The bus stays out of the server's overall status on purpose: Kubernetes reads that one,
    and a pod is ready only when all its containers are, so a Redis outage (shared by
    every replica: no other pod would do better) would take the webhook sidecar beside it
    out of the endpoints too, refusing Meta's deliveries the store could still take.
    """

    def __init__(
        self,
        address: Address,
        *,
        connect: connect_pb2_grpc.ChannelConnectServicer,
        messaging: MessagingServicer,
        authority: TokenAuthority,
        probe: Probe,
        bus_probe: Probe | None = None,
        probe_interval_s: float = 2.0,
    ) -> None:
        self._address = address
        self._probe = probe
        self._bus_probe = bus_probe
        self._probe_interval = probe_interval_s
        self._health = HealthServicer()
        self._server = grpc.aio.server(
            interceptors=[
                RequestIdInterceptor(),
                MetricsInterceptor(),
                AuthInterceptor(authority),
                ErrorInterceptor(),
                TextInterceptor(),
            ],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        connect_pb2_grpc.add_ChannelConnectServicer_to_server(connect, self._server)
        messaging_pb2_grpc.add_MessagingServicer_to_server(messaging, self._server)
        self._messaging = messaging
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        enable_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
            self._server,
        )
        self._probe_task: asyncio.Task[None] | None = None
        self._stopped = False
        self.port = 0

    async def start(self) -> int:
        try:
            self.port = self._server.add_insecure_port(str(self._address))
        except RuntimeError:  # newer grpcio raises where older ones answered port 0
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {self._address} (taken, or not this machine's)")
        await self._server.start()
        await self._check_once()
        self._probe_task = asyncio.create_task(self._probe_loop(), name="grpc-health-probe")
        log.info("grpc listening", extra={"address": f"{self._address.host}:{self.port}"})
        return self.port

    async def _check_once(self) -> None:
        store_ok = await _run(self._probe)
        bus_ok = store_ok and (self._bus_probe is None or await _run(self._bus_probe))
        for name in ("", CONNECT_SERVICE):
            await self._health.set(name, _status(store_ok))
        await self._health.set(MESSAGING_SERVICE, _status(bus_ok))

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval)
            await self._check_once()
            # The bus probe is a Redis PING: a cancellation that came while redis-py read
            # its answer may have been spent, and stop() would wait for this loop forever.
            leave_if_cancelled()

    async def stop(self, grace_s: float) -> None:
        """Graceful: NOT_SERVING first, then stop accepting and let in-flight calls finish.
        Once only: later calls do nothing."""
        if self._stopped:
            return
        self._stopped = True
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
            self._probe_task = None
        await self._health.enter_graceful_shutdown()
        # Streams would hold on through the whole grace period; unary calls finish in it.
        self._messaging.drain()
        await self._server.stop(grace_s)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def _run(probe: Probe) -> bool:
    try:
        return await probe()
    except Exception:  # a probe that fails to run means not serving
        log.warning("health probe failed", exc_info=True)
        return False


def _status(ok: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return (
        health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    )
