"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc.aio
import psycopg
import redis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.domain.bus import Bus, Subscription
from gateway.domain.events import Event, EventKind


async def published_events(
    bus: Bus,
    match: Callable[[Event], bool],
    *,
    kinds: Iterable[EventKind] = (),
    count: int = 1,
    timeout_s: float = 10.0,
) -> list[Event]:
    """The published events that ``match``, as a subscriber sees them: a group of its own
    reads the bus's retained log from the start. Returns once ``count`` came (with any
    that came along), or what came by ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    found: list[Event] = []
    subscription = Subscription(
        f"tests-{secrets.token_hex(4)}", "reader", kinds=frozenset(kinds), max_in_flight=1000
    )
    async with bus.subscribe(subscription) as consumer:
        while True:
            wait = deadline - loop.time()
            if len(found) >= count:
                wait = min(wait, 0.05)  # what is already there comes along
            if wait <= 0:
                return found
            got = await consumer.receive(1000, wait)
            if not got:
                if len(found) >= count:
                    return found
                continue
            await consumer.ack([d.delivery_id for d in got])
            found += [d.event for d in got if match(d.event)]


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it, so runs never collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def switchboard(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The command line, run as a user runs it: a subprocess with only ``env`` (and PATH,
    unless ``env`` sets its own)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        env={"PATH": os.environ.get("PATH", ""), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying an API token."""
    return (("authorization", f"Bearer {token}"),)


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database of the same server."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@contextlib.contextmanager
def fresh_database(admin_url: str, label: str) -> Iterator[str]:
    """A PostgreSQL database of its own, dropped afterwards even if a test blocked
    connections to it (the store-down tests do)."""
    name = f"switchboard_{label}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class RedisClusterUnavailable(Exception):
    """This machine cannot start a Redis Cluster (redis-server or redis-cli is missing)."""


def _wait_until(
    what: str,
    check: Callable[[], object],
    procs: Sequence[subprocess.Popen[bytes]],
    workdir: Path,
    timeout: float,
) -> None:
    give_up = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        dead = any(proc.poll() is not None for proc in procs)
        if dead or time.monotonic() > give_up:
            logs = "\n".join(
                f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}"
                for log in sorted(workdir.glob("*.log"))
            )
            problem = "a server exited" if dead else "timed out"
            raise RuntimeError(f"Redis Cluster: {problem} waiting for {what}\n{logs}")
        time.sleep(0.05)


def _cluster_state_ok(node: redis.Redis) -> bool:
    return bool(node.cluster("INFO")["cluster_state"] == "ok")


def _cluster_nodes_agree(node: redis.Redis, masters: int, replicas: int) -> bool:
    """``node`` sees every node, each master serving slots, and every replica attached."""
    seen: Any = node.cluster("NODES")
    flags = [info["flags"] for info in seen.values()]
    primaries = sum("master" in f and "fail" not in f for f in flags)
    secondaries = sum("slave" in f and "fail" not in f for f in flags)
    return primaries == masters and secondaries == masters * replicas


def _replicas_online(node: redis.Redis, replicas: int) -> bool:
    """A master with ``replicas`` replicas in sync, or a replica whose link is up."""
    info: Any = node.info("replication")
    if info["role"] == "master":
        online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return len(online) == replicas and all(r.get("state") == "online" for r in online)
    return bool(info.get("master_link_status") == "up")


