"""Stored inbound items -> Events, payloads in the protobuf JSON mapping of switchboard.v1.

Field names are those of ``protos/switchboard/v1/events.proto`` and ``common.proto``; enums
are their value names, times RFC 3339 strings; empty fields are left out. The gRPC layer
turns a payload into its message with ``json_format.ParseDict``.

Event ids are derived from the connection and the item's dedupe key, so that a delivery
Meta retries, or sends twice, yields the same event id and the outbox keeps it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from gateway.domain.codec import rfc3339
from gateway.domain.events import Event, EventKind
from gateway.domain.ids import derived_id
from gateway.domain.inbound import (
    MESSAGE_KINDS,
    IngestResult,
    RoutedItem,
    message_from_item,
    referral_to_dict,
)
from gateway.domain.models import Attachment, Connection, Message, Participant
from gateway.services.delivery_events import delivery_update

_ATTACHMENT_TYPES = frozenset(
    {
        "image",
        "video",
        "audio",
        "file",
        "share",
        "story_mention",
        "reel",
        "post",
        "story",
        "ephemeral",
        "template",
        "fallback",
        "sticker",
        "media",
    }
)


def build_events(
    routed: Sequence[RoutedItem],
    results: Sequence[IngestResult],
    *,
    recorded_at: datetime | None = None,
) -> list[Event]:
    """One event per item, except received or echoed messages already stored or already
    unsent (their MessageDeleted was published when the unsend came) and edits older than
    one already known. ``recorded_at`` (default: now) dates the confirmations the items
    made."""
    events: list[Event] = []
    for r, result in zip(routed, results, strict=True):
        if r.item.kind in MESSAGE_KINDS and result.duplicate:
            if result.confirmed is not None:
                # Our own message's echo: a confirmation, not a message from another app.
                # Dated when it was recorded, as every DeliveryUpdate is: an echo received
                # before our send's outcome was committed confirms it only after that
                # commit, and its update must not be dated before the SENT one it follows.
                recorded_at = recorded_at or datetime.now(UTC)
                at = max(recorded_at, r.received_at)
                events.append(delivery_update(result.confirmed, at, confirmed=True))
            continue
        if result.own_echo or result.superseded:
            continue
        if r.item.kind in MESSAGE_KINDS and result.deleted_before_arrival:
            # Announcing it now would have subscribers answer a message the customer
            # already took back.
            continue
        conversation = result.conversation
        events.append(
            Event(
                event_id=derived_id("evt", r.connection.id, r.item.dedupe_key),
                tenant_id=r.connection.tenant_id,
                connection_id=r.connection.id,
                channel=r.connection.channel,
                kind=r.item.kind,
                occurred_at=r.item.occurred_at,
                received_at=r.received_at,
                conversation_id=conversation.id if conversation else "",
                payload=payload(r, result),
            )
        )
    return events


def payload(r: RoutedItem, result: IngestResult) -> dict[str, Any]:
    item = r.item
    conversation = result.conversation
    customer = (
        participant_json(conversation.participant)
        if conversation is not None
        else _compact({"channel_user_id": item.customer_id})
    )
    kind = item.kind
    if kind in MESSAGE_KINDS:
        message = result.message or message_from_item(
            item, r.connection, conversation.id if conversation else "", result.message_id
        )
        if kind == EventKind.MESSAGE_ECHOED:
            business = _business(r.connection)
            return _compact(
                {
                    "message": message_json(message, business, result.reply_to_message_id),
                    "is_self": item.is_self,
                }
            )
        window = conversation.window_expires_at if conversation else None
        return _compact(
            {
                "message": message_json(message, customer, result.reply_to_message_id),
                "sender": customer,
                "window_expires_at": rfc3339(window) if window else "",
                "referral": referral_to_dict(item.referral) if item.referral else {},
                "standby": item.standby,
            }
        )
    ids = {"message_id": result.message_id, "external_id": item.external_id}
    if kind == EventKind.MESSAGE_DELETED:
        return _compact(ids)
    if kind == EventKind.MESSAGE_EDITED:
        return _compact({**ids, "text": item.text, "edit_count": item.edit_count})
    if kind == EventKind.REACTION_CHANGED:
        action = "ACTION_REACT" if item.react else "ACTION_UNREACT"
        return _compact(
            {
                **ids,
                "action": action,
                "reaction": item.reaction,
                "emoji": item.emoji,
                "sender": customer,
            }
        )
    if kind == EventKind.MESSAGES_READ:
        return _compact(
            {
                "up_to_message_id": result.message_id,
                "up_to_external_id": item.external_id,
                "watermark": rfc3339(item.occurred_at),
            }
        )
    if kind == EventKind.POSTBACK:
        return _compact(
            {
                "external_id": item.external_id,
                "title": item.title,
                "payload": item.payload,
                "sender": customer,
            }
        )
    if kind == EventKind.REFERRAL:
        return _compact(
            {
                "referral": referral_to_dict(item.referral) if item.referral else {},
                "sender": customer,
            }
        )
    return {"kind": item.raw_kind, "json": item.raw_json}


def participant_json(p: Participant) -> dict[str, Any]:
    return _compact(
        {
            "channel_user_id": p.channel_user_id,
            "username": p.username,
            "name": p.name,
            "picture_url": p.picture_url,
        }
    )


def _business(connection: Connection) -> dict[str, Any]:
    a = connection.account
    return _compact(
        {
            "channel_user_id": a.external_id,
            "username": a.username,
            "name": a.display_name,
            "picture_url": a.picture_url,
        }
    )


def attachment_json(a: Attachment) -> dict[str, Any]:
    kind = a.type if a.type in _ATTACHMENT_TYPES else "other"
    return _compact(
        {
            "type": f"ATTACHMENT_TYPE_{kind.upper()}",
            "url": a.url,
            "mime": a.mime,
            "title": a.title,
            "media_id": a.media_id,
            "raw_type": a.raw_type,
        }
    )


def message_json(m: Message, sender: dict[str, Any], reply_to_message_id: str) -> dict[str, Any]:
    reply = m.content.get("reply_to") or {}
    reply_to: dict[str, Any] = {}
    if isinstance(reply.get("story"), dict):
        reply_to = {"story": _compact(reply["story"])}
    elif reply.get("mid"):
        reply_to = {"message_external_id": reply["mid"]}
    if reply_to and reply_to_message_id:
        reply_to["message_id"] = reply_to_message_id
    return _compact(
        {
            "id": m.id,
            "conversation_id": m.conversation_id,
            "direction": f"DIRECTION_{m.direction.value}",
            "external_id": m.external_id,
            "sender": sender,
            "text": m.text,
            "attachments": [attachment_json(a) for a in m.attachments],
            "reply_to": reply_to,
            "quick_reply_payload": m.content.get("quick_reply_payload", ""),
            "created_at": rfc3339(m.created_at) if m.created_at else "",
            "status": f"MESSAGE_STATUS_{m.status.value}",
            "tenant_id": m.tenant_id,
            "connection_id": m.connection_id,
            "channel": m.channel,
            "deleted": m.deleted,
            "edit_count": m.edit_count,
            "unsupported": bool(m.content.get("unsupported", False)),
        }
    )


def _compact(fields: dict[str, Any]) -> dict[str, Any]:
    """Leaves out empty values, as the protobuf JSON mapping does for defaults: "", 0,
    False, None, {} and [], the values of these types that test false (a truth test costs
    a fraction of comparing each value with each of them)."""
    return {k: v for k, v in fields.items() if v}
