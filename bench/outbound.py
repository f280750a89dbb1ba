"""Outbound benchmark: SendMessage calls -> validated, stored, rate-limited, sent to the sandbox.

Usage: ``python -m bench.outbound [--quick] [--backend embedded|postgres+redis|all]``.

For each backend, Meta latency (0 or 50 ms, the sandbox's artificial delay) and client
concurrency it reports, one JSON line per figure (DESIGN.md §8): ``messages_per_s`` (closed
loop, each call answered after its first attempt reached the sandbox and was recorded),
``rpc_p50_ms``/``rpc_p99_ms``, and beside them ``ceiling_messages_per_s`` and
``ratio_to_ceiling``. The ceiling is the same client driving a bare grpc.aio server whose
SendMessage handler only POSTs the body to the sandbox with aiohttp (no validation,
storage or limits). The sandbox and the client each run in a process of their own, and
the gateway runs as it is deployed (``bench._common.TOPOLOGY``), on uvloop like the
ceiling's server. The per-account rate limit is set far above the offered load so that it
is exercised (one bucket decision per send) without capping the figure. The account is
subscribed to webhooks, as a connected one is: the sandbox echoes every message sent, as
Meta does, in both runs. During ours the gateway's webhook sidecar confirms each message
from its echo; during the ceiling's the echoes go to a bare aiohttp handler that checks
their signature and answers 200 (``bench._common.bare_webhook_receiver``), the least any
receiver of Meta's webhooks does. Meta's side of the machine's load is then the same in
both runs, and the ratio compares what the two architectures add to it.

Beside them, for ours, ``cpu_ms_per_message`` for each process (its ``"process"``:
``grpc`` and ``webhook``, or the embedded ``gateway``; ``postgres``, the backends serving
the bench's database; ``redis``; the ``sandbox``; the ``load generator``): CPU
milliseconds per message sent, counted until the sandbox's echoes were all delivered,
since confirming them is part of each send (``bench.cpu``). For the ceiling,
``ceiling_cpu_ms_per_message``, counted the same way: the ``bare server``, the
``sandbox``, the ``bare webhook handler`` of its echoes and the ``load generator``. Side by
side, the two show what the architecture adds to each message, process by process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import secrets
import statistics
import tempfile
import time
from typing import Any

from bench._common import (
    GatewayProcesses,
    bare_webhook_receiver,
    bench_database,
    cpu_meter,
    drop_bench_database,
    emit,
    install_uvloop,
    percentile,
    redis_prefix,
)
from bench.cpu import CpuSnapshot, median_by_role, ms_per

REDIS = os.environ.get("SWITCHBOARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# More customers than concurrent calls: messages to one customer go out one after another
# (send order per conversation), which would cap the rate at the customers' count.
CUSTOMERS = 256


# ---- the sandbox (Meta), in a process of its own ----


def _sandbox_process(out: Any, stop: Any) -> None:
    install_uvloop()

    async def main() -> None:
        from channels.instagram.sandbox import SandboxSettings, start_sandbox

        settings = SandboxSettings.generate()
        async with await start_sandbox(settings) as sandbox:
            out.put((sandbox.url, settings.credentials()))
            while not stop.is_set():  # noqa: ASYNC110 - a multiprocessing event, not asyncio's
                await asyncio.sleep(0.1)

    asyncio.run(main())


# ---- the load generator (a separate process) ----


async def _drive(
    target: str, token: str, requests: list[bytes], concurrency: int, duration_s: float
) -> dict[str, Any]:
    import grpc.aio
    from switchboard.v1 import messaging_pb2, messaging_pb2_grpc

    latencies: list[float] = []
    failed = 0
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = messaging_pb2_grpc.MessagingStub(channel)
        parsed = [messaging_pb2.SendMessageRequest.FromString(r) for r in requests]
        end = time.perf_counter() + duration_s
        counter = 0

        async def loop() -> None:
            nonlocal counter, failed
            while time.perf_counter() < end:
                counter += 1
                request = parsed[counter % len(parsed)]
                started = time.perf_counter()
                try:
                    await stub.SendMessage(request, metadata=metadata)
                except grpc.aio.AioRpcError:
                    failed += 1
                    continue
                latencies.append(time.perf_counter() - started)

        begin = time.perf_counter()
        cpu_begin = time.process_time()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - begin
        cpu_s = time.process_time() - cpu_begin
    return {"latencies": latencies, "failed": failed, "elapsed": elapsed, "cpu_s": cpu_s}


def _drive_process(args: tuple[str, str, list[bytes], int, float], out: Any) -> None:
    install_uvloop()
    out.put(asyncio.run(_drive(*args)))


def drive(
    target: str, token: str, requests: list[bytes], concurrency: int, duration_s: float
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(
        target=_drive_process, args=((target, token, requests, concurrency, duration_s), out)
    )
    proc.start()
    result: dict[str, Any] = out.get(timeout=duration_s + 120)
    proc.join()
    return result


def _figures(result: dict[str, Any]) -> dict[str, float]:
    done = result["latencies"]
    return {
        "messages_per_s": len(done) / result["elapsed"],
        "rpc_p50_ms": percentile(done, 0.5) * 1000,
        "rpc_p99_ms": percentile(done, 0.99) * 1000,
        "failed": float(result["failed"]),
    }


# ---- the ceiling: a bare grpc.aio server that only POSTs the body to the sandbox ----


def _bare_server(send_url: str, meta_token: str, port_out: Any, stop: Any) -> None:
    install_uvloop()

    async def main() -> None:
        import aiohttp
        import grpc.aio
        from switchboard.v1 import common_pb2, messaging_pb2, messaging_pb2_grpc

        session = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {meta_token}"}

        class Bare(messaging_pb2_grpc.MessagingServicer):
            async def SendMessage(
                self, request: messaging_pb2.SendMessageRequest, context: Any
            ) -> messaging_pb2.SendMessageResponse:
                body = {
                    "recipient": {"id": request.recipient_id},
                    "message": {"text": request.text},
                }
                async with session.post(send_url, json=body, headers=headers) as reply:
                    data = await reply.json()
                return messaging_pb2.SendMessageResponse(
                    message=common_pb2.Message(external_id=str(data.get("message_id", "")))
                )

        server = grpc.aio.server()
        messaging_pb2_grpc.add_MessagingServicer_to_server(Bare(), server)  # type: ignore[abstract]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_out.put(port)
        while not stop.is_set():  # noqa: ASYNC110 - a multiprocessing event, not asyncio's
            await asyncio.sleep(0.1)
        await server.stop(1)
        await session.close()

    asyncio.run(main())


def ceiling(
    send_url: str, meta_token: str, requests: list[bytes], concurrency: int, duration_s: float
) -> dict[str, Any]:
    """The bare server's figures; under ``"spent"``, the CPU seconds it and the load
    generator spent, and under ``"messages"``, how many calls they answered."""
    ctx = mp.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_bare_server, args=(send_url, meta_token, port_q, stop))
    server.start()
    try:
        port = port_q.get(timeout=30)
        assert server.pid is not None
        roles = {"bare server": [server.pid]}
        before = CpuSnapshot.of(roles)
        result = drive(f"127.0.0.1:{port}", "", requests, concurrency, duration_s)
        spent = CpuSnapshot.of(roles).since(before)
        spent["load generator"] = result["cpu_s"]
        return {**_figures(result), "spent": spent, "messages": len(result["latencies"])}
    finally:
        stop.set()
        server.join(10)


# ---- the gateway under test ----


async def measure(
    backend: str,
    sandbox_url: str,
    credentials: dict[str, str],
    latency_ms: int,
    concurrencies: list[int],
    duration_s: float,
    sandbox_pid: int | None = None,
) -> dict[int, dict[str, Any]]:
    """The gateway's figures per concurrency, and the ceiling's, measured in the same run;
    with ``"cpu"``, what each process spent per message sent in ours (see ``bench.cpu``)."""
    from switchboard.v1 import messaging_pb2

    from channels.instagram.sandbox import SandboxClient
    from gateway.app import Gateway
    from gateway.config import Config
    from gateway.security.keyring import generate_key_spec
    from gateway.security.tokens import create_token

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as scope:
        env = {
            "SWITCHBOARD_GRPC_ADDR": "127.0.0.1:0",
            "SWITCHBOARD_HTTP_ADDR": "127.0.0.1:0",
            "SWITCHBOARD_METRICS_ADDR": "127.0.0.1:0",
            "SWITCHBOARD_ENCRYPTION_KEYS": generate_key_spec("bench"),
            "SWITCHBOARD_DATA_DIR": tmp,
            "SWITCHBOARD_LOG_LEVEL": "error",
            "SWITCHBOARD_LOG_FORMAT": "json",
            "SWITCHBOARD_SEND_RATE_TEXT_PER_SECOND": "100000",
            "INSTAGRAM_SANDBOX_URL": sandbox_url,
            **credentials,
        }
        database = await bench_database(backend, tmp)
        env["SWITCHBOARD_DATABASE_URL"] = database
        if backend == "postgres+redis":
            env["SWITCHBOARD_REDIS_URL"] = REDIS
            env["SWITCHBOARD_REDIS_KEY_PREFIX"] = scope.enter_context(redis_prefix(REDIS))
        served = GatewayProcesses(env, backend)
        # The bench's account signs in with Instagram: its webhooks carry that app's signature.
        secret = credentials["INSTAGRAM_APP_SECRET"].encode()
        bare_echoes = scope.enter_context(bare_webhook_receiver(secret))
        try:
            # This process prepares the store and watches it; the gateway serves from its own.
            async with (
                Gateway(Config.from_environ(env)) as gateway,
                SandboxClient(sandbox_url) as control,
            ):
                await gateway.store.migrate()
                await control.update_settings(latency_ms=0)
                token, _ = await create_token(gateway.store, name="bench", tenants=["*"], scopes=[])
                account = await control.create_account(username=f"b{secrets.token_hex(3)}")
                ig_id = str(account["ig_id"])
                meta_token = (await control.issue_token(ig_id, "instagram_long"))["access_token"]
                connection_id = await _connect(gateway, ig_id, meta_token)
                await asyncio.to_thread(served.start)
                # The customers' first messages come in as webhooks.
                webhook = f"http://127.0.0.1:{served.http_port}/webhooks/instagram"
                await control.set_webhook(webhook)
                customers = [
                    str((await control.send_dm(ig_id, "hi"))["customer"]) for _ in range(CUSTOMERS)
                ]
                await _await_conversations(gateway, connection_id, customers)
                await control.update_settings(latency_ms=latency_ms)
                requests = [
                    messaging_pb2.SendMessageRequest(
                        tenant_id="bench",
                        connection_id=connection_id,
                        recipient_id=c,
                        text="Thanks for your message!",
                    ).SerializeToString()
                    for c in customers
                ]
                target = f"127.0.0.1:{served.grpc_port}"
                loop = asyncio.get_running_loop()
                send_url = f"{sandbox_url}/graph-instagram/v21.0/{ig_id}/messages"
                await loop.run_in_executor(None, drive, target, token, requests, 8, 1.0)
                # Meta's side, the sandbox, counts in both runs.
                sandbox = {"sandbox": [sandbox_pid]} if sandbox_pid is not None else {}
                pids = {**{role: [pid] for role, pid in served.pids.items()}, **sandbox}
                meter = cpu_meter(backend, database, REDIS, pids)
                # The ceiling's echoes go to a bare handler, not to our webhook process.
                bare_pids = {"bare webhook handler": [bare_echoes.pid], **sandbox}

                results: dict[int, dict[str, Any]] = {}
                for concurrency in concurrencies:
                    # Ours, the gateway confirming every message from Meta's echo...
                    before = await meter()
                    ours = await loop.run_in_executor(
                        None, drive, target, token, requests, concurrency, duration_s
                    )
                    # ...then the ceiling, whose echoes a bare handler takes. The echoes
                    # still queued from one run must not take the other's CPU.
                    await control.drain_echoes()
                    # Measured once the echoes are confirmed: they are part of each send.
                    spent = (await meter()).since(before)
                    spent["load generator"] = ours["cpu_s"]
                    await control.set_webhook(bare_echoes.url)
                    bare_before = CpuSnapshot.of(bare_pids)
                    top = await loop.run_in_executor(
                        None, ceiling, send_url, meta_token, requests, concurrency, duration_s
                    )
                    await control.drain_echoes()
                    top_spent = {**CpuSnapshot.of(bare_pids).since(bare_before), **top["spent"]}
                    await control.set_webhook(webhook)
                    results[concurrency] = {
                        "ours": _figures(ours),
                        "ceiling": top,
                        "cpu": ms_per(spent, len(ours["latencies"])),
                        "ceiling_cpu": ms_per(top_spent, top["messages"]),
                    }
                return results
        finally:
            await asyncio.to_thread(served.close)
            await drop_bench_database(backend, database)


async def _connect(gateway: Any, ig_id: str, meta_token: str) -> str:
    """Stores a connected account with its sealed token and subscribes it to webhooks, as a
    finished OAuth flow would."""
    from datetime import UTC, datetime

    from gateway.config import Secret
    from gateway.domain.connect import AccessToken, connector_of
    from gateway.domain.ids import new_id
    from gateway.domain.models import Account, Connection, ConnectionStatus
    from gateway.services.credentials import seal

    conn = Connection(
        id=new_id("conn"),
        tenant_id="bench",
        channel="instagram",
        status=ConnectionStatus.CONNECTED,
        account=Account(external_id=ig_id),
        login_flow="instagram",
        connected_at=datetime.now(UTC),
    )
    token = AccessToken(value=Secret(meta_token), issued_at=datetime.now(UTC))
    # Subscribed to the account's webhooks as a finished connect is: Meta then echoes every
    # message sent, and confirming those echoes is part of the gateway's load.
    connector = connector_of(gateway.channels.require("instagram"))
    assert connector is not None
    await connector.subscribe(conn.login_flow, conn.account, token)
    sealed = seal(gateway.keyring, conn.id, token)
    async with gateway.store.transaction() as tx:
        await tx.save_connection(conn)
        await tx.put_credential(sealed)
    return conn.id


async def _await_conversations(gateway: Any, connection_id: str, customers: list[str]) -> None:
    deadline = time.monotonic() + 30
    for igsid in customers:
        while True:
            async with gateway.store.transaction() as tx:
                found = await tx.find_conversation_for_recipient(connection_id, igsid)
            if found is not None:
                break
            if time.monotonic() > deadline:
                raise SystemExit("bench: the customers' messages never reached the gateway")
            await asyncio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short run (under a minute)")
    parser.add_argument("--backend", default="all", choices=["all", "embedded", "postgres+redis"])
    args = parser.parse_args()
    duration = 2.0 if args.quick else 8.0
    runs = 1 if args.quick else 3
    latencies = [0] if args.quick else [0, 50]
    concurrencies = [16, 64] if args.quick else [8, 32, 128]
    backends = ["embedded", "postgres+redis"] if args.backend == "all" else [args.backend]
    # This process prepares and waits; every server of the run (the gateway's processes, the
    # ceiling's, the sandbox) runs in its own process on uvloop, like `switchboard serve`.
    ctx = mp.get_context("spawn")
    sandbox_q, sandbox_stop = ctx.Queue(), ctx.Event()
    sandbox = ctx.Process(target=_sandbox_process, args=(sandbox_q, sandbox_stop))
    sandbox.start()
    try:
        sandbox_url, credentials = sandbox_q.get(timeout=30)
        for backend in backends:
            for latency in latencies:
                samples = [
                    asyncio.run(
                        measure(
                            backend,
                            sandbox_url,
                            credentials,
                            latency,
                            concurrencies,
                            duration,
                            sandbox.pid,
                        )
                    )
                    for _ in range(runs)
                ]
                for concurrency in concurrencies:
                    _report(backend, latency, concurrency, [s[concurrency] for s in samples], runs)
    finally:
        sandbox_stop.set()
        sandbox.join(10)


def _report(
    backend: str, latency: int, concurrency: int, samples: list[dict[str, Any]], runs: int
) -> None:
    ours = {k: statistics.median(s["ours"][k] for s in samples) for k in samples[0]["ours"]}
    top = statistics.median(s["ceiling"]["messages_per_s"] for s in samples)
    extra = {"meta_latency_ms": latency, "concurrency": concurrency, "runs": runs}
    emit("outbound", backend, "messages_per_s", ours["messages_per_s"], "messages/s", **extra)
    emit("outbound", backend, "rpc_p50_ms", ours["rpc_p50_ms"], "ms", **extra)
    emit("outbound", backend, "rpc_p99_ms", ours["rpc_p99_ms"], "ms", **extra)
    emit("outbound", backend, "ceiling_messages_per_s", top, "messages/s", **extra)
    emit("outbound", backend, "ratio_to_ceiling", ours["messages_per_s"] / top, "ratio", **extra)
    for figure, key in (
        ("cpu_ms_per_message", "cpu"),
        ("ceiling_cpu_ms_per_message", "ceiling_cpu"),
    ):
        for role, spent in median_by_role([s[key] for s in samples]).items():
            emit("outbound", backend, figure, spent, "ms/message", process=role, **extra)
    if ours["failed"]:
        emit("outbound", backend, "failed_calls", ours["failed"], "calls", **extra)


if __name__ == "__main__":
    main()
