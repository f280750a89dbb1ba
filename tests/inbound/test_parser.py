"""The Instagram parser: every kind of INSTAGRAM.md §3, lenient on odd shapes, and never
raising anything but DeliveryRejected (property-based with hypothesis)."""

from __future__ import annotations

import copy
import random
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channels.instagram.parser import parse_delivery
from gateway.domain.events import EventKind
from gateway.domain.inbound import DeliveryRejected, IngestResult, RoutedItem
from gateway.domain.models import Account, Connection, ConnectionStatus, Conversation, Participant
from gateway.services.inbound_events import build_events
from tests.inbound.payloads import as_proto
from tests.inbound.samples import IG_ID, IGSID, PAGE_ID, TS, envelope, inbound, samples


def parse_one(item: dict[str, Any]) -> Any:
    parsed = parse_delivery(orjson.dumps(envelope(item)))
    assert len(parsed.items) == 1
    return parsed.items[0]


def test_text_message_is_received_from_the_igsid_for_the_ig_id() -> None:
    item = parse_one(samples()["text"])
    assert item.kind == EventKind.MESSAGE_RECEIVED
    assert item.customer_id == IGSID
    assert item.account_ids == (IG_ID,)
    assert item.external_id == "m-text"
    assert item.text == "Hi ✨"
    assert item.occurred_at == datetime.fromtimestamp(TS / 1000, UTC)


def test_every_attachment_type_keeps_url_title_and_media_id() -> None:
    item = parse_one(samples()["attachments"])
    by_raw = {a.raw_type: a for a in item.attachments}
    assert by_raw["image"].type == "image"
    assert by_raw["image"].url == "https://cdn.example/image"
    assert by_raw["ig_reel"].type == "reel"
    assert by_raw["ig_story"].type == "story"
    assert by_raw["ephemeral"].type == "ephemeral"
    assert by_raw["ephemeral"].url == ""
    assert by_raw["share"].title == "Look"
    assert by_raw["ig_post"].type == "post"
    assert by_raw["ig_post"].media_id == "18000000001"
    assert by_raw["media"].type == "media"
    assert by_raw["media"].url == "https://cdn.example/media"
    assert by_raw["hologram"].type == "other"
    assert len(item.attachments) == 15


def test_replies_quick_replies_and_referrals() -> None:
    s = samples()
    assert parse_one(s["reply_to_message"]).reply_to_external_id == "m-text"
    story = parse_one(s["reply_to_story"]).reply_to_story
    assert story is not None
    assert (story.id, story.url) == ("st-1", "https://cdn/s.mp4")
    assert story.link_sticker_url == "https://shop.example/sale"
    assert parse_one(s["quick_reply"]).quick_reply_payload == "COLOR_RED"
    ad = parse_one(s["ads_referral"]).referral
    assert ad is not None
    assert (ad.ref, ad.ad_id, ad.source, ad.type) == ("summer", "6000000001", "ADS", "OPEN_THREAD")
    assert ad.extra["ads_context_data"]["ad_title"] == "Summer"
    shop = parse_one(s["shop_referral"]).referral
    assert shop is not None
    assert shop.product_id == "prod-1"


def test_echo_and_self_swap_sender_and_recipient() -> None:
    echo = parse_one(samples()["echo"])
    assert echo.kind == EventKind.MESSAGE_ECHOED
    assert echo.customer_id == IGSID
    assert echo.account_ids == (IG_ID,)
    me = parse_one(samples()["self"])
    assert me.kind == EventKind.MESSAGE_ECHOED
    assert me.is_self


