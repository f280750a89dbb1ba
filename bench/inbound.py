"""Inbound benchmark: signed webhook POSTs -> stored -> delivered to a consumer.

Usage: ``python -m bench.inbound [--quick] [--backend embedded|postgres+redis|all]``.

For each backend and batch size (1 or 20 events per delivery) it reports, as one JSON line
per figure (DESIGN.md §8): ``events_per_s`` (the best of closed loops at rising
concurrency, everything durable and delivered), ``ack_p50_ms``/``ack_p99_ms`` (POST to
200) and ``e2e_p50_ms``/``e2e_p99_ms`` (POST to the event reaching a
``Messaging.Subscribe`` consumer) at an offered 500 events/s, the ceiling measured in the
same run (a bare aiohttp handler that checks the signature and answers 200, at the same
concurrencies) and the ratio. Figures are medians of the runs (1 with ``--quick``, else 3).

Beside them, where the events' CPU goes: ``cpu_ms_per_event`` for each process (its
``"process"``: ``webhook`` and ``grpc``, or the embedded ``gateway``; ``postgres``, the
backends serving the bench's database; ``redis``; the ``consumer`` and the ``load
generator``), CPU milliseconds spent during a phase (until its last event reached the
consumer) per event it stored, for two phases (its ``"load"``): the 500 events/s one, and
the closed loop that gave ``events_per_s`` (``"sustained"``). All of them share the
machine's cores: their sum, against the cores there are, is how busy the machine was at
500 events/s, which is what decides the p99 there, and what caps the sustained rate. The
ceiling's own split, ``ceiling_cpu_ms_per_event`` (the ``bare handler`` and the ``load
generator``, at its best closed loop), shows what the ratio is made of.

The gateway runs as it is deployed (``bench._common.TOPOLOGY``): one process on the embedded
default, the two containers of a pod (``serve http``, ``serve grpc``) on PostgreSQL and
Redis. Three more processes: the load generator (signed POSTs, each message's text
stamped ``t=<send time>|<phase>``), the bare handler for the ceiling, and the consumer: a
real gRPC ``Messaging.Subscribe`` client (``SwitchboardClient`` with an API token the bench
creates; ``max_batch`` 100, ``max_in_flight`` 1000, one ``Ack`` per response covering all
its deliveries). The consumer counts first deliveries per phase in shared memory (the
closed-loop rate is counted until the last event reaches it) and sends back its
receive-time minus stamp for every event of the 500 events/s phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

import aiohttp
import orjson

from bench._common import (
    GatewayProcesses,
    bare_webhook_receiver,
    bench_database,
    cpu_meter,
    drop_bench_database,
    install_uvloop,
    reap,
    redis_prefix,
)
from bench.cpu import CpuSnapshot, median_by_role, ms_per

SECRET = b"bench-app-secret"
ACCOUNT = "17841400000099999"
CUSTOMERS = 200
REDIS = os.environ.get("SWITCHBOARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TENANT = "bench"
# Load phases, stamped into each message so the consumer counts them apart.
# Closed-loop phases, one per concurrency in CLOSED_CONCURRENCY (rising), from CLOSED on.
WARM, OPEN, CLOSED = 0, 1, 2
# The sustained rate is the best of these, for the gateway and the ceiling alike: a bare
# handler peaks with few requests in flight, while a gateway that answers after a group
# commit needs more of them in flight to fill its batches (Meta does not wait for one
# delivery's answer before sending the next).
CLOSED_CONCURRENCY = (64, 256)
PHASES = CLOSED + len(CLOSED_CONCURRENCY)
OFFERED_EVENTS_PER_S = 500
# The phases the CPU figures are given for (their "load").
OFFERED_LOAD = f"{OFFERED_EVENTS_PER_S} events/s"
SUSTAINED_LOAD = "sustained"


def emit(
    backend: str, batch: int, figure: str, value: float, unit: str, runs: int, **extra: object
) -> None:
    line = {
        "bench": "inbound",
        "backend": backend,
        "batch": batch,
        "figure": figure,
        "value": round(value, 3 if unit == "ms/event" else 2),
        "unit": unit,
        "runs": runs,
        **extra,
    }
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- the load generator (a separate process) ----


def _body(seq: int, batch: int, phase: int) -> bytes:
    sent = time.time()
    items = [
        {
            "sender": {"id": str(5_200_000_000_000_000 + (seq * batch + i) % CUSTOMERS)},
            "recipient": {"id": ACCOUNT},
            "timestamp": int(sent * 1000),
            "message": {"mid": f"mid-{os.getpid()}-{seq}-{i}", "text": f"t={sent:.6f}|{phase}"},
        }
        for i in range(batch)
    ]
    entry = {"id": ACCOUNT, "time": int(sent * 1000), "messaging": items}
    return orjson.dumps({"object": "instagram", "entry": [entry]}).replace(b"/", b"\\/")


async def _drive(
    url: str, batch: int, phase: int, duration_s: float, rate: float | None, concurrency: int
) -> dict[str, Any]:
    """Closed loop (``rate`` None: ``concurrency`` requests in flight) or open loop at
    ``rate`` deliveries per second; returns ack latencies (s), counts and the wall-clock
    start (``begin_wall``, comparable with the consumer's receive times)."""
    acks: list[float] = []
    failed = 0
    seq = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one() -> None:
            nonlocal seq, failed
            seq += 1
            body = _body(seq, batch, phase)
            signature = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
            started = time.perf_counter()
            headers = {"X-Hub-Signature-256": signature, "Content-Type": "application/json"}
            async with http.post(url, data=body, headers=headers) as reply:
                await reply.read()
                if reply.status == 200:
                    acks.append(time.perf_counter() - started)
                else:
                    failed += 1

        begin_wall = time.time()
        begin = time.perf_counter()
        cpu_begin = time.process_time()
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
        cpu_s = time.process_time() - cpu_begin
    return {
        "cpu_s": cpu_s,
        "acks": acks,
        "failed": failed,
        "elapsed": elapsed,
        "deliveries": len(acks),
        "begin_wall": begin_wall,
    }


def _drive_process(args: tuple[str, int, int, float, float | None, int], out: Any) -> None:
    install_uvloop()
    out.put(asyncio.run(_drive(*args)))


def drive(
    url: str,
    batch: int,
    duration_s: float,
    *,
    phase: int = WARM,
    rate: float | None = None,
    concurrency: int = 64,
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(
        target=_drive_process,
        args=((url, batch, phase, duration_s, rate, concurrency), out),
        daemon=True,
    )
    proc.start()
    try:
        result: dict[str, Any] = out.get(timeout=duration_s + 120)
    finally:
        reap(proc, grace_s=5)
    return result


# ---- the ceiling: a bare handler that checks the signature and answers 200 ----


def ceiling(duration_s: float, batch: int) -> dict[str, Any]:
    """The bare handler's best closed loop of CLOSED_CONCURRENCY: its deliveries per second
    (``"rate"``) and, under ``"cpu"``, what the handler and the load generator spent on it,
    in CPU ms per event."""
    best: dict[str, Any] = {"rate": 0.0, "cpu": {}}
    with bare_webhook_receiver(SECRET) as bare:
        for concurrency in CLOSED_CONCURRENCY:
            roles = {"bare handler": [bare.pid]}
            before = CpuSnapshot.of(roles)
            result = drive(bare.url, batch, duration_s, concurrency=concurrency)
            spent = CpuSnapshot.of(roles).since(before)
            spent["load generator"] = result["cpu_s"]
            rate = float(result["deliveries"]) / float(result["elapsed"])
            if rate > best["rate"]:
                best = {"rate": rate, "cpu": ms_per(spent, result["deliveries"] * batch)}
    return best


# ---- the consumer: a Messaging.Subscribe client (a separate process) ----


async def _subscribe(target: str, token: str, counts: Any, stop: MpEvent) -> list[float]:
    """Reads the stream until ``stop``; counts first deliveries per phase into ``counts``
    (``[2 * phase]``: events, ``[2 * phase + 1]``: wall time of the last one) and returns
    the receive-time-minus-stamp of every event of the open-loop phase."""
    import grpc
    from google.protobuf import duration_pb2
    from switchboard.v1 import messaging_pb2

    from clients.client import SwitchboardClient

    e2e: list[float] = []
    # Acks to send; None half-closes the stream.
    outgoing: asyncio.Queue[messaging_pb2.SubscribeRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[messaging_pb2.SubscribeRequest]:
        yield messaging_pb2.SubscribeRequest(
            start=messaging_pb2.SubscribeStart(
                group="bench",
                consumer="c1",
                tenant_ids=[TENANT],
                max_in_flight=1000,
                max_batch=100,
                ack_deadline=duration_pb2.Duration(seconds=60),
            )
        )
        while (request := await outgoing.get()) is not None:
            yield request

    async def consume(stream: Any) -> None:
        async for response in stream:
            now = time.time()
            for d in response.deliveries:
                text = d.event.message_received.message.text
                if d.attempt != 1 or not text.startswith("t="):
                    continue
                stamp, _, phase_text = text[2:].partition("|")
                phase = int(phase_text)
                counts[2 * phase] += 1
                counts[2 * phase + 1] = now
                if phase == OPEN:
                    e2e.append(now - float(stamp))
            ack = messaging_pb2.Ack(delivery_ids=[d.delivery_id for d in response.deliveries])
            outgoing.put_nowait(messaging_pb2.SubscribeRequest(ack=ack))

    async with SwitchboardClient(target, token) as client:
        stream = client.messaging.Subscribe(requests())
        reading = asyncio.create_task(consume(stream))
        while not stop.is_set() and not reading.done():  # noqa: ASYNC110 - a multiprocessing event
            await asyncio.sleep(0.05)
        if reading.done():  # the stream ended or failed before we asked it to
            reading.result()
            raise RuntimeError("bench: the Subscribe stream ended early")
        # Half-close and read to the end: the server ends the call once its bus consumer is
        # closed, so the gateway is not shut down under a consumer still reading.
        outgoing.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(reading), 10)
        except TimeoutError:
            stream.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reading
    return e2e


def _subscribe_process(target: str, token: str, counts: Any, stop: MpEvent, out: Any) -> None:
    install_uvloop()
    try:
        out.put({"e2e": asyncio.run(_subscribe(target, token, counts, stop))})
    except BaseException as exc:
        out.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


class SubscribeConsumer:
    """The Subscribe consumer process, seen from the bench: live per-phase counts, then the
    end-to-end latencies of the open-loop phase."""

    def __init__(self, target: str, token: str) -> None:
        ctx = mp.get_context("spawn")
        self._counts = ctx.Array("d", 2 * PHASES, lock=False)
        self._stop = ctx.Event()
        self._out = ctx.Queue()
        self._proc = ctx.Process(
            target=_subscribe_process,
            args=(target, token, self._counts, self._stop, self._out),
            daemon=True,
        )

    def start(self) -> None:
        self._proc.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def count(self, phase: int) -> int:
        return int(self._counts[2 * phase])

    def last_at(self, phase: int) -> float:
        return float(self._counts[2 * phase + 1])

    async def wait_for(self, phase: int, target: int, timeout_s: float) -> None:
        """Until ``target`` events of ``phase`` arrived, or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        while self.count(phase) < target and time.monotonic() < deadline:
            if not self._proc.is_alive():
                raise SystemExit(f"bench: the Subscribe consumer died: {self._result()}")
            await asyncio.sleep(0.02)

    def _result(self) -> dict[str, Any]:
        try:
            result: dict[str, Any] = self._out.get(timeout=1)
        except queue.Empty:
            return {"error": f"no result (exit code {self._proc.exitcode})"}
        return result

    async def finish(self) -> list[float]:
        """Stops the stream; the open-loop phase's latencies (s)."""
        self._stop.set()
        try:
            result: dict[str, Any] = await asyncio.to_thread(self._out.get, True, 30)
        except queue.Empty:
            raise SystemExit("bench: the Subscribe consumer did not report") from None
        if "error" in result:
            raise SystemExit(f"bench: the Subscribe consumer failed: {result['error']}")
        e2e: list[float] = result["e2e"]
        return e2e

    def close(self) -> None:
        self._stop.set()
        reap(self._proc, grace_s=10)


# ---- the gateway under test ----


async def _prepare(env: dict[str, str]) -> str:
    """Migrates the store, connects the bench account; an API token for the consumer."""
    from gateway.app import Gateway
    from gateway.config import Config
    from gateway.domain.ids import new_id
    from gateway.domain.models import Account, Connection, ConnectionStatus
    from gateway.security.tokens import create_token

    async with Gateway(Config.from_environ(env)) as gateway:
        await gateway.store.migrate()
        async with gateway.store.transaction() as tx:
            await tx.save_connection(
                Connection(
                    id=new_id("conn"),
                    tenant_id=TENANT,
                    channel="instagram",
                    status=ConnectionStatus.CONNECTED,
                    account=Account(external_id=ACCOUNT),
                    connected_at=datetime.now(UTC),
                )
            )
        token, _ = await create_token(
            gateway.store, name="bench", tenants=[TENANT], scopes=["subscribe"]
        )
    return token


async def measure(backend: str, batch: int, duration_s: float) -> dict[str, Any]:
    """The run's figures; under ``"cpu"``, CPU ms per event by process for each load
    (``OFFERED_LOAD``, ``SUSTAINED_LOAD``)."""
    from gateway.security.keyring import generate_key_spec

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as scope:
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
            "INSTAGRAM_WEBHOOK_VERIFY_TOKEN": "bench-verify-token",
        }
        database = await bench_database(backend, tmp)
        env["SWITCHBOARD_DATABASE_URL"] = database
        if backend == "postgres+redis":
            env["SWITCHBOARD_REDIS_URL"] = REDIS
            env["SWITCHBOARD_REDIS_KEY_PREFIX"] = scope.enter_context(redis_prefix(REDIS))
        gateway = GatewayProcesses(env, backend)
        try:
            token = await _prepare(env)
            await asyncio.to_thread(gateway.start)
            url = f"http://127.0.0.1:{gateway.http_port}/webhooks/instagram"
            consumer = SubscribeConsumer(f"127.0.0.1:{gateway.grpc_port}", token)
            try:
                consumer.start()
                # The load generator counts its own CPU (``_drive``).
                pids = {role: [pid] for role, pid in gateway.pids.items()}
                if consumer.pid is not None:
                    pids["consumer"] = [consumer.pid]
                meter = cpu_meter(backend, database, REDIS, pids)
                return await _run_figures(url, batch, duration_s, consumer, meter)
            finally:
                # The stream first, so that the gateway's shutdown has no call to wait for.
                await asyncio.to_thread(consumer.close)
        finally:
            await asyncio.to_thread(gateway.close)
            await drop_bench_database(backend, database)


async def _run_figures(
    url: str,
    batch: int,
    duration_s: float,
    consumer: SubscribeConsumer,
    meter: Callable[[], Awaitable[CpuSnapshot]],
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    # Warm up (connections, caches, the first participants and conversations, the stream)
    # until every warm-up event has reached the consumer.
    warm = await loop.run_in_executor(None, lambda: drive(url, batch, 1.0, concurrency=16))
    await consumer.wait_for(WARM, warm["deliveries"] * batch, 60)
    if consumer.count(WARM) == 0:
        raise SystemExit("bench: no event reached the Subscribe consumer")
    await asyncio.sleep(0.5)
    # Sustained: closed loops, each from its first POST until its last event reaches the
    # consumer, with what each process spent on the best of them.
    rates: list[float] = []
    spends: list[dict[str, float]] = []
    failed = missing = 0
    for offset, concurrency in enumerate(CLOSED_CONCURRENCY):
        phase = CLOSED + offset
        before = await meter()
        closed = await loop.run_in_executor(
            None,
            functools.partial(drive, url, batch, duration_s, phase=phase, concurrency=concurrency),
        )
        target = closed["deliveries"] * batch
        await consumer.wait_for(phase, target, 60)
        spent = (await meter()).since(before)
        spent["load generator"] = closed["cpu_s"]
        begin = closed["begin_wall"]
        done_at = max(consumer.last_at(phase), begin + closed["elapsed"])
        rates.append(consumer.count(phase) / (done_at - begin))
        spends.append(ms_per(spent, consumer.count(phase)))
        failed += closed["failed"]
        missing += max(0, target - consumer.count(phase))
        await asyncio.sleep(0.5)
    # Latency at an offered 500 events/s, and what each process spent on it.
    before = await meter()
    opened = await loop.run_in_executor(
        None,
        lambda: drive(
            url, batch, duration_s, phase=OPEN, rate=OFFERED_EVENTS_PER_S / batch, concurrency=256
        ),
    )
    open_target = opened["deliveries"] * batch
    await consumer.wait_for(OPEN, open_target, 60)
    spent = (await meter()).since(before)
    spent["load generator"] = opened["cpu_s"]
    missing += max(0, open_target - consumer.count(OPEN))
    e2e = await consumer.finish()
    return {
        "cpu": {
            OFFERED_LOAD: ms_per(spent, open_target),
            SUSTAINED_LOAD: spends[rates.index(max(rates))],
        },
        "events_per_s": max(rates),
        "ack_p50_ms": pct(opened["acks"], 0.5) * 1000,
        "ack_p99_ms": pct(opened["acks"], 0.99) * 1000,
        "e2e_p50_ms": pct(e2e, 0.5) * 1000,
        "e2e_p99_ms": pct(e2e, 0.99) * 1000,
        "failed": float(failed + opened["failed"]),
        "undelivered": float(missing),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short run (under a minute)")
    parser.add_argument("--backend", default="all", choices=["all", "embedded", "postgres+redis"])
    args = parser.parse_args()
    duration = 1.5 if args.quick else 10.0
    runs = 1 if args.quick else 3
    backends = ["embedded", "postgres+redis"] if args.backend == "all" else [args.backend]
    for backend in backends:
        for batch in (1, 20):
            samples: list[dict[str, Any]] = []
            ceilings: list[dict[str, Any]] = []
            for _ in range(runs):
                ceilings.append(ceiling(duration, batch))
                samples.append(asyncio.run(measure(backend, batch, duration)))
            figures = {
                k: statistics.median(s[k] for s in samples) for k in samples[0] if k != "cpu"
            }
            top = statistics.median(c["rate"] for c in ceilings)
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
            for load in (OFFERED_LOAD, SUSTAINED_LOAD):
                for role, spent in median_by_role([s["cpu"][load] for s in samples]).items():
                    emit(
                        backend,
                        batch,
                        "cpu_ms_per_event",
                        spent,
                        "ms/event",
                        runs,
                        process=role,
                        load=load,
                    )
            for role, spent in median_by_role([c["cpu"] for c in ceilings]).items():
                emit(
                    backend,
                    batch,
                    "ceiling_cpu_ms_per_event",
                    spent,
                    "ms/event",
                    runs,
                    process=role,
                    load=SUSTAINED_LOAD,
                )
            if figures["failed"]:
                emit(backend, batch, "failed_deliveries", figures["failed"], "deliveries", runs)
            if figures["undelivered"]:
                emit(backend, batch, "undelivered_events", figures["undelivered"], "events", runs)


if __name__ == "__main__":
    main()
