from __future__ import annotations

import dataclasses
from datetime import UTC, timedelta

import pytest

from gateway.domain.errors import NotFound
from gateway.domain.ids import new_id
from gateway.domain.models import (
    Connection,
    Conversation,
    DeliveryError,
    Message,
    MessageStatus,
    Participant,
)
from tests.store.conftest import AnyStore
from tests.store.factories import connection, conversation, message, now, outbound, participant


async def setup_conversation(store: AnyStore) -> tuple[Connection, Participant, Conversation]:
    conn = connection()
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        part = await tx.upsert_participant(participant(conn))
        conv = await tx.upsert_conversation(conversation(conn, part))
    return conn, part, conv


async def test_participant_upsert_keeps_its_id_and_never_blanks_profile_fields(
    store: AnyStore,
) -> None:
    conn = connection()
    first = participant(conn, "igsid-1")
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        stored = await tx.upsert_participant(first)
        assert stored == first
        again = await tx.upsert_participant(
            Participant(
                id=new_id("par"),
                connection_id=conn.id,
                channel_user_id="igsid-1",
                name="New Name",
                profile_fetched_at=None,
            )
        )
        assert await tx.get_participant(first.id) == again
        assert await tx.get_participant("par_missing") is None
    assert again.id == first.id
    assert again.name == "New Name"
    assert (again.username, again.picture_url) == (first.username, first.picture_url)
    assert again.profile_fetched_at == first.profile_fetched_at


async def test_conversation_upsert_returns_the_existing_one_and_times_only_move_forward(
    store: AnyStore,
) -> None:
    conn, part, conv = await setup_conversation(store)
    assert conv.participant == part
    assert conv.created_at is not None
    assert conv.created_at.tzinfo == UTC
    earlier = conv.last_message_at - timedelta(hours=1)  # type: ignore[operator]
    later = conv.last_message_at + timedelta(hours=1)  # type: ignore[operator]
    async with store.transaction() as tx:
        again = await tx.upsert_conversation(
            conversation(
                conn,
                part,
                last_message_at=later,
                last_inbound_at=earlier,
                window_expires_at=None,
            )
        )
        assert await tx.get_conversation(conv.id) == again
        assert await tx.get_conversation("cnv_missing") is None
    assert again.id == conv.id
    assert again.created_at == conv.created_at
    assert again.last_message_at == later
    assert again.last_inbound_at == conv.last_inbound_at
    assert again.window_expires_at == conv.window_expires_at


async def test_conversations_list_most_recent_activity_first_across_pages(
    store: AnyStore,
) -> None:
    conn, other = connection(), connection()
    base = now()
    convs: list[Conversation] = []
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        await tx.save_connection(other)
        for i in range(5):
            part = await tx.upsert_participant(participant(conn))
            convs.append(
                await tx.upsert_conversation(
                    conversation(conn, part, last_message_at=base + timedelta(minutes=(i * 7) % 5))
                )
            )
        part = await tx.upsert_participant(participant(other))
        await tx.upsert_conversation(conversation(other, part))
    wanted = sorted(convs, key=lambda c: (c.last_message_at, c.id), reverse=True)

    seen: list[Conversation] = []
    token = ""
    while True:
        async with store.transaction() as tx:
            page = await tx.list_conversations(
                "t1", connection_id=conn.id, page_size=2, page_token=token
            )
        seen.extend(page.items)
        token = page.next_token
        if not token:
            break
    assert seen == wanted
    async with store.transaction() as tx:
        assert len((await tx.list_conversations("t1", page_size=50)).items) == 6


async def test_message_round_trips_every_field(store: AnyStore) -> None:
    _, _, conv = await setup_conversation(store)
    sent = outbound(conv, due=now(), sent_at=now(), confirmed_at=now(), deleted=True, edit_count=2)
    async with store.transaction() as tx:
        stored, created = await tx.insert_message(sent)
        found = await tx.get_message(sent.id)
        assert await tx.get_message("msg_missing") is None
    assert created is True
    assert stored == sent == found
    assert found.error == DeliveryError("CHANNEL_TRANSIENT", "try again", 2)


async def test_message_without_created_at_gets_one_from_the_store(store: AnyStore) -> None:
    _, _, conv = await setup_conversation(store)
    async with store.transaction() as tx:
        stored, _ = await tx.insert_message(message(conv, created_at=None))
        found = await tx.get_message(stored.id)
    assert stored.created_at is not None
    assert stored == found


async def test_a_resent_channel_message_is_stored_once(store: AnyStore) -> None:
    _, _, conv = await setup_conversation(store)
    first = message(conv, external_id="mid.1")
    async with store.transaction() as tx:
        assert await tx.insert_message(first) == (first, True)
        existing, created = await tx.insert_message(message(conv, external_id="mid.1", text="x"))
        found = await tx.find_message_by_external_id(conv.connection_id, "mid.1")
        assert await tx.find_message_by_external_id(conv.connection_id, "mid.2") is None
        assert await tx.find_message_by_external_id(conv.connection_id, "") is None
    assert (existing, created) == (first, False)
    assert found == first


async def test_a_reused_idempotency_key_returns_the_first_message(store: AnyStore) -> None:
    _, _, conv = await setup_conversation(store)
    first = outbound(conv, due=now(), idempotency_key="key-1")
    async with store.transaction() as tx:
        await tx.insert_message(first)
    async with store.transaction() as tx:
        existing, created = await tx.insert_message(
            outbound(conv, due=now(), idempotency_key="key-1", text="other")
        )
        # Empty external ids and keys never collide.
        _, created_plain = await tx.insert_message(message(conv, external_id=""))
        _, created_plain_2 = await tx.insert_message(message(conv, external_id=""))
    assert (existing, created) == (first, False)
    assert created_plain
    assert created_plain_2


async def test_update_message_writes_its_changing_fields(store: AnyStore) -> None:
    _, _, conv = await setup_conversation(store)
    msg = outbound(conv, due=now())
    async with store.transaction() as tx:
        await tx.insert_message(msg)
        changed = dataclasses.replace(
            msg,
            status=MessageStatus.SENT,
            external_id="mid.out",
            error=None,
            attempts=2,
            next_attempt_at=None,
            sent_at=now(),
            content={"tag": "HUMAN_AGENT"},
            attachments=(),
        )
        await tx.update_message(changed)
        assert await tx.get_message(msg.id) == changed
        with pytest.raises(NotFound):
            await tx.update_message(dataclasses.replace(msg, id="msg_missing"))


async def test_messages_list_newest_first_across_pages(store: AnyStore) -> None:
    _, _, conv = await setup_conversation(store)
    base = now()
    msgs = [message(conv, created_at=base + timedelta(seconds=i // 3)) for i in range(10)]
    async with store.transaction() as tx:
        for msg in msgs:
            await tx.insert_message(msg)
    wanted = sorted(msgs, key=lambda m: (m.created_at, m.id), reverse=True)
    seen: list[Message] = []
    token = ""
    while True:
        async with store.transaction() as tx:
            page = await tx.list_messages(conv.id, page_size=4, page_token=token)
        seen.extend(page.items)
        token = page.next_token
        if not token:
            break
    assert seen == wanted
    async with store.transaction() as tx:
        assert (await tx.list_messages("cnv_missing", page_size=4)).items == []
