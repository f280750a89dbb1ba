"""Meta echoes every message the gateway sends. Under load the echo webhooks are committed
while the outcomes of other sends of the same account are being recorded, each side
holding message ids the other is about to write: neither may fail for it (no webhook
answered 503, no outcome batch lost to a deadlock or a duplicate key), and every send
ends SENT and confirmed exactly once."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY
from switchboard.v1 import common_pb2

from gateway.domain.events import EventKind
from gateway.domain.models import Direction
from tests.outbound.conftest import Out, customer_writes
from tests.outbound.test_echo import subscribe

BATCHERS = ("send-commits", "inbound-commit")
CUSTOMERS = 32
ROUNDS = 8
IN_FLIGHT = 32


async def test_concurrent_sends_and_their_echoes_never_fail_each_other(out: Out) -> None:
    customers = [out.customer]
    for n in range(CUSTOMERS - 1):
        igsid, _, _ = await customer_writes(
            out.gateway, out.control, out.connection, text=f"Hi {n}"
        )
        customers.append(igsid)
    await subscribe(out)
    failed_before = _commit_failures()
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def send(n: int) -> common_pb2.Message:
        async with slots:
            reply = await out.send(
                recipient_id=customers[n % CUSTOMERS],
                text=f"Answer {n}",
                idempotency_key=f"load-{n}",
            )
            return reply.message

    async def customer_writes_again(n: int) -> None:
        # The customers keep writing meanwhile: their messages touch the same
        # conversations as the answers and the echoes.
        async with slots:
            reply = await out.control.send_dm(out.ig_id, f"More {n}", customer=customers[n])
            assert reply["status"] == 200, reply

    sent, _ = await asyncio.gather(
        asyncio.gather(*(send(n) for n in range(CUSTOMERS * ROUNDS))),
        asyncio.gather(*(customer_writes_again(n) for n in range(CUSTOMERS))),
    )
    # One still behind an earlier message of its conversation answers QUEUED.
    for message in sent:
        await out.wait_status(message.id, "MESSAGE_STATUS_SENT")
    await out.control.drain_echoes()
    # A batch that failed is retried job by job and may still succeed: it is the race's
    # trace (a deadlock, or a duplicate external id), which the counter keeps.
    assert _commit_failures() == failed_before
    echoes = [d for d in await out.control.deliveries() if d["kind"] == "echo"]
    assert len(echoes) == len(sent)
    # Answered 200 the first time: a refusal (503) would show as a second attempt.
    assert {(d["status"], d["attempts"]) for d in echoes} == {(200, 1)}
    for message in sent:
        got = await out.get(message.id)
        assert got.HasField("confirmed_at"), message.id
        assert len(got.attempts) == 1
    confirmations = [
        e
        for e in await out.events(EventKind.DELIVERY_UPDATE, 3 * len(sent))
        if "confirmed_at" in e.payload
    ]
    assert sorted(e.payload["message_id"] for e in confirmations) == sorted(m.id for m in sent)
    assert await out.events(EventKind.MESSAGE_ECHOED, timeout_s=0.3) == []
    async with out.gateway.gateway.store.transaction() as tx:
        stored = []
        for conversation_id in {m.conversation_id for m in sent}:
            page = await tx.list_messages(conversation_id, page_size=100)
            stored += [m.id for m in page.items if m.direction is Direction.OUTBOUND]
    assert sorted(stored) == sorted(m.id for m in sent)


def _commit_failures() -> dict[str, float]:
    return {
        name: REGISTRY.get_sample_value(
            "switchboard_group_commit_failures_total", {"batcher": name}
        )
        or 0.0
        for name in BATCHERS
    }
