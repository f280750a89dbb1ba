"""U+0000 in a request's text: refused up front, naming the field.

proto3 strings may hold U+0000, but PostgreSQL stores it in neither text nor jsonb: left to
the store, such a request would end INTERNAL (after taking a rate-limit token, say), or be
kept on SQLite and sent. Inbound text from a channel is another matter: there the character
becomes U+FFFD, as nothing may be lost of what a customer wrote.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from gateway.domain.errors import InvalidArgument

_NUL = "\x00"


def refuse_nul(message: Message) -> None:
    """Raises InvalidArgument naming the first field of ``message`` (nested messages and
    repeated fields included: ``template.elements[0].buttons[1].title``) whose text holds
    U+0000. The API has no map fields; a map would be skipped."""
    field = _first_nul(message, "")
    if field is not None:
        raise InvalidArgument(field, "must not contain U+0000 (NUL)")


def _first_nul(message: Message, prefix: str) -> str | None:
    for descriptor, value in message.ListFields():
        name = prefix + descriptor.name
        if descriptor.is_repeated:
            found = _in_list(descriptor, value, name)
        else:
            found = _in_value(descriptor, value, name)
        if found is not None:
            return found
    return None


def _in_value(descriptor: FieldDescriptor, value: object, name: str) -> str | None:
    if descriptor.type == FieldDescriptor.TYPE_STRING:
        return name if _NUL in str(value) else None
    if descriptor.type == FieldDescriptor.TYPE_MESSAGE and isinstance(value, Message):
        return _first_nul(value, name + ".")
    return None


def _in_list(descriptor: FieldDescriptor, values: Iterable[object], name: str) -> str | None:
    for i, value in enumerate(values):
        found = _in_value(descriptor, value, f"{name}[{i}]")
        if found is not None:
            return found
    return None