def test_a_self_postback_is_in_the_conversation_of_the_self_echoes() -> None:
    """Self messaging: the business writes to its own account under its own
    Instagram-scoped id, and its postbacks say is_self beside the item (Meta's sample)."""
    self_igsid = "9900000000000001"
    echo = parse_one(
        {
            "sender": {"id": IG_ID},
            "recipient": {"id": self_igsid},
            "timestamp": TS,
            "message": {"mid": "m-self-echo", "text": "Start", "is_echo": True, "is_self": True},
        }
    )
    postback = parse_one(
        {
            "sender": {"id": IG_ID},
            "recipient": {"id": self_igsid},
            "timestamp": TS,
            "is_self": True,
            "postback": {"title": "Start Chatting", "payload": "DEV_PAYLOAD", "mid": "m-self-pb"},
        }
    )
    assert postback.kind == EventKind.POSTBACK
    assert postback.payload == "DEV_PAYLOAD"
    assert postback.customer_id == echo.customer_id == self_igsid
    assert IG_ID in postback.account_ids
    # Beside an item the parser does not know, the flag does not name its kind.
    odd = parse_one({**inbound({"hologram": {"x": 1}}), "is_self": True})
    assert (odd.kind, odd.raw_kind) == (EventKind.RAW, "hologram")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("unsend", EventKind.MESSAGE_DELETED),
        ("edit", EventKind.MESSAGE_EDITED),
        ("react", EventKind.REACTION_CHANGED),
        ("unreact", EventKind.REACTION_CHANGED),
        ("read", EventKind.MESSAGES_READ),
        ("postback", EventKind.POSTBACK),
        ("igme_referral", EventKind.REFERRAL),
        ("unknown", EventKind.RAW),
    ],
)
def test_each_kind_is_typed(name: str, kind: EventKind) -> None:
    assert parse_one(samples()[name]).kind == kind


def test_edit_count_may_be_a_string_and_unreact_has_no_emoji() -> None:
    assert parse_one(samples()["edit"]).edit_count == 1
    unreact = parse_one(samples()["unreact"])
    assert not unreact.react
    assert unreact.emoji == ""


def test_an_edit_notice_for_a_message_never_edited_is_raw_not_an_edit() -> None:
    # Instagram sends these alongside new messages, often without text or sender.
    for notice in (
        inbound({"message_edit": {"mid": "m-text", "num_edit": 0}}),
        inbound({"message_edit": {"mid": "m-text", "text": "Hi ✨", "num_edit": "0"}}),
        {"timestamp": TS, "message_edit": {"mid": "m-text", "num_edit": 0}},
    ):
        item = parse_one(notice)
        assert item.kind == EventKind.RAW
        assert item.raw_kind == "message_edit"
        assert item.account_ids == (IG_ID,)
        assert orjson.loads(item.raw_json) == notice


def test_an_edit_that_does_not_carry_its_text_has_an_empty_text() -> None:
    item = parse_one(inbound({"message_edit": {"mid": "m-text", "num_edit": 2}}))
    assert item.kind == EventKind.MESSAGE_EDITED
    assert item.text == ""
    assert item.edit_count == 2
    assert item.external_id == "m-text"


def test_a_story_attachment_is_a_story() -> None:
    story = {"type": "story", "payload": {"url": "https://cdn.example/s"}}
    item = parse_one(inbound({"message": {"mid": "m-st", "attachments": [story]}}))
    (attachment,) = item.attachments
    assert attachment.type == "story"
    assert attachment.url == "https://cdn.example/s"


