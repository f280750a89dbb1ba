"""Events: what subscribers receive.

An :class:`Event` carries the routing header every consumer filters on and a ``payload``
in the protobuf JSON mapping of the matching ``switchboard.v1`` message (field names as in
the ``.proto`` file). The core builds payloads through the constructors below, so it never
imports protobuf; the gRPC layer turns the payload into the ``Event.payload`` oneof.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway.domain.ids import new_id


class EventKind(enum.StrEnum):
    """One per ``Event.payload`` case; the value is the oneof field's name."""

    MESSAGE_RECEIVED = "message_received"
    MESSAGE_ECHOED = "message_echoed"
    MESSAGE_DELETED = "message_deleted"
    MESSAGE_EDITED = "message_edited"
    REACTION_CHANGED = "reaction_changed"
    MESSAGES_READ = "messages_read"
    POSTBACK = "postback"
    REFERRAL = "referral"
    DELIVERY_UPDATE = "delivery_update"
    CONNECTION_CHANGED = "connection_changed"
    RAW = "raw"


# Kinds the store makes once, from a change to its own record: a new message row, a status
# that moves. A source that repeats itself (Meta resends a delivery) makes none of them again.
# Events of every other kind (reactions, reads, edits, unsends, postbacks, raw items...) are
# built again for each repeat, and only their outbox entry, unique on event_id, stops a second
# publish: the relay keeps those entries, published, for the retention window.
RECORDED_ONCE_KINDS = frozenset(
    {
        EventKind.MESSAGE_RECEIVED,
        EventKind.MESSAGE_ECHOED,
        EventKind.DELIVERY_UPDATE,
        EventKind.CONNECTION_CHANGED,
    }
)


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    tenant_id: str
    connection_id: str
    channel: str
    kind: EventKind
    occurred_at: datetime
    received_at: datetime
    conversation_id: str = ""
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def ordering_key(self) -> str:
        """Events with the same key are delivered in order: one conversation, or the
        connection itself for events outside any conversation."""
        return self.conversation_id or self.connection_id


def new_event(
    *,
    tenant_id: str,
    connection_id: str,
    channel: str,
    kind: EventKind,
    occurred_at: datetime,
    received_at: datetime,
    conversation_id: str = "",
    payload: dict[str, Any] | None = None,
    event_id: str | None = None,
) -> Event:
    return Event(
        event_id=event_id or new_id("evt"),
        tenant_id=tenant_id,
        connection_id=connection_id,
        channel=channel,
        kind=kind,
        occurred_at=occurred_at,
        received_at=received_at,
        conversation_id=conversation_id,
        payload=payload or {},
    )