@dataclass
class RedisClusterNodes:
    """A running throwaway cluster: its URL, and the server process of each node by port
    (so that a test can tell which process serves what, and kill one)."""

    url: str
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def client(self, port: int) -> redis.Redis:
        """A plain (not cluster) client of the node on ``port``."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def kill(self, port: int) -> None:
        """SIGKILLs the node on ``port`` (no shutdown, no save) and reaps it."""
        proc = self.processes[port]
        proc.kill()
        proc.wait(timeout=10)


class RedisNode:
    """A throwaway single redis-server on a port of its own, which a test may stop and
    start again (same port; empty, or ``persistent``: with what its AOF kept) to play an
    outage."""

    def __init__(self, workdir: Path, *, persistent: bool = False) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RedisClusterUnavailable("redis-server must be on PATH")
        self._server = server
        self._workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None
        self._persistent = persistent

    def start(self) -> None:
        args = [self._server, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--dir", str(self._workdir)]
        if self._persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        with (self._workdir / "redis.log").open("ab") as log:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._proc = proc
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        try:
            _wait_until("the server to answer", client.ping, [proc], self._workdir, 10)
        finally:
            client.close()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None


@contextlib.contextmanager
def redis_node(*, persistent: bool = False) -> Iterator[RedisNode]:
    """A running :class:`RedisNode`, stopped and its directory removed on the way out."""
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-redis-"))
    node = RedisNode(workdir, persistent=persistent)
    try:
        node.start()
        yield node
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def redis_cluster(masters: int = 3, replicas_per_master: int = 0) -> Iterator[str]:
    """A throwaway Redis Cluster of ``masters`` primaries, each with
    ``replicas_per_master`` replicas, on free loopback ports, in a temporary directory;
    yields its ``redis+cluster://`` URL. Every server is stopped and waited for, and the
    directory removed, on the way out. :func:`redis_cluster_nodes` yields the processes
    too."""
    with redis_cluster_nodes(masters, replicas_per_master) as cluster:
        yield cluster.url


@contextlib.contextmanager
def redis_cluster_nodes(
    masters: int = 3, replicas_per_master: int = 0, *, node_timeout_ms: int | None = None
) -> Iterator[RedisClusterNodes]:
    """:func:`redis_cluster`, yielding the URL and each node's process by port.
    ``node_timeout_ms`` sets ``cluster-node-timeout`` (Redis's default, 15 s, if None):
    how long a silent node takes to be declared failed, and so how long a failover takes.
    Returns once every node sees the cluster ok and every replica is in sync."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise RedisClusterUnavailable("redis-server and redis-cli must be on PATH")
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-redis-cluster-"))
    procs: list[subprocess.Popen[bytes]] = []
    cluster = RedisClusterNodes(url="")
    extra: list[str] = []
    if node_timeout_ms is not None:
        # A replica may take over however long ago it last heard from its master.
        extra += ["--cluster-node-timeout", str(node_timeout_ms)]
        extra += ["--cluster-replica-validity-factor", "0"]
    try:
        ports = []
        for _ in range(masters * (1 + replicas_per_master)):
            # The cluster bus port is chosen too: the default (port + 10000) may be taken,
            # or beyond 65535.
            port, bus_port = free_port(), free_port()
            with (workdir / f"{port}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        [
                            server,
                            "--port", str(port),
                            "--bind", "127.0.0.1",
                            "--cluster-enabled", "yes",
                            "--cluster-port", str(bus_port),
                            "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
                            "--dir", str(workdir),
                            "--save", "",
                            "--appendonly", "no",
                            "--daemonize", "no",
                            *extra,
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )  # fmt: skip
            ports.append(port)
            cluster.processes[port] = procs[-1]
        nodes = [cluster.client(p) for p in ports]
        try:
            for node in nodes:
                _wait_until("the servers to answer", node.ping, procs, workdir, 10)
            addrs = [f"127.0.0.1:{p}" for p in ports]
            replicas = str(replicas_per_master)
            created = subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *addrs,
                    "--cluster-replicas",
                    replicas,
                    "--cluster-yes",
                ],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=60,
                check=False,
            )
            if created.returncode != 0:
                output = (created.stdout + created.stderr).decode(errors="replace")
                raise RuntimeError(f"redis-cli --cluster create failed:\n{output[-4000:]}")
            for node in nodes:
                ok = functools.partial(_cluster_state_ok, node)
                _wait_until("cluster_state:ok on every node", ok, procs, workdir, 30)
            if replicas_per_master:
                for node in nodes:
                    agree = functools.partial(
                        _cluster_nodes_agree, node, masters, replicas_per_master
                    )
                    _wait_until("every node to see every replica", agree, procs, workdir, 30)
                    online = functools.partial(_replicas_online, node, replicas_per_master)
                    _wait_until("the replicas to be in sync", online, procs, workdir, 30)
        finally:
            for node in nodes:
                node.close()
        cluster.url = f"redis+cluster://127.0.0.1:{ports[0]}/0"
        yield cluster
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


class _SharedCluster:
    def __init__(self) -> None:
        self.users = 0
        self.url = ""
        self.stack = contextlib.ExitStack()

    @contextlib.contextmanager
    def use(self) -> Iterator[str]:
        if not self.users:
            self.url = self.stack.enter_context(redis_cluster())
        self.users += 1
        try:
            yield self.url
        finally:
            self.users -= 1
            if not self.users:
                self.stack.close()


_SHARED_CLUSTER = _SharedCluster()


def shared_redis_cluster() -> contextlib.AbstractContextManager[str]:
    """:func:`redis_cluster`, started by its first user and stopped after its last, so
    that the session fixtures of several test packages share one cluster."""
    return _SHARED_CLUSTER.use()


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo every Switchboard error carries in its trailers."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info