def test_a_change_spread_on_the_entry_itself_is_kept_as_raw() -> None:
    # Business Login's shape for some fields: field and value beside id and time.
    comment = {"field": "comments", "value": {"id": "c1", "text": "nice", "from": {"id": "9"}}}
    body = {"object": "instagram", "entry": [{"id": IG_ID, "time": TS // 1000, **comment}]}
    (item,) = parse_delivery(orjson.dumps(body)).items
    assert item.kind == EventKind.RAW
    assert item.raw_kind == "comments"
    assert item.account_ids == (IG_ID,)
    assert orjson.loads(item.raw_json) == comment
    # Whatever else an entry holds beside its lists is kept too, never dropped unseen.
    odd = {"object": "instagram", "entry": [{"id": IG_ID, "time": TS, "uid": "u1"}]}
    (kept,) = parse_delivery(orjson.dumps(odd)).items
    assert kept.kind == EventKind.RAW
    assert orjson.loads(kept.raw_json) == {"uid": "u1"}


def test_a_lone_surrogate_escape_costs_one_character_not_the_delivery() -> None:
    # orjson refuses "\ud83d" alone (half an emoji); the delivery is read all the same.
    raw = orjson.dumps(envelope(inbound({"message": {"mid": "m-cut", "text": "HALF"}})))
    body = raw.replace(b"HALF", b"cut \\ud83d, whole \\ud83d\\ude00")
    (item,) = parse_delivery(body).items
    assert item.text == "cut \ufffd, whole \U0001f600"
    # Still strictly JSON in UTF-8: no NaN, no BOM, no UTF-16.
    for bad in (
        body.replace(b'"mid":"m-cut"', b'"mid":"m-cut","n":NaN'),
        b"\xef\xbb\xbf" + body,
        body.decode().encode("utf-16"),
    ):
        with pytest.raises(DeliveryRejected):
            parse_delivery(bad)


def test_unknown_kinds_are_raw_with_their_original_json() -> None:
    item = parse_one(samples()["unknown"])
    assert item.raw_kind == "optin"
    assert orjson.loads(item.raw_json) == samples()["unknown"]


def test_standby_and_changes_are_kept_and_page_ids_route() -> None:
    body = {
        "object": "page",
        "entry": [
            {"id": PAGE_ID, "time": TS, "standby": [samples()["text"]]},
            {"id": IG_ID, "time": TS, "changes": [{"field": "comments", "value": {"id": "c1"}}]},
        ],
    }
    parsed = parse_delivery(orjson.dumps(body))
    standby, comment = parsed.items
    assert standby.account_ids == (IG_ID, PAGE_ID)
    assert standby.standby
    assert not parse_one(samples()["text"]).standby
    assert comment.kind == EventKind.RAW
    assert comment.raw_kind == "comments"


def test_changes_entries_give_their_time_in_seconds() -> None:
    seconds = TS // 1000
    body = {
        "object": "instagram",
        "entry": [{"id": IG_ID, "time": seconds, "changes": [{"field": "comments", "value": {}}]}],
    }
    (comment,) = parse_delivery(orjson.dumps(body)).items
    assert comment.occurred_at == datetime.fromtimestamp(seconds, UTC)


def test_an_unsend_of_the_businesss_own_message_is_a_deletion_not_an_echo() -> None:
    raw = {
        "sender": {"id": IG_ID},
        "recipient": {"id": IGSID},
        "timestamp": TS,
        "message": {"mid": "m-own", "is_echo": True, "is_deleted": True},
    }
    item = parse_one(raw)
    assert item.kind == EventKind.MESSAGE_DELETED
    assert item.external_id == "m-own"
    assert item.account_ids == (IG_ID,)
    assert item.customer_id == IGSID


def test_dashboard_test_payloads_are_counted_not_delivered() -> None:
    body = {"object": "instagram", "entry": [{"id": "0", "time": TS, "changes": [{}]}]}
    parsed = parse_delivery(orjson.dumps(body))
    assert parsed.items == ()
    assert parsed.test_items == 1


def test_meta_escaping_parses_like_plain_json() -> None:
    raw = b'{"object":"instagram","entry":[{"id":"1","messaging":[{"sender":{"id":"2"},'
    raw += b'"recipient":{"id":"1"},"timestamp":"1700000000000","message":{"mid":"m",'
    raw += b'"text":"https:\\/\\/x \\ud83d\\ude00 \\u00e9"}}]}]}'
    (item,) = parse_delivery(raw).items
    assert item.text == "https://x 😀 é"
    assert item.occurred_at == datetime.fromtimestamp(TS / 1000, UTC)


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[]", b"{}", b'{"entry": {}}', b"\xff\xfe", b'"entry"'],
)
def test_not_the_envelope_is_rejected(body: bytes) -> None:
    with pytest.raises(DeliveryRejected):
        parse_delivery(body)


def test_odd_entries_and_items_are_leftovers_not_failures() -> None:
    body = {"entry": [7, {"id": IG_ID, "messaging": [None, "x", samples()["text"]]}]}
    parsed = parse_delivery(orjson.dumps(body))
    assert len(parsed.items) == 1
    assert [lo.reason for lo in parsed.leftovers] == [
        "MALFORMED_ENTRY",
        "MALFORMED_ITEM",
        "MALFORMED_ITEM",
    ]


# ---- the events built from parsed items parse as the .proto messages ----


def fake_store_result(item: Any) -> tuple[RoutedItem, IngestResult]:
    conn = Connection(
        id="conn_1",
        tenant_id="t1",
        channel="instagram",
        status=ConnectionStatus.CONNECTED,
        account=Account(external_id=IG_ID, username="shop"),
    )
    participant = Participant(id="par_1", connection_id=conn.id, channel_user_id=item.customer_id)
    now = datetime.now(UTC)
    conv = Conversation(
        id="cnv_1",
        tenant_id="t1",
        connection_id=conn.id,
        channel="instagram",
        participant=participant,
        window_expires_at=now,
    )
    result = IngestResult(conversation=conv, message_id="msg_1", reply_to_message_id="msg_0")
    return RoutedItem(conn, item, now), result


def check_events(parsed: Any) -> None:
    pairs = [fake_store_result(item) for item in parsed.items]
    events = build_events([p[0] for p in pairs], [p[1] for p in pairs])
    for event in events:
        as_proto(event.kind, event.payload)


def test_every_sample_becomes_a_payload_of_its_proto_message() -> None:
    parsed = parse_delivery(orjson.dumps(envelope(*samples().values())))
    assert len(parsed.items) == len(samples())
    check_events(parsed)


def test_dedupe_keys_are_stable_across_deliveries_and_differ_between_happenings() -> None:
    first = parse_delivery(orjson.dumps(envelope(*samples().values())))
    again = parse_delivery(orjson.dumps(envelope(*samples().values())))
    assert [i.dedupe_key for i in first.items] == [i.dedupe_key for i in again.items]
    keys = [i.dedupe_key for i in first.items]
    assert len(set(keys)) == len(keys)


# ---- property-based: arbitrary JSON and mutated Meta payloads ----


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # A named function: hypothesis reads a multi-line lambda's source wrongly and warns
    # that it does not recurse.
    return st.lists(children, max_size=4) | st.dictionaries(
        st.text(max_size=12), children, max_size=5
    )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    _containers,
    max_leaves=25,
)

META_KEYS = [
    "sender",
    "recipient",
    "timestamp",
    "message",
    "mid",
    "text",
    "attachments",
    "payload",
    "url",
    "type",
    "reply_to",
    "story",
    "quick_reply",
    "referral",
    "product",
    "is_echo",
    "is_self",
    "is_deleted",
    "reaction",
    "action",
    "read",
    "postback",
    "message_edit",
    "num_edit",
    "entry",
    "messaging",
    "standby",
    "changes",
    "id",
    "time",
]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_arbitrary_json_only_ever_raises_delivery_rejected(value: Any) -> None:
    try:
        parsed = parse_delivery(orjson.dumps(value))
    except DeliveryRejected:
        return
    check_events(parsed)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.data())
