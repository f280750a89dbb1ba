"""proto_dict.parse_dict, and a message built from proto_dict.message_fields' arguments
(parse_dict where it gives up), give json_format.ParseDict's results
(ignore_unknown_fields=True) and its errors: for random dicts in the JSON mapping of every
Event payload and of a test message with every field kind, for the events our code builds,
and for malformed input."""

from __future__ import annotations

import base64
import functools
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    field_mask_pb2,
    json_format,
    message_factory,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from switchboard.v1 import common_pb2, events_pb2

from channels.instagram.parser import parse_delivery
from gateway.api.convert_events import event_fields, event_to_proto
from gateway.api.proto_dict import message_fields, parse_dict
from gateway.domain.codec import decode_event, encode_event
from gateway.domain.events import Event, EventKind
from gateway.domain.inbound import IngestResult, RoutedItem
from gateway.domain.models import (
    Account,
    Attachment,
    Connection,
    ConnectionStatus,
    Conversation,
    DeliveryError,
    Direction,
    MessageStatus,
    Participant,
)
from gateway.domain.models import Message as StoredMessage
from gateway.services.connection_status import connection_changed
from gateway.services.delivery_events import delivery_update
from gateway.services.inbound_events import build_events
from tests.inbound.samples import IG_ID, envelope, samples

# Loaded for their descriptors: the test proto imports them.
_WELL_KNOWN = (any_pb2, duration_pb2, field_mask_pb2, struct_pb2, timestamp_pb2, wrappers_pb2)


def descriptor_of(message_type: type[Message]) -> Descriptor:
    return cast(Descriptor, message_type.DESCRIPTOR)


PAYLOAD_TYPES = {
    f.name: cast(Descriptor, f.message_type)
    for f in descriptor_of(events_pb2.Event).oneofs_by_name["payload"].fields
}

# Every field kind of the JSON mapping, for what our own protos do not use.
TEST_PROTO = """
syntax = "proto3";
package proto_dict_test;

import "google/protobuf/any.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/field_mask.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

enum Color {
  COLOR_UNSPECIFIED = 0;
  COLOR_RED = 1;
  COLOR_BLUE = 2;
}

message Everything {
  int32 small = 1;
  int64 big = 2;
  uint32 small_unsigned = 3;
  uint64 big_unsigned = 4;
  sint32 zigzag = 5;
  fixed64 fixed_big = 6;
  double ratio = 7;
  float weight = 8;
  bool flag = 9;
  string text_value = 10;
  bytes raw_bytes = 11;
  Color color = 12;
  repeated Color colors = 13;
  repeated int64 big_numbers = 14;
  repeated string labels = 15;
  repeated double ratios = 16;
  Everything child = 17;
  repeated Everything children = 18;
  map<string, int32> counts = 19;
  map<int64, string> names_by_id = 20;
  map<bool, Everything> by_flag = 21;
  map<string, Color> color_by_name = 22;
  map<string, google.protobuf.Value> values = 23;
  oneof choice {
    string choice_text = 24;
    Everything choice_child = 25;
    google.protobuf.Timestamp choice_at = 26;
  }
  optional string maybe_text = 27;
  optional int32 maybe_number = 28;
  google.protobuf.Timestamp at = 29;
  repeated google.protobuf.Timestamp ats = 30;
  google.protobuf.Duration took = 31;
  google.protobuf.FieldMask mask = 32;
  google.protobuf.Struct extra = 33;
  google.protobuf.Value anything = 34;
  google.protobuf.ListValue list_value = 35;
  google.protobuf.Any packed = 36;
  google.protobuf.Int64Value wrapped_big = 37;
  google.protobuf.StringValue wrapped_text = 38;
  google.protobuf.NullValue null_value = 39;
}
"""


@functools.cache
def everything_type() -> type[Message]:
    """The test proto's Everything, compiled with grpc_tools' protoc."""
    include = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "proto_dict_test.proto"
        source.write_text(TEST_PROTO)
        descriptor_set = Path(tmp) / "set.pb"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{tmp}",
                f"-I{include}",
                f"--descriptor_set_out={descriptor_set}",
                str(source),
            ],
            check=True,
        )
        files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    pool = descriptor_pool.Default()
    (file,) = files.file
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("proto_dict_test.Everything"))


Parse = Callable[[type[Message], Any], Message]


def by_parse_dict(message_type: type[Message], js: Any) -> Message:
    return parse_dict(js, message_type())


