"""Every Instagram DM reaches the AI backend: the sandbox signs and POSTs webhooks like
Meta, the gateway stores them and a subscriber receives typed events, on PostgreSQL + Redis
and on the embedded default."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import aiohttp
import grpc.aio
import orjson
import psycopg
import pytest
from switchboard.v1 import common_pb2, messaging_pb2, messaging_pb2_grpc

from channels.instagram.signature import sign
from tests.gateway_harness import store_connection
from tests.helpers import bearer
from tests.inbound.conftest import Stack
from tests.inbound.subscriber import kinds


async def post(stack: Stack, body: bytes, signature: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-Hub-Signature-256"] = signature
    async with (
        aiohttp.ClientSession() as http,
        http.post(stack.webhook_url, data=body, headers=headers) as reply,
    ):
        return reply.status


def signed(stack: Stack, body: bytes) -> str:
    return sign(body, stack.sandbox.settings.instagram_app_secret.encode())


async def messaging(stack: Stack) -> tuple[grpc.aio.Channel, messaging_pb2_grpc.MessagingStub]:
    channel = grpc.aio.insecure_channel(stack.gateway.grpc_target)
    return channel, messaging_pb2_grpc.MessagingStub(channel)


async def stored_messages(stack: Stack, conversation_id: str) -> list[Any]:
    channel, stub = await messaging(stack)
    async with channel:
        reply = await stub.ListMessages(
            messaging_pb2.ListMessagesRequest(conversation_id=conversation_id, page_size=100),
            metadata=bearer(stack.gateway.token),
        )
    return list(reply.messages)


async def quarantine(stack: Stack) -> list[Any]:
    async with stack.gateway.gateway.store.transaction() as tx:
        return await tx.list_quarantine(channel="instagram")


async def test_a_dm_reaches_the_subscriber_with_participant_and_window(stack: Stack) -> None:
    customer = await stack.control.create_customer(stack.ig_id, name="Ada Lovelace", username="ada")
    async with stack.subscriber() as sub:
        sent = await stack.control.send_dm(
            stack.ig_id, "Hello 👋 / ça va?", customer=customer["igsid"]
        )
        assert sent["status"] == 200
        (event,) = await sub.take(1)
    assert event.kind == "message_received"
    assert event.tenant_id == "t1"
    assert event.connection_id == stack.connection.id
    message = event.payload["message"]
    assert message["text"] == "Hello 👋 / ça va?"
    assert message["external_id"] == sent["mid"]
    assert message["direction"] == "DIRECTION_INBOUND"
    assert event.payload["sender"]["channel_user_id"] == customer["igsid"]
    assert "window_expires_at" in event.payload
    assert message["conversation_id"] == event.conversation_id

    # The profile is fetched in the background; history shows it once known.
    inbound = stack.gateway.gateway.inbound
    assert inbound is not None
    assert inbound._enricher is not None
    await inbound._enricher.idle()
    channel, stub = await messaging(stack)
    async with channel:
        conversations = await stub.ListConversations(
            messaging_pb2.ListConversationsRequest(tenant_id="t1"),
            metadata=bearer(stack.gateway.token),
        )
        (conv,) = conversations.conversations
        assert conv.id == event.conversation_id
        assert conv.participant.channel_user_id == customer["igsid"]
        assert conv.participant.username == "ada"
        assert conv.participant.name == "Ada Lovelace"
        assert conv.window_expires_at.seconds > 0
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.ListConversations(
                messaging_pb2.ListConversationsRequest(tenant_id="t1"),
                metadata=bearer("sb_nobody"),
            )
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    (stored,) = await stored_messages(stack, event.conversation_id)
    assert stored.sender.username == "ada"


async def test_a_token_meta_rejects_on_a_profile_lookup_turns_the_connection_needs_reauth(
    stack: Stack,
) -> None:
    """A connection that only receives learns of a revoked token from its profile lookups.

    The message and the connection's change are keyed apart (conversation, connection), so
    the bus may hand them over in either order: only order within a conversation holds."""
    await stack.control.revoke(account=stack.ig_id)
    async with stack.subscriber() as sub:
        await stack.control.send_dm(stack.ig_id, "anyone there?")
        first = await sub.take(1)
        inbound = stack.gateway.gateway.inbound
        assert inbound is not None
        assert inbound._enricher is not None
        await inbound._enricher.idle()
        events = {event.kind: event for event in first + await sub.take(1)}
    assert set(events) == {"message_received", "connection_changed"}
    changed = events["connection_changed"]
    assert changed.payload["connection"]["status"] == "CONNECTION_STATUS_NEEDS_REAUTH"
    async with stack.gateway.gateway.store.transaction() as tx:
        conn = await tx.get_connection(stack.connection.id)
    assert conn is not None
    assert conn.status.value == "NEEDS_REAUTH"


async def test_a_delivery_that_names_only_the_page_is_routed_by_the_page(
    stack: Stack,
) -> None:
    """Some of Meta's deliveries for a Facebook Login account name its Page (entry id and
    recipient PAGE_ID, object "page"), and a thread another app controls comes in
    standby[]: routed by the Page, stored and delivered all the same."""
    account = await stack.control.create_account(flow="facebook", username="paged")
    conn = await store_connection(
        stack.gateway, stack.control, account, tenant="t1", flow="facebook"
    )
    async with stack.subscriber() as sub:
        for text, standby in (("via the page", False), ("in standby", True)):
            sent = await stack.control.send_dm(
                account["ig_id"], text, via_page=True, standby=standby
            )
            assert sent["status"] == 200
            assert sent["payload"]["object"] == "page"
            [entry] = sent["payload"]["entry"]
            assert entry["id"] == account["page_id"]
            assert "standby" in entry if standby else "messaging" in entry
        received = await sub.take(2)
    assert [e.payload["message"]["text"] for e in received] == ["via the page", "in standby"]
    # Another app controls the standby thread: the consumer is told so.
    assert [e.payload.get("standby", False) for e in received] == [False, True]
    assert {e.connection_id for e in received} == {conn.id}
    assert await quarantine(stack) == []


async def test_every_kind_arrives_typed_and_updates_the_stored_message(stack: Stack) -> None:
    c = stack.control
    a = stack.ig_id
    async with stack.subscriber() as sub:
        first = await c.send_dm(a, "helo")
        who = first["customer"]
        mid = first["mid"]
        await c.send_dm(
            a,
            "look",
            customer=who,
            attachments=[{"type": "image", "payload": {"url": "https://cdn/x.jpg"}}],
            reply_to={"mid": mid},
            quick_reply="YES",
        )
        await c.event("edit", a, customer=who, mid=mid, text="hello", num_edit=1)
        await c.event("reaction", a, customer=who, mid=mid, reaction="love", emoji="❤️")
        await c.event("reaction", a, customer=who, mid=mid, action="unreact")
        await c.event("read", a, customer=who, mid=mid)
        await c.event("postback", a, customer=who, title="Start", payload="GO")
        await c.event("referral", a, customer=who, ref="promo")
        await c.event("unsend", a, customer=who, mid=mid)
        events = await sub.take(9)
        await sub.nothing_more(0.3)
    assert kinds(events) == [
        "message_received",
        "message_received",
        "message_edited",
        "reaction_changed",
        "reaction_changed",
        "messages_read",
        "postback",
        "referral",
        "message_deleted",
    ]
    assert len({e.conversation_id for e in events}) == 1
    received, second, edited, react, unreact, read, postback, referral, deleted = events
    msg_id = received.payload["message"]["id"]
    attachment = second.payload["message"]["attachments"][0]
    assert attachment["type"] == "ATTACHMENT_TYPE_IMAGE"
    assert attachment["url"] == "https://cdn/x.jpg"
    assert second.payload["message"]["reply_to"] == {
        "message_external_id": mid,
        "message_id": msg_id,
    }
    assert second.payload["message"]["quick_reply_payload"] == "YES"
    assert edited.payload == {
        "message_id": msg_id,
        "external_id": mid,
        "text": "hello",
        "edit_count": 1,
    }
    assert react.payload["action"] == "ACTION_REACT"
    assert react.payload["emoji"] == "❤️"
    assert unreact.payload["action"] == "ACTION_UNREACT"
    assert read.payload["up_to_message_id"] == msg_id
    assert postback.payload["payload"] == "GO"
    assert referral.payload["referral"]["ref"] == "promo"
    assert deleted.payload == {"message_id": msg_id, "external_id": mid}
    messages = await stored_messages(stack, received.conversation_id)
    original = next(m for m in messages if m.external_id == mid)
    assert original.text == "hello"
    assert original.edit_count == 1
    assert original.deleted


async def test_a_story_reply_keeps_its_link_sticker_and_media_stays_media(stack: Stack) -> None:
    story = {"id": "st-9", "url": "https://cdn/story.mp4", "link_sticker_url": "https://shop/x"}
    async with stack.subscriber() as sub:
        await stack.control.send_dm(
            stack.ig_id,
            "where is this?",
            reply_to={"story": story},
            attachments=[{"type": "media", "payload": {"url": "https://cdn/m.jpg"}}],
        )
        (event,) = await sub.take(1)
    message = event.payload["message"]
    assert message["reply_to"] == {"story": story}
    assert message["attachments"] == [
        {"type": "ATTACHMENT_TYPE_MEDIA", "url": "https://cdn/m.jpg", "raw_type": "media"}
    ]
    (stored,) = await stored_messages(stack, event.conversation_id)
    assert stored.reply_to.story.link_sticker_url == "https://shop/x"
    assert stored.attachments[0].type == common_pb2.ATTACHMENT_TYPE_MEDIA


async def test_meta_retries_and_duplicates_are_published_once(stack: Stack) -> None:
    async with stack.subscriber() as sub:
        sent = await stack.control.send_dm(stack.ig_id, "once")
        reacted = await stack.control.event(
            "reaction", stack.ig_id, customer=sent["customer"], mid=sent["mid"]
        )
        for delivery in (sent, reacted, sent):
            retried = await stack.control.retry_delivery(delivery["delivery_id"])
            assert retried["status"] == 200
        events = await sub.take(2)
        await sub.nothing_more(1.0)
    assert kinds(events) == ["message_received", "reaction_changed"]
    assert len(await stored_messages(stack, events[0].conversation_id)) == 1


async def test_a_repeat_that_comes_after_publishing_is_not_published_again(
    stack: Stack,
) -> None:
    # Meta resends a delivery whose 200 it missed, maybe long after the gateway published
    # it. A message is deduped by its row; a reaction, a read or an edit only by its event.
    async with stack.subscriber() as sub:
        sent = await stack.control.send_dm(stack.ig_id, "once")
        reacted = await stack.control.event(
            "reaction", stack.ig_id, customer=sent["customer"], mid=sent["mid"]
        )
        read = await stack.control.event(
            "read", stack.ig_id, customer=sent["customer"], mid=sent["mid"]
        )
        first = await sub.take(3)
        relay = stack.gateway.gateway.relay
        assert relay is not None
        async with asyncio.timeout(5):
            while relay.settled < relay.published:  # noqa: ASYNC110 - the relay's task settles
                await asyncio.sleep(0.05)
        for delivery in (reacted, read, sent):
            retried = await stack.control.retry_delivery(delivery["delivery_id"])
            assert retried["status"] == 200
        await sub.nothing_more(1.5)
    assert kinds(first) == ["message_received", "reaction_changed", "messages_read"]


async def test_a_batch_of_many_entries_is_stored_whole(stack: Stack) -> None:
    other, other_conn = await stack.connect_account(username="second")
    items = [{"kind": "message", "account": stack.ig_id, "text": f"m{n}"} for n in range(40)]
    items += [{"kind": "message", "account": other["ig_id"], "text": f"o{n}"} for n in range(10)]
    async with stack.subscriber() as sub:
        result = await stack.control.batch(items, entry_per_item=True)
        assert result["status"] == 200
        events = await sub.take(50)
        await sub.nothing_more(0.3)
    texts = sorted(e.payload["message"]["text"] for e in events)
    assert texts == sorted(i["text"] for i in items)
    assert {e.tenant_id for e in events if e.connection_id == other_conn.id} == {"t2"}
    assert sum(e.connection_id == other_conn.id for e in events) == 10


async def test_out_of_order_deliveries_are_kept_in_conversation_time(stack: Stack) -> None:
    first = await stack.control.send_dm(stack.ig_id, "first", deliver=False)
    await stack.control.advance_clock(5)
    second = await stack.control.send_dm(
        stack.ig_id, "second", customer=first["customer"], deliver=False
    )
    async with stack.subscriber() as sub:
        for held in (second, first):
            assert await post(stack, held["raw"].encode(), held["signature"]) == 200
        events = await sub.take(2)
    assert [e.payload["message"]["text"] for e in events] == ["second", "first"]
    history = await stored_messages(stack, events[0].conversation_id)
    assert [m.text for m in history] == ["second", "first"]  # newest first, by Meta's time


async def test_forged_and_unsigned_deliveries_are_403_and_store_nothing(stack: Stack) -> None:
    held = await stack.control.send_dm(stack.ig_id, "forged", deliver=False)
    body = held["raw"].encode()
    assert await post(stack, body, None) == 403
    assert await post(stack, body, sign(body, b"not the secret")) == 403
    assert await post(stack, body, "sha256=zz") == 403
    tampered = body.replace(b"forged", b"FORGED")
    assert await post(stack, tampered, held["signature"]) == 403
    async with stack.gateway.gateway.store.transaction() as tx:
        page = await tx.list_conversations("t1", page_size=10)
    assert page.items == []
    async with aiohttp.ClientSession() as http, http.get(stack.gateway.metrics_url) as reply:
        text = await reply.text()
    assert (
        'switchboard_webhook_signature_rejections_total{channel="instagram",reason="missing"}'
        in text
    )
    assert 'reason="mismatch"' in text


async def test_malformed_bodies_are_400_and_quarantined(stack: Stack) -> None:
    for body in (b"not json at all", b'{"object":"instagram"}', b"[1,2]"):
        assert await post(stack, body, signed(stack, body)) == 400
    kept = await quarantine(stack)
    assert {q.body for q in kept} == {b"not json at all", b'{"object":"instagram"}', b"[1,2]"}
    assert {q.reason for q in kept} == {"MALFORMED"}


async def test_unknown_accounts_and_dashboard_tests_are_acknowledged_not_delivered(
    stack: Stack,
) -> None:
    stranger = await stack.control.create_account(username="stranger")
    test_body = orjson.dumps(
        {
            "object": "instagram",
            "entry": [
                {
                    "id": "0",
                    "time": 1,
                    "changes": [{"field": "messages", "value": {"sender": {"id": "12334"}}}],
                }
            ],
        }
    )
    async with stack.subscriber() as sub:
        sent = await stack.control.send_dm(stranger["ig_id"], "who are you?")
        assert sent["status"] == 200
        assert await post(stack, test_body, signed(stack, test_body)) == 200
        await sub.nothing_more(1.0)
    (kept,) = await quarantine(stack)
    assert kept.reason == "UNKNOWN_ACCOUNT"
    assert kept.account_id == stranger["ig_id"]
    assert orjson.loads(kept.body)["message"]["text"] == "who are you?"


async def test_store_down_answers_503_then_metas_retry_succeeds(stack: Stack) -> None:
    async with stack.subscriber() as sub:
        async with store_down(stack):
            sent = await stack.control.send_dm(stack.ig_id, "during the outage")
            assert sent["status"] == 503
        deadline = time.monotonic() + 40
        status = sent["status"]
        while status != 200:
            assert time.monotonic() < deadline, "the store did not come back"
            await asyncio.sleep(0.5)
            status = (await stack.control.retry_delivery(sent["delivery_id"]))["status"]
        (event,) = await sub.take(1, timeout_s=30)
        assert event.payload["message"]["text"] == "during the outage"
        # Meta retrying again after the success changes nothing.
        assert (await stack.control.retry_delivery(sent["delivery_id"]))["status"] == 200
        await sub.nothing_more(1.0)
    # The pool may still hold a connection the outage killed: readers retry UNAVAILABLE.
    for _ in range(5):
        try:
            stored = await stored_messages(stack, event.conversation_id)
            break
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
    assert len(stored) == 1


@pytest.mark.gateway_env(WEBHOOK_ACK_TIMEOUT_SECONDS=0.5)
@pytest.mark.parametrize(
    "inbound_backend",
    [pytest.param("postgres+redis", marks=pytest.mark.postgres)],
    indirect=True,
)
async def test_a_store_too_slow_to_commit_answers_503_and_the_retry_is_deduplicated(
    stack: Stack,
) -> None:
    async with stack.subscriber() as sub:
        # Messages locked against writes: the commit waits past the ack timeout.
        async with await psycopg.AsyncConnection.connect(stack.database) as locker:
            await locker.execute("LOCK TABLE messages IN EXCLUSIVE MODE")
            started = time.monotonic()
            sent = await stack.control.send_dm(stack.ig_id, "slow day")
            assert sent["status"] == 503
            assert time.monotonic() - started < 3
            await locker.rollback()
        # The commit that outlived its answer lands; Meta's retry of it is then a duplicate.
        (event,) = await sub.take(1, timeout_s=10)
        assert event.payload["message"]["text"] == "slow day"
        assert (await stack.control.retry_delivery(sent["delivery_id"]))["status"] == 200
        await sub.nothing_more(1.0)
    assert len(await stored_messages(stack, event.conversation_id)) == 1


class store_down:
    """Makes the gateway's database refuse work, then restores it."""

    def __init__(self, stack: Stack) -> None:
        self._stack = stack
        self._lock: sqlite3.Connection | None = None

    async def __aenter__(self) -> None:
        if self._stack.backend == "embedded":
            # An exclusive lock held elsewhere: the gateway's writers time out as "locked".
            path = self._stack.database.removeprefix("sqlite:///")
            self._lock = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._lock.execute("BEGIN EXCLUSIVE")
            return
        await self._pg(
            "ALTER DATABASE {db} ALLOW_CONNECTIONS false",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = '{name}' AND pid <> pg_backend_pid()",
        )

    async def __aexit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.execute("ROLLBACK")
            self._lock.close()
            return
        await self._pg("ALTER DATABASE {db} ALLOW_CONNECTIONS true")

    async def _pg(self, *statements: str) -> None:
        url = self._stack.database
        name = url.rsplit("/", 1)[1].split("?")[0]
        admin = url.rsplit("/", 1)[0] + "/postgres"
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            for sql in statements:
                await conn.execute(sql.format(db=f'"{name}"', name=name).encode())


async def test_metrics_count_deliveries_events_and_ack_latency(stack: Stack) -> None:
    await stack.control.send_dm(stack.ig_id, "count me")
    async with aiohttp.ClientSession() as http, http.get(stack.gateway.metrics_url) as reply:
        text = await reply.text()
    assert 'switchboard_webhook_deliveries_total{channel="instagram",outcome="accepted"}' in text
    assert 'switchboard_inbound_events_total{channel="instagram",kind="message_received"}' in text
    assert "switchboard_webhook_ack_seconds_bucket" in text
