"""Event (de)serialization for the outbox and the bus: compact JSON, stable field names.

The wire form is a JSON object with the Event's header fields (times as RFC 3339 strings)
and its ``payload`` as is; any process in any language can read it from a Redis stream.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.domain.events import Event, EventKind


def rfc3339(value: datetime) -> str:
    """A time as the events carry it: UTC, microseconds, ``Z``."""
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def event_to_dict(event: Event) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "tenant_id": event.tenant_id,
        "connection_id": event.connection_id,
        "channel": event.channel,
        "conversation_id": event.conversation_id,
        "kind": event.kind.value,
        "occurred_at": rfc3339(event.occurred_at),
        "received_at": rfc3339(event.received_at),
        "payload": event.payload,
    }


def event_from_dict(data: dict[str, Any]) -> Event:
    return Event(
        event_id=data["event_id"],
        tenant_id=data["tenant_id"],
        connection_id=data["connection_id"],
        channel=data["channel"],
        conversation_id=data.get("conversation_id", ""),
        kind=EventKind(data["kind"]),
        occurred_at=_parse_ts(data["occurred_at"]),
        received_at=_parse_ts(data["received_at"]),
        payload=data.get("payload") or {},
    )


def encode_event(event: Event) -> bytes:
    return orjson.dumps(event_to_dict(event))


def decode_event(raw: bytes | str) -> Event:
    return event_from_dict(orjson.loads(raw))
