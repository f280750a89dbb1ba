"""Bus events to protobuf (``switchboard.v1.Event``) and Subscribe's kind filter back."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2
from switchboard.v1 import events_pb2

from gateway.api.proto_dict import parse_dict
from gateway.domain.errors import InvalidArgument
from gateway.domain.events import Event, EventKind

_KIND_PREFIX = "EVENT_KIND_"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)


def _set_timestamp(ts: timestamp_pb2.Timestamp, value: datetime) -> None:
    """``ts.FromDatetime(value)`` (naive means UTC) without its timetuple round trip,
    which costs more than the rest of the header."""
    delta = value - (_EPOCH_NAIVE if value.tzinfo is None else _EPOCH)
    ts.seconds = delta.days * 86400 + delta.seconds
    ts.nanos = delta.microseconds * 1000


def event_to_proto(event: Event) -> events_pb2.Event:
    msg = events_pb2.Event(
        event_id=event.event_id,
        tenant_id=event.tenant_id,
        connection_id=event.connection_id,
        channel=event.channel,
        conversation_id=event.conversation_id,
    )
    _set_timestamp(msg.occurred_at, event.occurred_at)
    _set_timestamp(msg.received_at, event.received_at)
    payload = getattr(msg, event.kind.value)
    # Selects the oneof case even when the payload is empty.
    payload.SetInParent()
    # Unknown fields are ignored so that an older server can relay a newer plugin's events.
    parse_dict(event.payload, payload)
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
