"""Checks an event payload against the switchboard.v1 message it must parse into."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from switchboard.v1 import events_pb2

from gateway.domain.events import EventKind

MESSAGE_OF: dict[EventKind, type[Message]] = {
    EventKind.MESSAGE_RECEIVED: events_pb2.MessageReceived,
    EventKind.MESSAGE_ECHOED: events_pb2.MessageEchoed,
    EventKind.MESSAGE_DELETED: events_pb2.MessageDeleted,
    EventKind.MESSAGE_EDITED: events_pb2.MessageEdited,
    EventKind.REACTION_CHANGED: events_pb2.ReactionChanged,
    EventKind.MESSAGES_READ: events_pb2.MessagesRead,
    EventKind.POSTBACK: events_pb2.Postback,
    EventKind.REFERRAL: events_pb2.Referral,
    EventKind.RAW: events_pb2.RawEvent,
}


def as_proto(kind: EventKind, payload: dict[str, Any]) -> Any:
    """The payload parsed strictly (unknown fields fail) as the kind's message."""
    return json_format.ParseDict(payload, MESSAGE_OF[kind](), ignore_unknown_fields=False)
