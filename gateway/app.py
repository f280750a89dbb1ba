"""The composition root: builds every part from the Config and runs the chosen roles.

``Gateway`` is an async context manager that opens the store, the bus and the channel
plugins; ``serve`` adds the front doors (gRPC, HTTP, metrics) and background workers for
the requested role, and shuts them down in a fixed order on SIGTERM/SIGINT: health
NOT_SERVING, stop accepting and finish in-flight calls within the grace period, then
workers, bus, plugins and store.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import signal
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any

from aiohttp import web

from gateway.api.connect_servicer import ChannelConnectServicer
from gateway.api.messaging_servicer import MessagingServicer
from gateway.api.server import GrpcServer
from gateway.config import Address, Config
from gateway.domain.bus import Bus
from gateway.domain.channel import ChannelContext
from gateway.domain.errors import BusUnavailable, StoreUnavailable
from gateway.domain.outbound import RateCategory
from gateway.domain.store import Store
from gateway.observability.metrics import create_metrics_app
from gateway.plugins import ChannelRegistry, load_channels
from gateway.security.keyring import KeyRing
from gateway.security.oauth_state import open_oauth_states
from gateway.security.tokens import TokenAuthority
from gateway.services.connect import ConnectService
from gateway.services.history import History
from gateway.services.inbound import InboundService
from gateway.services.outbound import OutboundService
from gateway.services.outbound_delivery import Clock, Deliverer, DeliveryPolicy
from gateway.services.outbound_worker import OutboundWorker
from gateway.services.outbox import OutboxWriter
from gateway.services.profiles import ProfileEnricher
from gateway.services.ratelimit import open_rate_limiter
from gateway.services.refresh import RefreshPolicy, RefreshWorker
from gateway.services.relay import OutboxRelay
from gateway.store import open_store
from gateway.web.app import PathOnlyAccessLogger, WebDeps, create_web_app

log = logging.getLogger("gateway")


class Role(enum.StrEnum):
    ALL = "all"
    GRPC = "grpc"
    HTTP = "http"


@dataclass
class Listening:
    """Where each front door ended up listening (ports may be chosen by the OS)."""

    grpc: Address | None = None
    http: Address | None = None
    metrics: Address | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._stack = AsyncExitStack()
        self.store: Store = open_store(
            config.database_url.reveal(), pool_size=config.database_pool_size
        )
        self.bus: Bus | None = None
        self.keyring: KeyRing | None = None
        self.channels = ChannelRegistry(())
        self.authority: TokenAuthority | None = None
        self.connect: ConnectService | None = None
        self.refresher: RefreshWorker | None = None
        self.inbound: InboundService | None = None
        self.outbound: OutboundService | None = None
        self.relay: OutboxRelay | None = None
        self.outbound_worker: OutboundWorker | None = None

    async def __aenter__(self) -> Gateway:
        try:
            await self._open()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _open(self) -> None:
        cfg = self.config
        self.keyring = KeyRing.load(
            cfg.encryption_keys.reveal(), data_dir=cfg.data_dir, allow_generate=cfg.embedded
        )
        self.channels = load_channels(
            ChannelContext(environ=cfg.environ, public_url=cfg.public_url, embedded=cfg.embedded)
        )
        await self.store.open()
        self._stack.push_async_callback(self.store.aclose)
        self.authority = TokenAuthority(self.store, cfg.api_tokens.reveal())
        await self.channels.start()
        self._stack.push_async_callback(self.channels.aclose)
        states = open_oauth_states(
            self.store, cfg.redis_url.reveal() or None, prefix=cfg.redis_key_prefix
        )
        self._stack.push_async_callback(states.aclose)
        self.connect = ConnectService(
            self.store,
            self.channels,
            self.keyring,
            states,
            allowed_return_origins=cfg.allowed_return_origins,
            notify=self._events_committed,
        )

    def _events_committed(self) -> None:
        """Events were committed outside the hand-over path: this process's relay (serve
        starts it) publishes them now; without one, another process's sweep does."""
        if self.relay is not None:
            self.relay.notify()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def ensure_schema(self) -> None:
        from gateway.store.migrate import ensure_schema

        await ensure_schema(self.store)

    async def open_bus(self) -> Bus:
        from gateway.bus import open_bus

        bus = open_bus(
            self.config.redis_url.reveal() or None,
            self.store,
            key_prefix=self.config.redis_key_prefix,
        )
        await bus.start()
        self._stack.push_async_callback(bus.aclose)
        self.bus = bus
        return bus

    async def ready(self) -> bool:
        """The store answering: what every call needs."""
        try:
            await self.store.ping()
        except StoreUnavailable:
            return False
        return True

    async def bus_ready(self) -> bool:
        """The bus answering, when this process runs one: what Subscribe needs."""
        if self.bus is None:
            return True
        try:
            await self.bus.ping()
        except BusUnavailable:
            return False
        return True

    async def serve(
        self, role: Role, *, stop: asyncio.Event, on_listening: Any = None
    ) -> Listening:
        cfg = self.config
        listening = Listening()
        async with AsyncExitStack() as stack:
            metrics_runner = await _start_site(
                create_metrics_app(),
                cfg.metrics_addr,
                access_log=False,
                setting="SWITCHBOARD_METRICS_ADDR",
            )
            stack.push_async_callback(metrics_runner.cleanup)
            listening.metrics = _bound(metrics_runner, cfg.metrics_addr)

            grpc_server: GrpcServer | None = None
            relay: OutboxRelay | None = None
            # A process that commits events publishes them itself, right after the commit.
            # A webhook-only process does so when the bus is shared (Redis): left to the
            # gRPC processes' sweep, every inbound event would wait up to a sweep interval.
            if role in (Role.ALL, Role.GRPC) or cfg.redis_url.reveal():
                bus = await self.open_bus()
                relay = self.relay = OutboxRelay(self.store, bus)
                await relay.start()
                stack.push_async_callback(relay.aclose)
            if role in (Role.ALL, Role.GRPC):
                assert relay is not None
                # Both are set in __aenter__.
                assert self.keyring is not None
                assert self.connect is not None
                self.refresher = RefreshWorker(
                    self.store,
                    self.channels,
                    self.keyring,
                    RefreshPolicy(margin=timedelta(seconds=cfg.token_refresh_margin_s)),
                    notify=relay.notify,
                )
                await self.refresher.start()
                stack.push_async_callback(self.refresher.aclose)
                self.outbound = await self._start_outbound(stack, relay)
                history = History(self.store)
                assert self.authority is not None  # set in __aenter__
                grpc_server = GrpcServer(
                    cfg.grpc_addr,
                    connect=ChannelConnectServicer(self.channels, history, self.connect),
                    messaging=MessagingServicer(history, bus, self.outbound),
                    authority=self.authority,
                    probe=self.ready,
                    bus_probe=self.bus_ready,
                )
                try:
                    port = await grpc_server.start()
                except OSError as exc:
                    raise CannotListen(f"SWITCHBOARD_GRPC_ADDR: {exc}") from None
                # Stopped below on a normal shutdown, before what it uses; this covers a
                # failure to start what comes next (the sidecar's port taken, say).
                stack.push_async_callback(grpc_server.stop, 0)
                listening.grpc = Address(cfg.grpc_addr.host, port)

            if role in (Role.ALL, Role.HTTP):
                # Without a relay here (in-process bus, split roles) a gRPC process's sweep
                # publishes what this one commits.
                self.inbound = await self._start_inbound(relay)
                stack.push_async_callback(self.inbound.aclose)
                web_app = create_web_app(
                    WebDeps(
                        store=self.store,
                        channels=self.channels,
                        max_body_bytes=cfg.http_max_body_bytes,
                        connect=self.connect,
                        inbound=self.inbound,
                    )
                )
                http_runner = await _start_site(
                    web_app, cfg.http_addr, access_log=True, setting="SWITCHBOARD_HTTP_ADDR"
                )
                stack.push_async_callback(http_runner.cleanup)
                listening.http = _bound(http_runner, cfg.http_addr)

            if on_listening is not None:
                on_listening(listening)
            await stop.wait()
            log.info("shutting down", extra={"grace_s": cfg.shutdown_grace_s})
            if grpc_server is not None:
                await grpc_server.stop(cfg.shutdown_grace_s)
        return listening

    async def _start_outbound(self, stack: AsyncExitStack, relay: OutboxRelay) -> OutboundService:
        """The send path and its retry worker; closed before the relay they notify."""
        cfg = self.config
        assert self.keyring is not None  # set in __aenter__
        limiter = open_rate_limiter(
            cfg.redis_url.reveal() or None,
            {RateCategory.TEXT: cfg.send_rate_text, RateCategory.MEDIA: cfg.send_rate_media},
            prefix=cfg.redis_key_prefix,
        )
        stack.push_async_callback(limiter.aclose)
        deliverer = Deliverer(
            self.store,
            self.channels,
            self.keyring,
            limiter,
            DeliveryPolicy(
                max_attempts=cfg.send_max_attempts,
                retry_base_s=cfg.send_retry_base_s,
                retry_max_s=cfg.send_retry_max_s,
                unanswered_wait_s=cfg.send_unanswered_wait_s,
                lease_s=cfg.send_lease_s,
            ),
            clock=Clock(),
            outbox=OutboxWriter(relay),
        )
        service = OutboundService(self.store, deliverer, wait_s=cfg.send_wait_s)
        stack.push_async_callback(service.aclose)
        self.outbound_worker = OutboundWorker(self.store, deliverer, poll_s=cfg.send_poll_s)
        await self.outbound_worker.start()
        stack.push_async_callback(self.outbound_worker.aclose)
        return service

    async def _start_inbound(self, relay: OutboxRelay | None) -> InboundService:
        assert self.keyring is not None  # set in __aenter__
        sources = {
            name: plugin.profiles
            for name, plugin in self.channels.items()
            if plugin.profiles is not None
        }
        service = InboundService(
            self.store,
            relay=relay,
            enricher=ProfileEnricher(
                self.store, self.keyring, sources, notify=self._events_committed
            ),
            ack_timeout_s=self.config.webhook_ack_timeout_s,
            echo_patience_s=self.config.webhook_echo_wait_s,
            # SQLite serializes writers anyway; PostgreSQL overlaps two commits.
            workers=2 if self.store.backend == "postgres" else 1,
        )
        await service.start()
        return service


class CannotListen(Exception):
    """An address the process cannot bind (taken, or not this machine's), named by the
    variable that sets it."""


async def _start_site(
    app: web.Application, address: Address, *, access_log: bool, setting: str
) -> web.AppRunner:
    runner = web.AppRunner(
        app,
        access_log_class=PathOnlyAccessLogger,
        access_log=logging.getLogger("gateway.http.access") if access_log else None,
        handle_signals=False,
        shutdown_timeout=5.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise CannotListen(
            f"{setting}: cannot listen on {address}: {exc.strerror or exc}"
        ) from None
    return runner


def _bound(runner: web.AppRunner, wanted: Address) -> Address:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return Address(wanted.host, int(addr[1]))
    return wanted


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
