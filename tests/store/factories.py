"""Test records with every field set, so that round trips check every column."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.domain.events import Event, EventKind, new_event
from gateway.domain.ids import new_id
from gateway.domain.models import (
    Account,
    Attachment,
    Connection,
    ConnectionStatus,
    Conversation,
    DeliveryError,
    Direction,
    Message,
    MessageStatus,
    Participant,
)
from gateway.domain.store import Tx

CHANNEL = "instagram"


def now() -> datetime:
    return datetime.now(UTC)


def connection(
    tenant_id: str = "t1",
    *,
    external_id: str = "",
    status: ConnectionStatus = ConnectionStatus.CONNECTED,
    page_id: str = "",
    created_at: datetime | None = None,
    token_expires_at: datetime | None = None,
    channel: str = CHANNEL,
) -> Connection:
    t = now()
    return Connection(
        id=new_id("conn"),
        tenant_id=tenant_id,
        channel=channel,
        status=status,
        account=Account(
            external_id=external_id or new_id("ig"),
            username="shop",
            display_name="The Shop",
            picture_url="https://cdn.example/p.jpg",
            page_id=page_id,
        ),
        login_flow="instagram",
        scopes=("instagram_business_basic", "instagram_business_manage_messages"),
        token_expires_at=token_expires_at or t + timedelta(days=60),
        connected_at=t - timedelta(minutes=1),
        last_event_at=t,
        last_error="",
        created_at=created_at or t,
    )


def participant(conn: Connection, channel_user_id: str = "", **fields: object) -> Participant:
    values: dict[str, object] = {
        "username": "cust",
        "name": "A Customer",
        "picture_url": "https://cdn.example/c.jpg",
        "profile_fetched_at": now(),
    }
    values.update(fields)
    return Participant(
        id=new_id("par"),
        connection_id=conn.id,
        channel_user_id=channel_user_id or new_id("igsid"),
        **values,  # type: ignore[arg-type]
    )


def conversation(conn: Connection, part: Participant, **fields: object) -> Conversation:
    t = now()
    values: dict[str, object] = {
        "created_at": t,
        "last_message_at": t,
        "last_inbound_at": t,
        "window_expires_at": t + timedelta(hours=24),
    }
    values.update(fields)
    return Conversation(
        id=new_id("cnv"),
        tenant_id=conn.tenant_id,
        connection_id=conn.id,
        channel=conn.channel,
        participant=part,
        **values,  # type: ignore[arg-type]
    )


def message(conv: Conversation, **fields: object) -> Message:
    t = now()
    values: dict[str, object] = {
        "direction": Direction.INBOUND,
        "status": MessageStatus.RECEIVED,
        "external_id": new_id("mid"),
        "sender_id": conv.participant.id,
        "text": "hello ✨",
        "attachments": (
            Attachment(type="image", url="https://cdn.example/i.jpg", mime="image/jpeg"),
            Attachment(type="file", url="u", title="t", media_id="m", raw_type="ig_reel"),
        ),
        "content": {"reply_to": {"mid": "m0"}, "quick_replies": [{"title": "Yes"}]},
        "created_at": t,
    }
    values.update(fields)
    return Message(
        id=new_id("msg"),
        tenant_id=conv.tenant_id,
        connection_id=conv.connection_id,
        conversation_id=conv.id,
        channel=conv.channel,
        **values,  # type: ignore[arg-type]
    )


def outbound(conv: Conversation, *, due: datetime, **fields: object) -> Message:
    values: dict[str, object] = {
        "direction": Direction.OUTBOUND,
        "status": MessageStatus.QUEUED,
        "external_id": "",
        "idempotency_key": new_id("idem"),
        "next_attempt_at": due,
        "error": DeliveryError(reason="CHANNEL_TRANSIENT", message="try again", channel_code=2),
        "attempts": 1,
    }
    values.update(fields)
    return message(conv, **values)


def event(conn: Connection, conversation_id: str = "", **payload: object) -> Event:
    t = now()
    return new_event(
        tenant_id=conn.tenant_id,
        connection_id=conn.id,
        channel=conn.channel,
        kind=EventKind.MESSAGE_RECEIVED,
        occurred_at=t,
        received_at=t,
        conversation_id=conversation_id,
        payload={"message": {"text": "hi", **payload}},
    )


async def stored_conversation(tx: Tx, conn: Connection) -> Conversation:
    """A new customer of ``conn`` and their conversation, stored (``conn`` already is)."""
    return await tx.upsert_conversation(
        conversation(conn, await tx.upsert_participant(participant(conn)))
    )
