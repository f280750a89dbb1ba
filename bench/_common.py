"""What every benchmark shares: JSON-line output, medians, servers on free loopback ports."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from multiprocessing.process import BaseProcess


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


async def drop_bench_database(backend: str, database: str) -> None:
    if backend == "embedded":
        return
    import psycopg

    name = database.rsplit("/", 1)[1]
    async with await psycopg.AsyncConnection.connect(PG_ADMIN, autocommit=True) as admin:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
