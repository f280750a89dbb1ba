"""``DeliveryUpdate`` events: an outbound message's status changed (or its echo confirmed it).

The payload is ``switchboard.v1.DeliveryUpdate`` in the protobuf JSON mapping (proto field
names, enum value names, RFC 3339 times, empty fields left out). Event ids derive from the
message and the change, so that recording the same change twice yields one event.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from gateway.domain.codec import rfc3339
from gateway.domain.events import Event, EventKind
from gateway.domain.ids import derived_id
from gateway.domain.models import DeliveryError, Message


def error_json(e: DeliveryError) -> dict[str, Any]:
    # The proto's DeliveryError has the dataclass's field names.
    return {k: v for k, v in dataclasses.asdict(e).items() if v not in ("", 0, False)}


def delivery_update_payload(message: Message) -> dict[str, Any]:
    data: dict[str, Any] = {
        "message_id": message.id,
        "external_id": message.external_id,
        "status": f"MESSAGE_STATUS_{message.status.value}",
        "error": error_json(message.error) if message.error else {},
        "attempt": message.attempts,
        "idempotency_key": message.idempotency_key,
        "confirmed_at": rfc3339(message.confirmed_at) if message.confirmed_at else "",
    }
    return {k: v for k, v in data.items() if v not in ("", 0, {}, None)}


def delivery_update(message: Message, now: datetime, *, confirmed: bool = False) -> Event:
    """The event for the message's current status; ``confirmed``: the echo confirmed it."""
    change = "confirmed" if confirmed else f"{message.status.value}:{message.attempts}"
    return Event(
        event_id=derived_id("evt", message.id, change),
        tenant_id=message.tenant_id,
        connection_id=message.connection_id,
        channel=message.channel,
        kind=EventKind.DELIVERY_UPDATE,
        occurred_at=now,
        received_at=now,
        conversation_id=message.conversation_id,
        payload=delivery_update_payload(message),
    )
