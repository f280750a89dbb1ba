"""Bus events to protobuf (``switchboard.v1.Event``) and Subscribe's kind filter back."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from google.protobuf.descriptor import Descriptor
from switchboard.v1 import events_pb2

from gateway.api.proto_dict import message_fields, parse_dict
from gateway.domain.errors import InvalidArgument
from gateway.domain.events import Event, EventKind

_KIND_PREFIX = "EVENT_KIND_"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_PAYLOAD_TYPES: dict[str, Descriptor] = {
    field.name: cast(Descriptor, field.message_type)
    for field in events_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"].fields
}
# What the Event constructor raises where ParseDict raises too (an int out of range, a
# string that is not valid UTF-8): the slow path then raises ParseDict's own error.
CONSTRUCTOR_ERRORS = (ValueError, TypeError)


def _timestamp(value: datetime) -> dict[str, int]:
    """``Timestamp.FromDatetime(value)``'s fields (naive means UTC), without its timetuple
    round trip, which costs more than the rest of the header."""
    delta = value - (_EPOCH_NAIVE if value.tzinfo is None else _EPOCH)
    return {"seconds": delta.days * 86400 + delta.seconds, "nanos": delta.microseconds * 1000}


def _header(event: Event) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "tenant_id": event.tenant_id,
        "connection_id": event.connection_id,
        "channel": event.channel,
        "conversation_id": event.conversation_id,
        "occurred_at": _timestamp(event.occurred_at),
        "received_at": _timestamp(event.received_at),
    }


def event_fields(event: Event) -> dict[str, Any] | None:
    """The ``events_pb2.Event`` constructor's arguments for ``event`` (the payload as nested
    dicts), or None for a payload that only :func:`event_to_proto`'s slow path takes.

    Building from nested dicts in one constructor call (also as an element of a repeated
    field) costs a fraction of setting the fields one by one.
    """
    kind = event.kind.value
    # Unknown fields are ignored so that an older server can relay a newer plugin's events.
    payload = message_fields(event.payload, _PAYLOAD_TYPES[kind])
    if payload is None:
        return None
    fields = _header(event)
    # An empty dict still selects the oneof case.
    fields[kind] = payload
    return fields


def event_to_proto(event: Event) -> events_pb2.Event:
    fields = event_fields(event)
    if fields is not None:
        try:
            return events_pb2.Event(**fields)
        except CONSTRUCTOR_ERRORS:
            pass
    return event_to_proto_by_parse_dict(event)


def event_to_proto_by_parse_dict(event: Event) -> events_pb2.Event:
    """The slow path: any payload ParseDict takes, and ParseDict's error for any other."""
    msg = events_pb2.Event(**_header(event))
    payload = getattr(msg, event.kind.value)
    # Selects the oneof case even when the payload is empty.
    payload.SetInParent()
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
