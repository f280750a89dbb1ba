"""Inbound benchmark: signed webhook POSTs -> stored -> delivered to a consumer.

Usage: ``python -m bench.inbound [--quick] [--backend embedded|postgres+redis|all]``.

For each backend and batch size (1 or 20 events per delivery) it reports, as one JSON line
per figure (DESIGN.md §8): ``events_per_s`` (closed loop, everything durable and
delivered), ``ack_p50_ms``/``ack_p99_ms`` (POST to 200) and ``e2e_p50_ms``/``e2e_p99_ms``
(POST to the event reaching a consumer) at an offered 500 events/s, the ceiling measured
in the same run (a bare aiohttp handler that checks the signature and answers 200) and
the ratio. Load comes from a separate process; figures are medians of the runs.

The consumer reads the gateway's bus in the gateway's process (the path Subscribe serves)
so the figures hold whichever state ``Messaging.Subscribe`` is in.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import multiprocessing as mp
import os
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bench._common import bench_database, drop_bench_database

SECRET = b"bench-app-secret"
ACCOUNT = "17841400000099999"
CUSTOMERS = 200
REDIS = os.environ.get("SWITCHBOARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def emit(backend: str, batch: int, figure: str, value: float, unit: str, runs: int) -> None:
    line = {
        "bench": "inbound",
        "backend": backend,
        "batch": batch,
        "figure": figure,
        "value": round(value, 2),
        "unit": unit,
        "runs": runs,
    }
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- the load generator (a separate process) ----


def _body(seq: int, batch: int) -> bytes:
    sent = time.time()
    items = [
        {
            "sender": {"id": str(5_200_000_000_000_000 + (seq * batch + i) % CUSTOMERS)},
            "recipient": {"id": ACCOUNT},
            "timestamp": int(sent * 1000),
            "message": {"mid": f"mid-{os.getpid()}-{seq}-{i}", "text": f"t={sent:.6f}"},
        }
        for i in range(batch)
    ]
    entry = {"id": ACCOUNT, "time": int(sent * 1000), "messaging": items}
    return orjson.dumps({"object": "instagram", "entry": [entry]}).replace(b"/", b"\\/")


async def _drive(
    url: str, batch: int, duration_s: float, rate: float | None, concurrency: int
) -> dict[str, Any]:
    """Closed loop (``rate`` None: ``concurrency`` requests in flight) or open loop at
    ``rate`` deliveries per second; returns ack latencies (s) and counts."""
    acks: list[float] = []
    failed = 0
    seq = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one() -> None:
            nonlocal seq, failed
            seq += 1
            body = _body(seq, batch)
            signature = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
            started = time.perf_counter()
            headers = {"X-Hub-Signature-256": signature, "Content-Type": "application/json"}
            async with http.post(url, data=body, headers=headers) as reply:
                await reply.read()
                if reply.status == 200:
                    acks.append(time.perf_counter() - started)
                else:
                    failed += 1

        begin = time.perf_counter()
        end = begin + duration_s
        if rate is None:

            async def loop() -> None:
                while time.perf_counter() < end:
                    await one()

            await asyncio.gather(*(loop() for _ in range(concurrency)))
        else:
            tasks: set[asyncio.Task[None]] = set()
            n = 0
            while (now := time.perf_counter()) < end:
                due = begin + n / rate
                if due > now:
                    await asyncio.sleep(due - now)
                task = asyncio.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - begin
    return {"acks": acks, "failed": failed, "elapsed": elapsed, "deliveries": len(acks)}


def _drive_process(args: tuple[str, int, float, float | None, int], out: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out.put(asyncio.run(_drive(*args)))


def drive(
    url: str, batch: int, duration_s: float, *, rate: float | None = None, concurrency: int = 64
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(
        target=_drive_process, args=((url, batch, duration_s, rate, concurrency), out)
    )
    proc.start()
    result: dict[str, Any] = out.get(timeout=duration_s + 120)
    proc.join()
    return result


# ---- the ceiling: a bare handler that checks the signature and answers 200 ----


def _bare_server(port_out: Any, stop: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
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


def ceiling(duration_s: float, batch: int) -> float:
    ctx = mp.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_bare_server, args=(port_q, stop))
    server.start()
    try:
        port = port_q.get(timeout=30)
        result = drive(f"http://127.0.0.1:{port}/webhooks/instagram", batch, duration_s)
    finally:
        stop.set()
        server.join(10)
    return float(result["deliveries"]) / float(result["elapsed"])


# ---- the gateway under test ----


@dataclass
class Consumed:
    count: int = 0
    e2e: list[float] = field(default_factory=list)
    last_at: float = 0.0


async def _consume(gateway: Any, consumed: Consumed, stop: asyncio.Event) -> None:
    from gateway.domain.bus import Subscription

    subscription = Subscription(group="bench", consumer="c1", max_in_flight=5000)
    async with gateway.bus.subscribe(subscription) as consumer:
        while not stop.is_set():
            deliveries = await consumer.receive(500, 0.2)
            if not deliveries:
                continue
            now = time.time()
            for d in deliveries:
                text = d.event.payload.get("message", {}).get("text", "")
                if text.startswith("t="):
                    consumed.e2e.append(now - float(text[2:]))
            consumed.count += len(deliveries)
            consumed.last_at = time.perf_counter()
            await consumer.ack([d.delivery_id for d in deliveries])


async def _await_count(consumed: Consumed, target: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while consumed.count < target and time.monotonic() < deadline:  # noqa: ASYNC110 - a counter
        await asyncio.sleep(0.05)


async def measure(backend: str, batch: int, duration_s: float) -> dict[str, float]:
    from gateway.app import Gateway, Role
    from gateway.config import Config
    from gateway.domain.ids import new_id
    from gateway.domain.models import Account, Connection, ConnectionStatus
    from gateway.security.keyring import generate_key_spec

    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "SWITCHBOARD_GRPC_ADDR": "127.0.0.1:0",
            "SWITCHBOARD_HTTP_ADDR": "127.0.0.1:0",
            "SWITCHBOARD_METRICS_ADDR": "127.0.0.1:0",
            "SWITCHBOARD_ENCRYPTION_KEYS": generate_key_spec("bench"),
            "SWITCHBOARD_DATA_DIR": tmp,
            "SWITCHBOARD_LOG_LEVEL": "error",
            "SWITCHBOARD_LOG_FORMAT": "json",
            "INSTAGRAM_APP_ID": "1234567890",
            "INSTAGRAM_APP_SECRET": SECRET.decode(),
        }
        database = await bench_database(backend, tmp)
        env["SWITCHBOARD_DATABASE_URL"] = database
        if backend == "postgres+redis":
            env["SWITCHBOARD_REDIS_URL"] = REDIS
            env["SWITCHBOARD_REDIS_KEY_PREFIX"] = f"bench:{secrets.token_hex(4)}:"
        try:
            async with Gateway(Config.from_environ(env)) as gateway:
                await gateway.store.migrate()
                async with gateway.store.transaction() as tx:
                    await tx.save_connection(
                        Connection(
                            id=new_id("conn"),
                            tenant_id="bench",
                            channel="instagram",
                            status=ConnectionStatus.CONNECTED,
                            account=Account(external_id=ACCOUNT),
                            connected_at=datetime.now(UTC),
                        )
                    )
                stop = asyncio.Event()
                up: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                serving = asyncio.create_task(
                    gateway.serve(Role.ALL, stop=stop, on_listening=up.set_result)
                )
                listening = await up
                url = f"http://127.0.0.1:{listening.http.port}/webhooks/instagram"
                consumed = Consumed()
                consumer_stop = asyncio.Event()
                consumer = asyncio.create_task(_consume(gateway, consumed, consumer_stop))
                try:
                    return await _run_figures(url, batch, duration_s, consumed)
                finally:
                    consumer_stop.set()
                    await consumer
                    stop.set()
                    await serving
        finally:
            await drop_bench_database(backend, database)


async def _run_figures(
    url: str, batch: int, duration_s: float, consumed: Consumed
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    # Warm up (connections, caches, the first participants and conversations).
    await loop.run_in_executor(None, lambda: drive(url, batch, 1.0, concurrency=16))
    await _await_count(consumed, 1, 30)
    await asyncio.sleep(0.5)
    # Sustained: closed loop, counted until everything is delivered.
    start_count = consumed.count
    started = time.perf_counter()
    closed = await loop.run_in_executor(None, lambda: drive(url, batch, duration_s))
    target = start_count + closed["deliveries"] * batch
    await _await_count(consumed, target, 60)
    done_at = max(consumed.last_at, started + closed["elapsed"])
    events_per_s = (consumed.count - start_count) / (done_at - started)
    await asyncio.sleep(0.5)
    # Latency at an offered 500 events/s.
    consumed.e2e.clear()
    before = consumed.count
    opened = await loop.run_in_executor(
        None, lambda: drive(url, batch, duration_s, rate=500 / batch, concurrency=256)
    )
    await _await_count(consumed, before + opened["deliveries"] * batch, 60)
    return {
        "events_per_s": events_per_s,
        "ack_p50_ms": pct(opened["acks"], 0.5) * 1000,
        "ack_p99_ms": pct(opened["acks"], 0.99) * 1000,
        "e2e_p50_ms": pct(consumed.e2e, 0.5) * 1000,
        "e2e_p99_ms": pct(consumed.e2e, 0.99) * 1000,
        "failed": float(closed["failed"] + opened["failed"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short run (under a minute)")
    parser.add_argument("--backend", default="all", choices=["all", "embedded", "postgres+redis"])
    args = parser.parse_args()
    duration = 3.0 if args.quick else 10.0
    runs = 1 if args.quick else 3
    backends = ["embedded", "postgres+redis"] if args.backend == "all" else [args.backend]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    for backend in backends:
        for batch in (1, 20):
            samples: list[dict[str, float]] = []
            ceilings: list[float] = []
            for _ in range(runs):
                ceilings.append(ceiling(duration, batch))
                samples.append(asyncio.run(measure(backend, batch, duration)))
            figures = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
            top = statistics.median(ceilings)
            units = {"events_per_s": "events/s"}
            for name in ("events_per_s", "ack_p50_ms", "ack_p99_ms", "e2e_p50_ms", "e2e_p99_ms"):
                emit(backend, batch, name, figures[name], units.get(name, "ms"), runs)
            emit(backend, batch, "ceiling_events_per_s", top * batch, "events/s", runs)
            emit(
                backend,
                batch,
                "ratio_to_ceiling",
                figures["events_per_s"] / (top * batch),
                "ratio",
                runs,
            )
            if figures["failed"]:
                emit(backend, batch, "failed_deliveries", figures["failed"], "deliveries", runs)


if __name__ == "__main__":
    main()
