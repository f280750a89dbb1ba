"""Meta delivers an unsend before the message it takes back: the AI backend hears of the
unsend and never of the message, on PostgreSQL + Redis and on the embedded default."""

from __future__ import annotations

from switchboard.v1 import messaging_pb2

from tests.helpers import bearer
from tests.inbound.conftest import Stack
from tests.inbound.subscriber import kinds
from tests.inbound.test_end_to_end import messaging, post, stored_messages


async def test_an_unsend_delivered_before_its_message_is_never_announced_as_received(
    stack: Stack,
) -> None:
    sent = await stack.control.send_dm(stack.ig_id, "wrong chat, sorry", deliver=False)
    await stack.control.advance_clock(3)
    unsent = await stack.control.event(
        "unsend", stack.ig_id, customer=sent["customer"], mid=sent["mid"], deliver=False
    )
    async with stack.subscriber() as sub:
        assert await post(stack, unsent["raw"].encode(), unsent["signature"]) == 200
        (deleted,) = await sub.take(1)
        # The late message, then Meta's retry of it.
        for _ in range(2):
            assert await post(stack, sent["raw"].encode(), sent["signature"]) == 200
        await sub.nothing_more(1.0)
    assert deleted.kind == "message_deleted"
    assert deleted.payload == {"external_id": sent["mid"]}
    (stored,) = await stored_messages(stack, deleted.conversation_id)
    assert stored.external_id == sent["mid"]
    assert stored.deleted
    channel, stub = await messaging(stack)
    async with channel:
        one = await stub.GetMessage(
            messaging_pb2.GetMessageRequest(message_id=stored.id),
            metadata=bearer(stack.gateway.token),
        )
    assert one.deleted
    assert one.external_id == sent["mid"]


async def test_an_unsend_ahead_of_its_message_in_one_delivery_hides_it(stack: Stack) -> None:
    customer = await stack.control.create_customer(stack.ig_id)
    mid = "m_unsent_in_the_same_delivery"
    who = customer["igsid"]
    async with stack.subscriber() as sub:
        result = await stack.control.batch(
            [
                {"kind": "unsend", "account": stack.ig_id, "customer": who, "mid": mid},
                {"kind": "message", "account": stack.ig_id, "customer": who, "mid": mid},
                {"kind": "message", "account": stack.ig_id, "customer": who, "text": "still here"},
            ]
        )
        assert result["status"] == 200
        events = await sub.take(2)
        await sub.nothing_more(0.5)
    assert kinds(events) == ["message_deleted", "message_received"]
    deleted, kept = events
    assert deleted.payload["external_id"] == mid
    assert kept.payload["message"]["text"] == "still here"
    history = {m.external_id: m for m in await stored_messages(stack, deleted.conversation_id)}
    assert history[mid].deleted
    assert deleted.payload["message_id"] == history[mid].id
    assert not history[kept.payload["message"]["external_id"]].deleted
