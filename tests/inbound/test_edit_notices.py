"""Meta's edit notices as they really come: Instagram also notifies messages never edited
(``num_edit`` 0, often without text), and an edit may not carry its new text. Neither may
wipe the stored text. On PostgreSQL + Redis and on the embedded default."""

from __future__ import annotations

import time
from typing import Any

import orjson

from tests.inbound.conftest import Stack
from tests.inbound.subscriber import kinds
from tests.inbound.test_end_to_end import post, signed, stored_messages


async def deliver_edit(stack: Stack, customer: str, *edits: dict[str, Any]) -> None:
    """message_edit items, in this order, in one delivery as Meta posts it, signed with the
    app secret."""
    now = int(time.time() * 1000)
    items = [
        {
            "sender": {"id": customer},
            "recipient": {"id": stack.ig_id},
            "timestamp": now + i,
            "message_edit": edit,
        }
        for i, edit in enumerate(edits)
    ]
    entry = {"id": stack.ig_id, "time": now, "messaging": items}
    body = orjson.dumps({"object": "instagram", "entry": [entry]})
    assert await post(stack, body, signed(stack, body)) == 200


async def test_edit_notices_without_text_never_wipe_the_stored_text(stack: Stack) -> None:
    async with stack.subscriber() as sub:
        sent = await stack.control.send_dm(stack.ig_id, "see you at 5")
        who, mid = sent["customer"], sent["mid"]
        # The notice of a message never edited, then an edit that does not say its text,
        # then one that does.
        await deliver_edit(stack, who, {"mid": mid, "num_edit": 0})
        await deliver_edit(stack, who, {"mid": mid, "num_edit": 1})
        await deliver_edit(stack, who, {"mid": mid, "text": "see you at 6", "num_edit": 2})
        events = await sub.take(4)
        await sub.nothing_more(0.3)
    assert kinds(events) == ["message_received", "raw", "message_edited", "message_edited"]
    received, notice, textless, edited = events
    assert notice.payload["kind"] == "message_edit"
    assert orjson.loads(notice.payload["json"])["message_edit"] == {"mid": mid, "num_edit": 0}
    message_id = received.payload["message"]["id"]
    assert textless.payload == {"message_id": message_id, "external_id": mid, "edit_count": 1}
    assert edited.payload["text"] == "see you at 6"
    (stored,) = await stored_messages(stack, received.conversation_id)
    assert stored.text == "see you at 6"
    assert stored.edit_count == 2


async def test_a_textless_edit_keeps_the_text_while_the_edit_count_moves(stack: Stack) -> None:
    sent = await stack.control.send_dm(stack.ig_id, "order #12")
    async with stack.subscriber() as sub:
        await deliver_edit(stack, sent["customer"], {"mid": sent["mid"], "num_edit": "3"})
        (edited,) = await sub.take(1)
    (stored,) = await stored_messages(stack, edited.conversation_id)
    assert stored.text == "order #12"
    assert stored.edit_count == 3


async def test_a_textless_edit_ahead_of_its_message_keeps_the_messages_text(
    stack: Stack,
) -> None:
    sent = await stack.control.send_dm(stack.ig_id, "first words", deliver=False)
    async with stack.subscriber() as sub:
        await deliver_edit(stack, sent["customer"], {"mid": sent["mid"], "num_edit": 1})
        assert await post(stack, sent["raw"].encode(), sent["signature"]) == 200
        events = await sub.take(2)
        await sub.nothing_more(0.3)
    assert kinds(events) == ["message_edited", "message_received"]
    message = events[1].payload["message"]
    assert message["text"] == "first words"
    assert message["edit_count"] == 1
    (stored,) = await stored_messages(stack, events[1].conversation_id)
    assert stored.text == "first words"
    assert stored.edit_count == 1


async def newer_then_older(stack: Stack, customer: str, mid: str) -> None:
    """Edit 2 ("at 7"), then edit 1 ("at 6") as Meta may reorder them, in two deliveries."""
    await deliver_edit(stack, customer, {"mid": mid, "text": "at 7", "num_edit": 2})
    await deliver_edit(stack, customer, {"mid": mid, "text": "at 6", "num_edit": 1})


async def test_an_older_edit_arriving_after_a_newer_one_is_neither_stored_nor_announced(
    stack: Stack,
) -> None:
    async with stack.subscriber() as sub:
        sent = await stack.control.send_dm(stack.ig_id, "at 5")
        who, mid = sent["customer"], sent["mid"]
        await newer_then_older(stack, who, mid)
        events = await sub.take(2)
        await sub.nothing_more(0.5)
    assert kinds(events) == ["message_received", "message_edited"]
    assert events[1].payload["text"] == "at 7"
    (stored,) = await stored_messages(stack, events[0].conversation_id)
    assert (stored.text, stored.edit_count) == ("at 7", 2)


async def test_an_older_edit_of_a_message_not_arrived_yet_is_not_announced(
    stack: Stack,
) -> None:
    sent = await stack.control.send_dm(stack.ig_id, "at 5", deliver=False)
    who, mid = sent["customer"], sent["mid"]
    async with stack.subscriber() as sub:
        await newer_then_older(stack, who, mid)
        assert await post(stack, sent["raw"].encode(), sent["signature"]) == 200
        events = await sub.take(2)
        await sub.nothing_more(0.5)
    assert kinds(events) == ["message_edited", "message_received"]
    assert events[0].payload["text"] == "at 7"
    message = events[1].payload["message"]
    assert (message["text"], message["edit_count"]) == ("at 7", 2)


async def test_within_one_delivery_an_older_edit_after_a_newer_one_is_not_announced(
    stack: Stack,
) -> None:
    async with stack.subscriber() as sub:
        sent = await stack.control.send_dm(stack.ig_id, "at 5")
        who, mid = sent["customer"], sent["mid"]
        (received,) = await sub.take(1)
        await deliver_edit(
            stack,
            who,
            {"mid": mid, "text": "at 7", "num_edit": 2},
            {"mid": mid, "text": "at 6", "num_edit": 1},
        )
        (edited,) = await sub.take(1)
        await sub.nothing_more(0.5)
    assert (edited.payload["text"], edited.payload["edit_count"]) == ("at 7", 2)
    (stored,) = await stored_messages(stack, received.conversation_id)
    assert (stored.text, stored.edit_count) == ("at 7", 2)


async def test_older_edits_in_order_behind_a_newer_one_kept_early_are_not_announced(
    stack: Stack,
) -> None:
    """Edit 3 is kept for a message not arrived; then one delivery brings edits 1 and 2,
    oldest first: neither is newer than what is kept."""
    sent = await stack.control.send_dm(stack.ig_id, "at 5", deliver=False)
    who, mid = sent["customer"], sent["mid"]
    async with stack.subscriber() as sub:
        await deliver_edit(stack, who, {"mid": mid, "text": "at 8", "num_edit": 3})
        (newest,) = await sub.take(1)
        await deliver_edit(
            stack,
            who,
            {"mid": mid, "text": "at 6", "num_edit": 1},
            {"mid": mid, "text": "at 7", "num_edit": 2},
        )
        await sub.nothing_more(0.5)
    assert (newest.payload["text"], newest.payload["edit_count"]) == ("at 8", 3)