def by_message_fields(message_type: type[Message], js: Any) -> Message:
    """As event_to_proto builds a payload: the constructor on message_fields' arguments,
    parse_dict where message_fields gives up or the constructor refuses them."""
    fields = message_fields(js, descriptor_of(message_type))
    if fields is not None:
        try:
            return message_type(**fields)
        except (ValueError, TypeError):
            pass
    return parse_dict(js, message_type())


PARSERS = pytest.mark.parametrize(
    "parse", [by_parse_dict, by_message_fields], ids=["parse_dict", "message_fields"]
)


def parse_both(
    message_type: type[Message], js: Any, parse: Parse = by_parse_dict
) -> tuple[Message, Message]:
    """(``parse``'s message, ParseDict's message); ParseDict must accept ``js``."""
    expected = json_format.ParseDict(js, message_type(), ignore_unknown_fields=True)
    return parse(message_type, js), expected


def assert_same(got: Message, expected: Message) -> None:
    assert got == expected
    assert got.SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True
    )


def assert_same_outcome(message_type: type[Message], js: Any, parse: Parse) -> None:
    """Both parse to the same message, or both raise the same ParseError."""
    expected: Message | json_format.ParseError
    try:
        expected = json_format.ParseDict(js, message_type(), ignore_unknown_fields=True)
    except json_format.ParseError as error:
        expected = error
    if isinstance(expected, Message):
        assert_same(parse(message_type, js), expected)
        return
    with pytest.raises(json_format.ParseError) as raised:
        parse(message_type, js)
    assert str(raised.value) == str(expected)


# ---- strategies derived from the descriptors ----

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)

INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


@st.composite
def timestamp_strings(draw: st.DrawFn) -> str:
    moment = draw(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
    digits = draw(st.integers(0, 9))
    nanos = f"{moment.microsecond:06d}{draw(st.integers(0, 999)):03d}"[:digits]
    offset = draw(st.sampled_from(["Z", "Z", "Z", "+00:00", "+05:30", "-08:00"]))
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
        + (f".{nanos}" if digits else "")
        + offset
    )


durations = st.builds(
    lambda seconds, nanos: f"{seconds}.{nanos:09d}s" if nanos else f"{seconds}s",
    st.integers(-(10**6), 10**6),
    st.integers(0, 999_999_999),
)
field_masks = st.lists(st.from_regex(r"[a-z]{1,5}(?:[A-Z][a-z]{1,5})?", fullmatch=True)).map(
    ",".join
)
anys: st.SearchStrategy[dict[str, str]] = st.one_of(
    st.just({}),
    durations.map(lambda d: {"@type": "type.googleapis.com/google.protobuf.Duration", "value": d}),
    st.text(max_size=6).map(
        lambda name: {"@type": "type.googleapis.com/switchboard.v1.Participant", "name": name}
    ),
)


