"""A worker claims no more messages than it attempts at once: a message claimed only to
wait for a free slot would spend its lease waiting, and another replica would claim it
again, and send it again, while the first still attempts it."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from switchboard.v1 import common_pb2

from gateway.services.outbound_worker import OutboundWorker
from gateway.store import open_store
from tests.outbound.conftest import Out, customer_writes
from tests.outbound.test_send_order import accepted


async def test_a_message_waiting_for_a_slot_is_not_sent_again_by_another_worker(
    out: Out,
) -> None:
    customers = [out.customer]
    for _ in range(2):
        other_customer, _, _ = await customer_writes(out.gateway, out.control, out.connection)
        customers.append(other_customer)
    await out.throttle()
    # Three conversations, so that the messages are due together once the pause ends.
    ids = []
    for c, customer in enumerate(customers):
        reply = await out.send(text=f"c{c}", recipient_id=customer)
        assert reply.message.status == common_pb2.MESSAGE_STATUS_QUEUED
        ids.append(reply.message.id)
    gateway = out.gateway.gateway
    service, worker = gateway.outbound, gateway.outbound_worker
    assert service is not None
    assert worker is not None
    await worker.aclose()
    first = service.deliverer
    # Meta takes two seconds a call; a claim is leased for five (an attempt may take half of
    # it). Claimed together, the third message would wait four seconds for its slot and
    # still be in its call when its lease lapsed.
    policy = replace(first.policy, lease_s=5.0)
    await out.control.update_settings(latency_ms=2000)
    async with open_store(gateway.config.database_url.reveal()) as store:
        deliverers = [out.other_deliverer(store, policy) for _ in range(2)]
        one_at_a_time = OutboundWorker(store, deliverers[0], poll_s=0.01, concurrency=1)
        other = OutboundWorker(store, deliverers[1], poll_s=0.01)
        try:
            out.advance(130)
            await one_at_a_time.start()
            for _ in range(400):
                if await accepted(out):
                    break
                await asyncio.sleep(0.02)
            # One is sent; another replica starts while the first worker goes on.
            await other.start()
            for message_id in ids:
                await out.wait_status(message_id, "MESSAGE_STATUS_SENT", timeout_s=20)
        finally:
            await other.aclose()
            await one_at_a_time.aclose()
            for deliverer in deliverers:
                await deliverer.aclose()
    assert sorted(await accepted(out)) == ["c0", "c1", "c2"]
