"""Bus events to protobuf (``switchboard.v1.Event``) and Subscribe's kind filter back."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import json_format, timestamp_pb2
from switchboard.v1 import events_pb2

from gateway.domain.errors import InvalidArgument
from gateway.domain.events import Event, EventKind

_KIND_PREFIX = "EVENT_KIND_"


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def event_to_proto(event: Event) -> events_pb2.Event:
    msg = events_pb2.Event(
        event_id=event.event_id,
        tenant_id=event.tenant_id,
        connection_id=event.connection_id,
        channel=event.channel,
        conversation_id=event.conversation_id,
        occurred_at=_timestamp(event.occurred_at),
        received_at=_timestamp(event.received_at),
    )
    payload = getattr(msg, event.kind.value)
    # Selects the oneof case even when the payload is empty.
    payload.SetInParent()
    # Unknown fields are ignored so that an older server can relay a newer plugin's events.
    json_format.ParseDict(event.payload, payload, ignore_unknown_fields=True)
    return msg


def kinds_from_proto(values: list[int]) -> frozenset[EventKind]:
    """``SubscribeStart.kinds`` (EventKind enum numbers) to domain kinds."""
    kinds = set()
    for value in values:
        try:
            name = events_pb2.EventKind.Name(value)
        except ValueError:
            raise InvalidArgument("start.kinds", f"unknown event kind {value}") from None
        if name == "EVENT_KIND_UNSPECIFIED":
            raise InvalidArgument("start.kinds", "EVENT_KIND_UNSPECIFIED is not a kind")
        kinds.add(EventKind(name.removeprefix(_KIND_PREFIX).lower()))
    return frozenset(kinds)
