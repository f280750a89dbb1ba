"""What every benchmark shares: JSON-line output, medians, servers on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import multiprocessing as mp
import os
import queue
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

from bench.cpu import CpuSnapshot, snapshot
from gateway.runtime import tune_gc_for_serving


def emit(bench: str, backend: str, figure: str, value: float, unit: str, **extra: object) -> None:
    """One figure, one JSON object on its own line (DESIGN.md §8)."""
    line = {"bench": bench, "backend": backend, "figure": figure, "value": round(value, 3)}
    line["unit"] = unit
    line.update(extra)
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reap(*procs: BaseProcess, grace_s: float = 10.0) -> None:
    """Joins child processes, terminating (then killing) any still running after ``grace_s``:
    a benchmark leaves no process behind, whatever went wrong."""
    for proc in procs:
        if proc.pid is None:  # never started
            continue
        proc.join(grace_s)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, without persistence; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench: redis-server is not installed")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", workdir]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)  # noqa: S603
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit("bench: redis-server did not start")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


@contextlib.contextmanager
def redis_prefix(url: str) -> Iterator[str]:
    """A key prefix of its own in the Redis at ``url``; every key under it is deleted
    afterwards, so that runs do not pile their streams up in a shared Redis."""
    import redis

    prefix = f"bench:{secrets.token_hex(4)}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(url)
        try:
            # Hash-tagged keys start with "{", so the prefix may sit inside the braces.
            for pattern in (f"{prefix}*", f"{{{prefix}*"):
                for key in client.scan_iter(match=pattern, count=1000):
                    client.unlink(key)
        finally:
            client.close()


# ---- a database of its own for each measured gateway ----

PG_ADMIN = os.environ.get(
    "SWITCHBOARD_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


async def bench_database(backend: str, tmp: str) -> str:
    """SQLite under ``tmp`` for the embedded backend, else a fresh PostgreSQL database."""
    if backend == "embedded":
        return f"sqlite:///{tmp}/bench.db"
    import psycopg

    name = f"switchboard_bench_{secrets.token_hex(4)}"
    async with await psycopg.AsyncConnection.connect(PG_ADMIN, autocommit=True) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"'.encode())
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def cpu_meter(
    backend: str, database: str, redis_url: str, pids: Mapping[str, Sequence[int]]
) -> Callable[[], Awaitable[CpuSnapshot]]:
    """Reads what the run's processes (``pids``, by role) have spent so far
    (``bench.cpu``); on PostgreSQL and Redis, the bench database's backends and the Redis
    server too."""
    if backend != "postgres+redis":
        return functools.partial(snapshot, pids)
    name = database.rsplit("/", 1)[1]
    return functools.partial(snapshot, pids, postgres=(PG_ADMIN, name), redis_url=redis_url)


async def drop_bench_database(backend: str, database: str) -> None:
    if backend == "embedded":
        return
    import psycopg

    name = database.rsplit("/", 1)[1]
    async with await psycopg.AsyncConnection.connect(PG_ADMIN, autocommit=True) as admin:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def install_uvloop() -> None:
    """Every server of a run (the gateway's and the ceilings') runs as ``switchboard serve``
    does: uvloop, and its garbage-collector thresholds."""
    tune_gc_for_serving()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


# ---- the gateway under test, in its deployed shape ----

# The processes each backend runs as (DESIGN.md §1): the embedded default is one process
# (``switchboard serve``); with PostgreSQL and Redis, a replica is a pod of two containers
# (``switchboard serve http`` + ``switchboard serve grpc``), the webhook process publishing
# what it commits and the gRPC process streaming it.
TOPOLOGY = {"embedded": ("all",), "postgres+redis": ("http", "grpc")}


def _serve_process(env: dict[str, str], role: str, out: Any, stop: MpEvent) -> None:
    install_uvloop()

    async def main() -> None:
        from gateway.app import Gateway, Role
        from gateway.config import Config

        halt = asyncio.Event()

        def announce(where: Any) -> None:
            out.put(
                {
                    "http": where.http.port if where.http else None,
                    "grpc": where.grpc.port if where.grpc else None,
                }
            )

        async def watch() -> None:
            while not stop.is_set():  # noqa: ASYNC110 - a multiprocessing event
                await asyncio.sleep(0.05)
            halt.set()

        async with Gateway(Config.from_environ(env)) as gateway:
            watcher = asyncio.create_task(watch())
            await gateway.serve(Role(role), stop=halt, on_listening=announce)
            await watcher

    asyncio.run(main())


def _bare_webhook_process(secret: bytes, port_out: Any, stop: MpEvent) -> None:
    install_uvloop()
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        given = request.headers.get("X-Hub-Signature-256", "")
        if not hmac.compare_digest(expected, given):
            return web.Response(status=403)
        return web.Response(text="EVENT_RECEIVED")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/webhooks/instagram", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_out.put(runner.addresses[0][1])
        while not stop.is_set():  # noqa: ASYNC110 - a multiprocessing event, not asyncio's
            await asyncio.sleep(0.1)
        await runner.cleanup()

    asyncio.run(main())


@dataclass(frozen=True, slots=True)
class BareReceiver:
    """A bare webhook handler's URL, and its process (for its CPU)."""

    url: str
    pid: int


@contextlib.contextmanager
def bare_webhook_receiver(secret: bytes) -> Iterator[BareReceiver]:
    """A bare aiohttp handler, in a process of its own, that checks a webhook's signature
    and answers 200: what any receiver of Meta's webhooks must do at least."""
    ctx = mp.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_bare_webhook_process, args=(secret, port_q, stop), daemon=True)
    server.start()
    try:
        port = port_q.get(timeout=30)
        assert server.pid is not None
        yield BareReceiver(f"http://127.0.0.1:{port}/webhooks/instagram", server.pid)
    finally:
        stop.set()
        reap(server)


class GatewayProcesses:
    """The gateway's processes for one backend; the ports they listen on."""

    def __init__(self, env: dict[str, str], backend: str) -> None:
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._out = ctx.Queue()
        self._procs = [
            ctx.Process(target=_serve_process, args=(env, role, self._out, self._stop))
            for role in TOPOLOGY[backend]
        ]
        self._roles = TOPOLOGY[backend]
        self.http_port = 0
        self.grpc_port = 0

    @property
    def pids(self) -> dict[str, int]:
        """The started processes by what they serve ("webhook" and "grpc" as a pod's two
        containers; "gateway" for the embedded default's one process)."""
        names = {"http": "webhook", "grpc": "grpc", "all": "gateway"}
        return {
            names[role]: proc.pid
            for role, proc in zip(self._roles, self._procs, strict=True)
            if proc.pid is not None
        }

    def start(self) -> None:
        for proc in self._procs:
            proc.start()
        for _ in self._procs:
            try:
                ports = self._out.get(timeout=60)
            except queue.Empty:
                raise SystemExit("bench: the gateway did not start") from None
            self.http_port = ports["http"] or self.http_port
            self.grpc_port = ports["grpc"] or self.grpc_port

    def close(self) -> None:
        self._stop.set()
        reap(*self._procs, grace_s=30)
