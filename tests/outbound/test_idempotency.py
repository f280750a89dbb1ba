"""An idempotency key sends once per tenant, whatever the callers repeat or race."""

from __future__ import annotations

import asyncio
import secrets

import grpc.aio
import pytest
from switchboard.v1 import common_pb2, messaging_pb2_grpc

from gateway.api.convert_send import send_request
from gateway.domain.errors import InvalidArgument
from gateway.services.outbound import SendOutcome
from tests.gateway_harness import run_gateway
from tests.helpers import bearer
from tests.outbound.conftest import Out


async def test_a_repeat_returns_the_first_message_and_its_status_without_sending(out: Out) -> None:
    first = await out.send(text="Once", idempotency_key="order-1")
    again = await out.send(text="Once", idempotency_key="order-1")
    assert not first.duplicate
    assert again.duplicate
    assert again.message.id == first.message.id
    assert again.message.status == common_pb2.MESSAGE_STATUS_SENT
    assert [a.number for a in again.message.attempts] == [1]
    assert len(await out.bodies()) == 1


async def test_concurrent_identical_calls_send_once(out: Out) -> None:
    replies = await asyncio.gather(
        *(out.send(text="Race", idempotency_key="race-1") for _ in range(8))
    )
    assert len({r.message.id for r in replies}) == 1
    assert sum(not r.duplicate for r in replies) == 1
    await out.wait_status(replies[0].message.id, "MESSAGE_STATUS_SENT")
    assert len(await out.bodies()) == 1


async def test_keys_are_per_tenant(out: Out) -> None:
    first = await out.send(text="a", idempotency_key="shared")
    other = await out.send(text="b", idempotency_key="other")
    assert first.message.id != other.message.id
    assert len(await out.bodies()) == 2


@pytest.mark.postgres
@pytest.mark.parametrize("out_backend", ["postgres+redis"])
async def test_identical_calls_racing_on_two_replicas_send_once(
    out: Out, out_environ: dict[str, str]
) -> None:
    async with (
        run_gateway(out_environ) as second,
        grpc.aio.insecure_channel(second.grpc_target) as channel,
    ):
        other = messaging_pb2_grpc.MessagingStub(channel)
        for round_ in range(5):
            key = f"replicas-{round_}"
            request = out.request(text=f"Race {round_}", idempotency_key=key)
            replies = await asyncio.gather(
                *(
                    stub.SendMessage(request, metadata=bearer(token))
                    for stub, token in [(out.stub, out.gateway.token), (other, second.token)] * 3
                )
            )
            assert len({r.message.id for r in replies}) == 1
            assert sum(not r.duplicate for r in replies) == 1
    bodies = await out.bodies()
    assert sorted(b["message"]["text"] for b in bodies) == [f"Race {i}" for i in range(5)]


async def test_an_oversized_key_is_refused_alone_and_its_batch_goes_on(out: Out) -> None:
    """A key too long for the (tenant, key) index is INVALID_ARGUMENT before anything is
    stored: written, it would fail the whole transaction the calls (and the outcomes of
    sends) that queued with it share."""
    service = out.gateway.gateway.outbound
    assert service is not None
    oversized = secrets.token_urlsafe(6000)  # random: PostgreSQL cannot compress it small
    # Submitted in one turn of the loop: one group commit holds both.
    good, bad = await asyncio.gather(
        service.send(send_request(out.request(text="Fine", idempotency_key="fine-1"))),
        service.send(send_request(out.request(text="Too long", idempotency_key=oversized))),
        return_exceptions=True,
    )
    assert isinstance(good, SendOutcome), (good, bad)
    assert isinstance(bad, InvalidArgument), bad
    assert bad.field == "idempotency_key"
    sent = await out.wait_status(good.message.id, "MESSAGE_STATUS_SENT")
    assert sent.text == "Fine"
    assert [b["message"]["text"] for b in await out.bodies()] == ["Fine"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await out.send(text="Too long", idempotency_key=oversized)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_key_is_taken_as_sent_spaces_included(out: Out) -> None:
    """Keys are opaque: a key of spaces is a key (a repeat sends nothing), and keys that
    differ by a trailing space are two keys (neither message is lost as the other's
    repeat)."""
    first = await out.send(text="Once", idempotency_key="   ")
    again = await out.send(text="Once", idempotency_key="   ")
    assert again.duplicate
    assert again.message.id == first.message.id
    order = await out.send(text="first order", idempotency_key="order-7")
    other = await out.send(text="second order", idempotency_key="order-7 ")
    assert not other.duplicate
    assert other.message.id != order.message.id
    texts = [b["message"]["text"] for b in await out.bodies()]
    assert texts == ["Once", "first order", "second order"]