def scalar_values(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    cpp = fd.cpp_type
    if fd.type == FieldDescriptor.TYPE_BYTES:
        raw = st.binary(max_size=12)
        return raw.map(lambda b: base64.b64encode(b).decode()) | raw.map(
            lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")
        )
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        return st.text(max_size=12)
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if cpp in INT_RANGES:
        ints = st.integers(*INT_RANGES[cpp])
        # int64 as a JSON string is the mapping's canonical form; numbers and integral
        # floats are accepted too.
        return ints | ints.map(str) | ints.filter(lambda i: abs(i) < 2**53).map(float)
    if cpp == FieldDescriptor.CPPTYPE_DOUBLE:
        return (
            st.floats(allow_nan=False, allow_infinity=False)
            | st.integers(-(10**9), 10**9)
            | st.sampled_from(["Infinity", "-Infinity", "1.5", "-2e3"])
        )
    if cpp == FieldDescriptor.CPPTYPE_FLOAT:
        return st.floats(allow_nan=False, allow_infinity=False, width=32) | st.just("Infinity")
    assert cpp == FieldDescriptor.CPPTYPE_ENUM
    enum_type = fd.enum_type
    assert enum_type is not None
    values = enum_type.values
    if enum_type.full_name == "google.protobuf.NullValue":
        return st.sampled_from([None, "NULL_VALUE", 0])
    return st.one_of(
        st.sampled_from([v.name for v in values]),
        st.sampled_from([v.number for v in values]),
        # Unknown names are ignored; unknown numbers are kept (open enums).
        st.just("NO_SUCH_VALUE"),
        st.integers(0, 50),
    )


def message_values(message_type: Descriptor, depth: int) -> st.SearchStrategy[Any]:
    name = message_type.full_name
    if name == "google.protobuf.Timestamp":
        return timestamp_strings()
    if name == "google.protobuf.Duration":
        return durations
    if name == "google.protobuf.FieldMask":
        return field_masks
    if name == "google.protobuf.Struct":
        return st.dictionaries(st.text(max_size=6), json_values, max_size=3)
    if name == "google.protobuf.Value":
        return json_values
    if name == "google.protobuf.ListValue":
        return st.lists(json_values, max_size=3)
    if name == "google.protobuf.Any":
        return anys
    if message_type.file.name == "google/protobuf/wrappers.proto":
        return scalar_values(message_type.fields_by_name["value"])
    if depth >= 3:
        return st.just({})
    return message_json(message_type, depth + 1)


def element_values(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if fd.message_type is not None:
        return message_values(fd.message_type, depth)
    return scalar_values(fd)


def map_keys(fd: FieldDescriptor) -> st.SearchStrategy[str]:
    if fd.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return st.sampled_from(["true", "false"])
    if fd.cpp_type in INT_RANGES:
        return st.integers(*INT_RANGES[fd.cpp_type]).map(str)
    return st.text(max_size=6)


def field_values(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    entry = fd.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        return st.dictionaries(map_keys(key), element_values(value, depth), max_size=3)
    if fd.is_repeated:
        return st.lists(element_values(fd, depth), max_size=3)
    # null leaves a field unset (and is a value for Value and NullValue).
    return element_values(fd, depth) | st.none()


@st.composite
def message_json(draw: st.DrawFn, message_type: Descriptor, depth: int = 0) -> dict[str, Any]:
    """A dict in the JSON mapping of ``message_type``: a random subset of its fields under
    their proto or json name (sometimes both), at most one member per oneof, unknown keys,
    in random order."""
    fields = draw(st.lists(st.sampled_from(list(message_type.fields)), unique=True, max_size=12))
    items: list[tuple[str, Any]] = []
    oneofs: set[str] = set()
    for fd in fields:
        oneof = fd.containing_oneof
        if oneof is not None:
            if oneof.name in oneofs:
                continue
            oneofs.add(oneof.name)
        names = [fd.name, fd.json_name] if fd.json_name != fd.name else [fd.name]
        keys = (
            names
            if oneof is None and len(names) == 2 and draw(st.integers(0, 3)) == 0
            else [draw(st.sampled_from(names))]
        )
        items.extend((key, draw(field_values(fd, depth))) for key in keys)
    known = {f.name for f in message_type.fields} | {f.json_name for f in message_type.fields}
    unknown = st.text(max_size=8).filter(lambda k: k not in known and not k.startswith("["))
    items.extend(draw(st.dictionaries(unknown, json_values, max_size=2)).items())
    return dict(draw(st.permutations(items)))


# ---- equivalence on the JSON mapping ----


@PARSERS
@pytest.mark.parametrize("kind", sorted(PAYLOAD_TYPES))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_payload_type_parses_like_parse_dict(
    parse: Parse, kind: str, data: st.DataObject
) -> None:
    message_type = PAYLOAD_TYPES[kind]
    js = data.draw(message_json(message_type))
    got, expected = parse_both(message_factory.GetMessageClass(message_type), js, parse)
    assert_same(got, expected)


@PARSERS
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_field_kind_parses_like_parse_dict(parse: Parse, data: st.DataObject) -> None:
    everything = everything_type()
    js = data.draw(message_json(descriptor_of(everything)))
    got, expected = parse_both(everything, js, parse)
    assert_same(got, expected)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_merging_into_a_filled_message_is_like_parse_dict(data: st.DataObject) -> None:
    """Repeated fields and maps are replaced, messages merged, null fields cleared."""
    everything = everything_type()
    first = data.draw(message_json(descriptor_of(everything)))
    second = data.draw(message_json(descriptor_of(everything)))
    base = json_format.ParseDict(first, everything(), ignore_unknown_fields=True)
    expected = everything()
    expected.CopyFrom(base)
    json_format.ParseDict(second, expected, ignore_unknown_fields=True)
    got = everything()
    got.CopyFrom(base)
    assert parse_dict(second, got) is got
    assert_same(got, expected)


@PARSERS
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_value_in_any_field_gives_parse_dicts_result_or_error(
    parse: Parse, data: st.DataObject
) -> None:
    everything = everything_type()
    fields = descriptor_of(everything).fields
    js = data.draw(
        st.dictionaries(
            st.sampled_from([f.name for f in fields] + [f.json_name for f in fields]),
            json_values | st.sampled_from(["1", "-3", "NaN", "1e2", " 7", "COLOR_RED"]),
            max_size=4,
        )
    )
    assert_same_outcome(everything, js, parse)


@PARSERS
@pytest.mark.parametrize(
    ("message_type", "js"),
    [
        # ParseDict reads a message given as a string or a list by iterating it as keys.
        (events_pb2.MessageReceived, {"message": {"attachments": ["x"]}}),
        (events_pb2.MessageReceived, {"sender": "abc"}),
        (events_pb2.ConnectionChanged, {"connection": {"scopes": ("a", "b")}}),
        (events_pb2.ReactionChanged, {"action": "2", "sender": {"name": "x"}}),
        (events_pb2.ReactionChanged, {"action": True}),
        (events_pb2.MessageEdited, {"edit_count": 3.0, "message_id": None}),
        (events_pb2.MessageEdited, {"edit_count": "1e2"}),
        (events_pb2.DeliveryUpdate, {"status": 99, "attempt": "-0"}),
        (events_pb2.MessagesRead, {"watermark": "2026-11-25T10:00:00.Z"}),
        (events_pb2.MessageDeleted, "not a dict"),
    ],
)
def test_odd_shapes_parse_dict_accepts_give_the_same_message(
    parse: Parse, message_type: type[Message], js: Any
) -> None:
    assert_same_outcome(message_type, js, parse)


@PARSERS
def test_timestamps_match_from_json_string_at_the_edges(parse: Parse) -> None:
    for value in [
        "1970-01-01T00:00:00Z",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999999Z",
        "2026-11-25T10:00:00.123456Z",
        "2026-11-25T10:00:00.1234567Z",
        "2026-11-25T10:00:00.000000001Z",
        "2024-02-29T12:00:00.5Z",
        "2026-11-25T10:00:00+01:00",
    ]:
        got, expected = parse_both(events_pb2.MessagesRead, {"watermark": value}, parse)
        assert_same(got, expected)
        assert got.HasField("watermark")


# ---- the events our code builds ----

CONNECTION = Connection(
    id="conn_1",
    tenant_id="t1",
    channel="instagram",
    status=ConnectionStatus.CONNECTED,
    account=Account(external_id=IG_ID, username="shop", display_name="Shop", page_id="p1"),
    login_flow="facebook",
    scopes=("instagram_basic", "instagram_manage_messages"),
    token_expires_at=datetime(2027, 1, 1, tzinfo=UTC),
    connected_at=datetime(2026, 11, 1, 8, 30, 0, 120000, tzinfo=UTC),
    created_at=datetime(2026, 11, 1, tzinfo=UTC),
    updated_at=datetime(2026, 11, 25, tzinfo=UTC),
)
NOW = datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=UTC)


def inbound_events(*, with_conversation: bool) -> list[Event]:
    parsed = parse_delivery(orjson.dumps(envelope(*samples().values())))
    routed, results = [], []
    for item in parsed.items:
        participant = Participant(
            id="par_1",
            connection_id=CONNECTION.id,
            channel_user_id=item.customer_id,
            username="ann",
            name="Ann",
            picture_url="https://cdn/ann.jpg",
        )
        conversation = Conversation(
            id="cnv_1",
            tenant_id="t1",
            connection_id=CONNECTION.id,
            channel="instagram",
            participant=participant,
            window_expires_at=NOW + timedelta(hours=24),
        )
        routed.append(RoutedItem(CONNECTION, item, NOW))
        results.append(
            IngestResult(
                conversation=conversation if with_conversation else None,
                message_id="msg_1",
                reply_to_message_id="msg_0",
            )
        )
    return build_events(routed, results)


def stored_message(**changes: Any) -> StoredMessage:
    message = StoredMessage(
        id="msg_9",
        tenant_id="t1",
        connection_id=CONNECTION.id,
        conversation_id="cnv_1",
        channel="instagram",
        direction=Direction.OUTBOUND,
        status=MessageStatus.QUEUED,
        idempotency_key="key-1",
        attachments=(Attachment(type="image", url="https://cdn/x.jpg"),),
    )
    return replace(message, **changes)


def all_events() -> Iterator[Event]:
    yield from inbound_events(with_conversation=True)
    yield from inbound_events(with_conversation=False)
    yield delivery_update(stored_message(status=MessageStatus.SENT, external_id="m-9"), NOW)
    failed = DeliveryError(
        reason="OUTSIDE_MESSAGING_WINDOW",
        message="window closed",
        channel_code=10,
        channel_subcode=2018278,
        retryable=False,
    )
    yield delivery_update(stored_message(status=MessageStatus.FAILED, error=failed), NOW)
    retrying = DeliveryError(reason="RATE_LIMITED", retryable=True)
    yield delivery_update(
        stored_message(status=MessageStatus.RETRYING, error=retrying, attempts=2), NOW
    )
    yield delivery_update(
        stored_message(status=MessageStatus.SENT, confirmed_at=NOW), NOW, confirmed=True
    )
    yield connection_changed(CONNECTION, None, "", NOW)
    yield connection_changed(
        replace(CONNECTION, status=ConnectionStatus.NEEDS_REAUTH, last_error="token expired"),
        ConnectionStatus.CONNECTED,
        "token expired",
        NOW,
    )
    yield connection_changed(
        Connection(
            id="conn_2",
            tenant_id="t1",
            channel="instagram",
            status=ConnectionStatus.PENDING,
            account=Account(external_id=""),
        ),
        None,
        "",
        NOW,
    )


def reference_event_to_proto(event: Event) -> events_pb2.Event:
    """event_to_proto as it was, on json_format.ParseDict and Timestamp.FromDatetime."""

    def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(value)
        return ts

    msg = events_pb2.Event(
        event_id=event.event_id,
        tenant_id=event.tenant_id,
        connection_id=event.connection_id,
        channel=event.channel,
        conversation_id=event.conversation_id,
        occurred_at=timestamp(event.occurred_at),
        received_at=timestamp(event.received_at),
    )
    payload = getattr(msg, event.kind.value)
    payload.SetInParent()
    json_format.ParseDict(event.payload, payload, ignore_unknown_fields=True)
    return msg


def test_the_events_cover_every_kind() -> None:
    assert {e.kind for e in all_events()} == set(EventKind)


@pytest.mark.parametrize("via_bus", [False, True], ids=["built", "via-bus-json"])
def test_our_events_convert_as_with_parse_dict(via_bus: bool) -> None:
    for event in all_events():
        if via_bus:
            # What Subscribe converts: the event read back from the bus's JSON.
            event = decode_event(encode_event(event))
        got = event_to_proto(event)
        assert_same(got, reference_event_to_proto(event))
        assert got.WhichOneof("payload") == event.kind.value


def test_our_payloads_stay_on_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every event we build is built from message_fields' arguments, and only the
    referral's Struct is left to ParseDict: anything else means our payloads and the fast
    path drifted apart."""
    handed_over: list[Message] = []
    parse = json_format.ParseDict

    def spy(js: Any, message: Message, *args: Any, **kwargs: Any) -> Message:
        handed_over.append(message)
        return parse(js, message, *args, **kwargs)

    monkeypatch.setattr(json_format, "ParseDict", spy)
    for event in all_events():
        fields = event_fields(decode_event(encode_event(event)))
        assert fields is not None
        events_pb2.Event(**fields)
    assert handed_over
    assert all(isinstance(message, struct_pb2.Struct) for message in handed_over)


def test_an_empty_payload_still_selects_its_case() -> None:
    for kind in EventKind:
        event = Event(
            event_id="evt_1",
            tenant_id="t1",
            connection_id="conn_1",
            channel="instagram",
            kind=kind,
            occurred_at=NOW,
            received_at=NOW,
        )
        got = event_to_proto(event)
        assert got.WhichOneof("payload") == kind.value
        assert_same(got, reference_event_to_proto(event))


offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))


@settings(max_examples=200, deadline=None)
@given(
    naive=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    zone=st.none() | st.just(UTC) | offsets,
)
def test_header_times_are_from_datetimes(naive: datetime, zone: timezone | None) -> None:
    moment = naive.replace(tzinfo=zone)
    event = Event(
        event_id="evt_1",
        tenant_id="t1",
        connection_id="conn_1",
        channel="instagram",
        kind=EventKind.RAW,
        occurred_at=moment,
        received_at=moment + timedelta(microseconds=1),
    )
    assert_same(event_to_proto(event), reference_event_to_proto(event))


# ---- malformed input ----


def deeply(levels: int) -> dict[str, Any]:
    js: dict[str, Any] = {}
    for _ in range(levels):
        js = {"child": js}
    return js


MALFORMED: list[tuple[Callable[[], type[Message]], Any]] = [
    (lambda: common_pb2.Participant, {"name": 5}),
    (lambda: common_pb2.Participant, {"name": ["x"]}),
    (lambda: common_pb2.Participant, {"name": "\ud800"}),
    (lambda: common_pb2.Participant, {"[ext.name]": "x"}),
    (lambda: common_pb2.Participant, {1: "x"}),
    (lambda: common_pb2.Participant, [1]),
    (lambda: events_pb2.MessageEchoed, {"is_self": "true"}),
    (lambda: events_pb2.MessageEdited, {"edit_count": 1.5}),
    (lambda: events_pb2.MessageEdited, {"edit_count": "many"}),
    (lambda: events_pb2.MessageEdited, {"edit_count": 2**31}),
    (lambda: events_pb2.MessageEdited, {"editCount": True}),
    (lambda: events_pb2.MessageReceived, {"window_expires_at": "tomorrow"}),
    (lambda: events_pb2.MessageReceived, {"window_expires_at": "2026-02-30T00:00:00Z"}),
    (lambda: events_pb2.MessageReceived, {"window_expires_at": "2026-11-25T10:00:60Z"}),
    (lambda: events_pb2.MessageReceived, {"windowExpiresAt": 1_700_000_000}),
    (lambda: events_pb2.MessageReceived, {"message": {"attachments": {"type": "x"}}}),
    (lambda: events_pb2.MessageReceived, {"message": {"attachments": [None]}}),
    (lambda: events_pb2.MessageReceived, {"message": {"sender": [1]}}),
    (lambda: events_pb2.MessageReceived, {"sender": {"name": 1}, "message": {}}),
    (
        lambda: events_pb2.MessageReceived,
        {"message": {"reply_to": {"message_external_id": "m", "story": {"id": "s"}}}},
    ),
    (
        lambda: events_pb2.MessageReceived,
        {"message": {"reply_to": {"messageExternalId": "m", "message_external_id": "m"}}},
    ),
    (lambda: events_pb2.ReactionChanged, {"action": ["ACTION_REACT"]}),
    (lambda: events_pb2.ConnectionChanged, {"connection": {"scopes": "a"}}),
    (lambda: events_pb2.ConnectionChanged, {"connection": {"scopes": [None]}}),
    (lambda: events_pb2.ConnectionChanged, {"connection": {"scopes": [1]}}),
    (lambda: events_pb2.Referral, {"referral": {"extra": [1]}}),
    (lambda: everything_type(), {"big": "12 3"}),
    (lambda: everything_type(), {"small_unsigned": -1}),
    (lambda: everything_type(), {"ratio": float("nan")}),
    (lambda: everything_type(), {"raw_bytes": "not base64!"}),
    (lambda: everything_type(), {"counts": {"a": "b"}}),
    (lambda: everything_type(), {"names_by_id": {"x": "y"}}),
    (lambda: everything_type(), {"by_flag": {"yes": {}}}),
    (lambda: everything_type(), {"took": "1 minute"}),
    (lambda: everything_type(), {"maybe_text": "a", "maybeText": "b"}),
    (lambda: everything_type(), {"choice_text": "a", "choice_at": "2026-11-25T10:00:00Z"}),
    (lambda: everything_type(), deeply(100)),
]


@PARSERS
@pytest.mark.parametrize(("message_type", "js"), MALFORMED)
def test_malformed_input_raises_parse_dicts_error(
    parse: Parse, message_type: Callable[[], type[Message]], js: Any
) -> None:
    with pytest.raises(json_format.ParseError) as expected:
        json_format.ParseDict(js, message_type()(), ignore_unknown_fields=True)
    with pytest.raises(json_format.ParseError) as raised:
        parse(message_type(), js)
    assert str(raised.value) == str(expected.value)


@PARSERS
def test_nesting_just_under_the_limit_parses(parse: Parse) -> None:
    got, expected = parse_both(everything_type(), deeply(99), parse)
    assert_same(got, expected)
    innermost: Any = got
    for _ in range(98):
        innermost = innermost.child
    assert innermost.HasField("child")
    assert not innermost.child.HasField("child")
