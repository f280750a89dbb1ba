"""Small helpers shared by the tests."""

from __future__ import annotations

import contextlib
import functools
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it, so runs never collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


@contextlib.contextmanager
def redis_cluster(masters: int = 3) -> Iterator[str]:
    """A throwaway Redis Cluster of ``masters`` primaries (no replicas) on free loopback
    ports, in a temporary directory; yields its ``redis+cluster://`` URL. Every server is
    stopped and waited for, and the directory removed, on the way out."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise RedisClusterUnavailable("redis-server and redis-cli must be on PATH")
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-redis-cluster-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = []
        for _ in range(masters):
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
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )  # fmt: skip
            ports.append(port)
        nodes = [redis.Redis(host="127.0.0.1", port=p, socket_timeout=5) for p in ports]
        try:
            for node in nodes:
                _wait_until("the servers to answer", node.ping, procs, workdir, 10)
            addrs = [f"127.0.0.1:{p}" for p in ports]
            created = subprocess.run(
                [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
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
        finally:
            for node in nodes:
                node.close()
        yield f"redis+cluster://127.0.0.1:{ports[0]}/0"
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