def test_arbitrary_json_in_an_envelope_never_fails_the_delivery(value: Any, data: Any) -> None:
    key = data.draw(st.sampled_from(["messaging", "standby", "changes", "id", "time"]))
    body = {
        "object": "instagram",
        "entry": [{"id": IG_ID, key: value}, {"id": IG_ID, key: [value]}],
    }
    check_events(parse_delivery(orjson.dumps(body)))


def mutate(node: Any, rng: random.Random, replacement: Any) -> Any:
    """Replaces, deletes or retypes one random node of a JSON tree."""
    if isinstance(node, dict) and node and rng.random() < 0.8:
        key = rng.choice(list(node))
        choice = rng.random()
        if choice < 0.2:
            del node[key]
        elif choice < 0.4:
            node[key] = replacement
        elif choice < 0.5:
            node[rng.choice(META_KEYS)] = replacement
        else:
            node[key] = mutate(node[key], rng, replacement)
        return node
    if isinstance(node, list) and node and rng.random() < 0.8:
        i = rng.randrange(len(node))
        node[i] = mutate(node[i], rng, replacement)
        return node
    return replacement


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(samples())), st.integers(0, 2**32), json_values, st.integers(1, 4))
def test_mutated_meta_payloads_never_fail(name: str, seed: int, value: Any, rounds: int) -> None:
    rng = random.Random(seed)
    body: Any = envelope(copy.deepcopy(samples()[name]), inbound({"read": {"mid": "x"}}))
    for _ in range(rounds):
        body = mutate(body, rng, copy.deepcopy(value))
    try:
        parsed = parse_delivery(orjson.dumps(body))
    except DeliveryRejected:
        return
    check_events(parsed)
