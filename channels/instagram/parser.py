"""Instagram webhook deliveries -> channel-neutral inbound items (INSTAGRAM.md §2-3).

Lenient by design: real deliveries miss fields, send numbers as strings and mix shapes, so
every field is read defensively and an item this module does not understand becomes a raw
item carrying its JSON. Only a body that is not Meta's envelope at all is rejected.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.domain.events import EventKind
from gateway.domain.inbound import (
    DeliveryRejected,
    InboundItem,
    Leftover,
    ParsedDelivery,
    ReferralInfo,
    StoryRef,
)
from gateway.domain.models import Attachment

# Meta's dashboard "Test" buttons post samples for this account id.
TEST_ACCOUNT_ID = "0"

_ENTRY_LISTS = ("messaging", "standby")
# What an entry holds besides its items; anything else in it is kept as a raw item.
_ENTRY_KEYS = frozenset({"id", "time", "changes", *_ENTRY_LISTS})
_HEADER_KEYS = frozenset({"sender", "recipient", "timestamp", "is_self"})

# Instagram attachment types -> the neutral names of AttachmentType.
ATTACHMENT_TYPES: Mapping[str, str] = {
    "image": "image",
    "video": "video",
    "audio": "audio",
    "file": "file",
    "media": "media",
    "share": "share",
    "story_mention": "story_mention",
    "reel": "reel",
    "ig_reel": "reel",
    "ig_post": "post",
    "ig_story": "story",
    "story": "story",
    "ephemeral": "ephemeral",
    "template": "template",
    "fallback": "fallback",
    "sticker": "sticker",
    "like_heart": "sticker",
}
_MEDIA_ID_KEYS = ("ig_post_media_id", "reel_video_id", "media_id", "story_id", "id")
_REFERRAL_KEYS = frozenset({"ref", "source", "type", "ad_id", "product"})
# orjson reads JSON nested 1024 levels deep but writes at most 254: whatever an item keeps
# is written again (stored, published), so a delivery nested deeper is cut at this depth.
MAX_DEPTH = 200
# Meta's ids are tens of characters; one past this (up to 4 bytes a character) would not
# fit in an index entry of PostgreSQL's.
MAX_ID_CHARS = 512
# Bounds of datetime.fromtimestamp on every platform, in milliseconds, with a month's margin
# at the top: the windows reckoned from a message's time (24 hours, 7 days) must fit too.
_MIN_MS, _MAX_MS = 0, 253_399_622_400_000


def parse_delivery(body: bytes, *, now: datetime | None = None) -> ParsedDelivery:
    """Every entry and every messaging/standby/changes item of one delivery."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = _loads_leniently(body)
    if not isinstance(data, dict) or not isinstance(data.get("entry"), list):
        raise DeliveryRejected("the body is not a webhook envelope (no 'entry' list)")
    try:
        # A fraction of a microsecond for a usual delivery; one that fails would fail
        # every retry of its whole batch later, where the items are written.
        orjson.dumps(data)
    except orjson.JSONEncodeError:
        data = _pruned(data, MAX_DEPTH)
    if b"\\u0000" in body:
        # PostgreSQL stores U+0000 neither in text nor in jsonb: one such character would
        # fail its delivery on every retry. It becomes U+FFFD, as a lone surrogate does
        # (after the cut above, which bounds the walk's depth).
        data = _without_nul(data)
    received = now or datetime.now(UTC)
    items: list[InboundItem] = []
    leftovers: list[Leftover] = []
    test_items = 0
    for entry in data["entry"]:
        if not isinstance(entry, dict):
            leftovers.append(Leftover("MALFORMED_ENTRY", _dumps(entry)))
            continue
        entry_id = _str(entry.get("id"))
        if entry_id == TEST_ACCOUNT_ID:
            test_items += _count_items(entry)
            continue
        entry_time = _epoch_ms(entry.get("time"))
        for key in _ENTRY_LISTS:
            found = entry.get(key)
            if found is None:
                continue
            if not isinstance(found, list):
                leftovers.append(Leftover("MALFORMED_ENTRY", _dumps(found), entry_id))
                continue
            for raw in found:
                if not isinstance(raw, dict):
                    leftovers.append(Leftover("MALFORMED_ITEM", _dumps(raw), entry_id))
                    continue
                item = _safe_item(raw, entry_id, entry_time, received)
                items.append(replace(item, standby=True) if key == "standby" else item)
        changes = entry.get("changes")
        if isinstance(changes, list):
            items.extend(_change(c, entry_id, entry_time, received) for c in changes)
        elif changes is not None:
            leftovers.append(Leftover("MALFORMED_ENTRY", _dumps(changes), entry_id))
        rest = {k: v for k, v in entry.items() if k not in _ENTRY_KEYS}
        if rest:
            # Business Login posts some fields as one change spread on the entry itself
            # ({"field", "value"} beside id and time), without the "changes" list.
            items.append(_change(rest, entry_id, entry_time, received))
    return ParsedDelivery(items=tuple(items), leftovers=tuple(leftovers), test_items=test_items)


def _count_items(entry: dict[str, Any]) -> int:
    total = sum(len(v) for k in (*_ENTRY_LISTS, "changes") if isinstance(v := entry.get(k), list))
    return max(total, 1)


def _safe_item(
    raw: dict[str, Any], entry_id: str, entry_time: int | None, received: datetime
) -> InboundItem:
    try:
        item = _item(raw, entry_id, entry_time, received)
    except (TypeError, ValueError, AttributeError, OverflowError):
        # A shape no branch foresaw: keep it whole as a raw item rather than lose it.
        occurred = _time(None, entry_time, received)
        return _raw(raw, "unparsed", _ids(entry_id), "", occurred, entry_time or 0)
    if _oversized_ids(item):
        # Stored as a message, such an id would fail its whole batch on every retry (an
        # index entry has room for about 2.7 kB): the item is kept whole, as raw.
        return _raw(raw, "oversized_id", _ids(entry_id), "", item.occurred_at, entry_time or 0)
    return item


def _oversized_ids(item: InboundItem) -> bool:
    return any(
        len(value) > MAX_ID_CHARS
        for value in (item.external_id, item.customer_id, *item.account_ids)
    )


def _item(
    raw: dict[str, Any], entry_id: str, entry_time: int | None, received: datetime
) -> InboundItem:
    sender = _id(raw.get("sender"))
    recipient = _id(raw.get("recipient"))
    occurred = _time(raw.get("timestamp"), entry_time, received)
    ts = _epoch_ms(raw.get("timestamp")) or entry_time or 0
    message = raw.get("message")
    if isinstance(message, dict):
        echo = _true(message.get("is_echo")) or _true(message.get("is_self"))
        if _true(message.get("is_deleted")):
            # Checked first: an unsend of the business's own message (an echo that says
            # is_deleted) would otherwise read as its echo again and be dropped as a repeat.
            mid = _str(message.get("mid"))
            account, customer = (sender, recipient) if echo else (recipient, sender)
            return InboundItem(
                source=raw,
                kind=EventKind.MESSAGE_DELETED,
                account_ids=_ids(account, entry_id),
                customer_id=customer,
                occurred_at=occurred,
                dedupe_key=f"del:{mid or ts}:{sender}",
                external_id=mid,
            )
        if echo:
            # The business sent it: sender and recipient swap.
            return _message(
                raw, message, EventKind.MESSAGE_ECHOED, (sender, entry_id), recipient, ts, occurred
            )
        return _message(
            raw, message, EventKind.MESSAGE_RECEIVED, (recipient, entry_id), sender, ts, occurred
        )
    if _true(raw.get("is_self")):
        # Self messaging (a business testing on its own account) says so beside the item,
        # as on its postbacks: the business is the sender, and its own Instagram-scoped id
        # the customer, as in the echoes of its messages, so both share one conversation.
        accounts, customer = _ids(sender, entry_id), recipient
    else:
        accounts, customer = _ids(recipient, entry_id), sender
    edit = raw.get("message_edit")
    if isinstance(edit, dict):
        mid = _str(edit.get("mid"))
        count = _int(edit.get("num_edit"))
        if count == 0:
            # Instagram also sends this notice for messages never edited (num_edit 0, often
            # without text): it changes nothing, so it is not an edit; kept whole, as raw.
            return _raw(raw, "message_edit", accounts, customer, occurred, ts)
        # Without text the new wording is unknown: the stored text stays as it was.
        text = _str(edit.get("text"))
        return InboundItem(
            source=raw,
            kind=EventKind.MESSAGE_EDITED,
            account_ids=accounts,
            customer_id=customer,
            occurred_at=occurred,
            dedupe_key=f"edit:{mid}:{count}:{ts}:{_digest(text)}",
            external_id=mid,
            text=text,
            edit_count=count,
        )
    reaction = raw.get("reaction")
    if isinstance(reaction, dict):
        mid = _str(reaction.get("mid"))
        react = _str(reaction.get("action")).lower() != "unreact"
        name = _str(reaction.get("reaction")) if react else ""
        emoji = _str(reaction.get("emoji")) if react else ""
        return InboundItem(
            source=raw,
            kind=EventKind.REACTION_CHANGED,
            account_ids=accounts,
            customer_id=customer,
            occurred_at=occurred,
            dedupe_key=f"react:{mid}:{sender}:{react}:{name}:{emoji}:{ts}",
            external_id=mid,
            react=react,
            reaction=name,
            emoji=emoji,
        )
    read = raw.get("read")
    if isinstance(read, dict):
        mid = _str(read.get("mid"))
        return InboundItem(
            source=raw,
            kind=EventKind.MESSAGES_READ,
            account_ids=accounts,
            customer_id=customer,
            occurred_at=occurred,
            dedupe_key=f"read:{mid}:{sender}:{ts}",
            external_id=mid,
        )
    postback = raw.get("postback")
    if isinstance(postback, dict):
        mid = _str(postback.get("mid"))
        payload = _str(postback.get("payload"))
        return InboundItem(
            source=raw,
            kind=EventKind.POSTBACK,
            account_ids=accounts,
            customer_id=customer,
            occurred_at=occurred,
            dedupe_key=f"pb:{mid}:{sender}:{ts}:{_digest(payload)}",
            external_id=mid,
            title=_str(postback.get("title")),
            payload=payload,
        )
    referral = raw.get("referral")
    if isinstance(referral, dict):
        info = _referral(referral)
        return InboundItem(
            source=raw,
            kind=EventKind.REFERRAL,
            account_ids=accounts,
            customer_id=customer,
            occurred_at=occurred,
            dedupe_key=f"ref:{sender}:{ts}:{info.ref}:{info.source}",
            referral=info,
        )
    kind = next((k for k in raw if k not in _HEADER_KEYS), "unknown")
    return _raw(raw, kind, accounts, customer, occurred, ts)


def _message(
    raw: dict[str, Any],
    message: dict[str, Any],
    kind: EventKind,
    account_candidates: tuple[str, str],
    customer: str,
    ts: int,
    occurred: datetime,
) -> InboundItem:
    if not customer:
        # No conversation can hold a message without its customer: stored nowhere, it would
        # go out as a message without an id, and every repeat of it again. Kept whole, raw.
        return _raw(raw, "message", _ids(*account_candidates), "", occurred, ts)
    mid = _str(message.get("mid"))
    text = _str(message.get("text"))
    reply = message.get("reply_to")
    reply_mid = ""
    story = None
    if isinstance(reply, dict):
        reply_mid = _str(reply.get("mid"))
        if isinstance(reply.get("story"), dict):
            ref = reply["story"]
            story = StoryRef(
                id=_str(ref.get("id")),
                url=_str(ref.get("url")),
                link_sticker_url=_str(ref.get("link_sticker_url")),
            )
    quick = message.get("quick_reply")
    referral = message.get("referral")
    attachments = message.get("attachments")
    return InboundItem(
        source=raw,
        kind=kind,
        account_ids=_ids(*account_candidates),
        customer_id=customer,
        occurred_at=occurred,
        dedupe_key=f"msg:{mid}" if mid else f"msg:{customer}:{ts}:{_digest(text)}",
        external_id=mid,
        text=text,
        attachments=tuple(
            _attachment(a) for a in (attachments if isinstance(attachments, list) else ())
        ),
        reply_to_external_id=reply_mid,
        reply_to_story=story,
        quick_reply_payload=_str(quick.get("payload")) if isinstance(quick, dict) else "",
        unsupported=_true(message.get("is_unsupported")),
        is_self=_true(message.get("is_self")),
        referral=_referral(referral) if isinstance(referral, dict) else None,
    )


def _attachment(raw: Any) -> Attachment:
    if not isinstance(raw, dict):
        return Attachment(type="other", raw_type=_str(raw))
    raw_type = _str(raw.get("type"))
    payload = raw.get("payload")
    payload = payload if isinstance(payload, dict) else {}
    media_id = next((_str(payload[k]) for k in _MEDIA_ID_KEYS if payload.get(k)), "")
    return Attachment(
        type=ATTACHMENT_TYPES.get(raw_type.lower(), "other"),
        # Fallback attachments (links) carry url and title beside type, payload null.
        url="" if raw_type == "ephemeral" else _str(payload.get("url") or raw.get("url")),
        title=_str(payload.get("title") or raw.get("title")),
        media_id=media_id,
        raw_type=raw_type,
    )


def _referral(raw: dict[str, Any]) -> ReferralInfo:
    product = raw.get("product")
    return ReferralInfo(
        ref=_str(raw.get("ref")),
        source=_str(raw.get("source")),
        type=_str(raw.get("type")),
        ad_id=_str(raw.get("ad_id")),
        product_id=_str(product.get("id")) if isinstance(product, dict) else "",
        extra={k: v for k, v in raw.items() if k not in _REFERRAL_KEYS},
    )


def _change(raw: Any, entry_id: str, entry_time: int | None, received: datetime) -> InboundItem:
    field = _str(raw.get("field")) if isinstance(raw, dict) else ""
    occurred = _time(None, entry_time, received)
    return _raw(raw, field or "changes", _ids(entry_id), "", occurred, entry_time or 0)


def _raw(
    raw: Any,
    kind: str,
    accounts: tuple[str, ...],
    customer: str,
    occurred: datetime,
    stamp: int,
) -> InboundItem:
    """A raw item; ``stamp`` is the time the delivery itself gives it (milliseconds, 0 for
    none): never the time it was received, or each of Meta's retries would be a new item."""
    text = _dumps(raw)
    return InboundItem(
        source=raw,
        kind=EventKind.RAW,
        account_ids=accounts,
        customer_id=customer,
        occurred_at=occurred,
        dedupe_key=f"raw:{kind}:{stamp}:{_digest(text)}",
        raw_kind=kind,
        raw_json=text,
    )


# ---- lenient readers ----


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, int | float):
        return str(value)
    return ""


def _id(value: Any) -> str:
    return _str(value.get("id")) if isinstance(value, dict) else ""


def _ids(*candidates: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(c for c in candidates if c))


def _true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, min(value, 2**31 - 1))
    if isinstance(value, str) and value.strip().isdigit():
        return min(int(value.strip()[:12]), 2**31 - 1)
    return 0


def _ms(value: Any) -> int | None:
    """Milliseconds since the epoch from a number or a numeric string, within range."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit() or len(value) > 15:
            return None
        value = int(value)
    if isinstance(value, float) and value == value:  # NaN never equals itself
        value = int(value) if abs(value) < 1e16 else None
    if isinstance(value, int) and _MIN_MS < value <= _MAX_MS:
        return value
    return None


def _epoch_ms(value: Any) -> int | None:
    """A time of Meta's in milliseconds: an entry's ``time`` is in milliseconds for
    messaging but in seconds for ``changes`` (comments, mentions), and Meta's own samples
    give an item's ``timestamp`` in seconds too. No real event is from before 1973, the
    first 10^11 ms: anything under that is taken for seconds."""
    ms = _ms(value)
    if ms is not None and ms < 100_000_000_000:
        ms *= 1000
    return ms if ms is None or ms <= _MAX_MS else None


def _time(value: Any, fallback_ms: int | None, received: datetime) -> datetime:
    ms = _epoch_ms(value) or fallback_ms
    if ms is None:
        return received
    return datetime.fromtimestamp(ms / 1000, UTC)


def _loads_leniently(body: bytes) -> Any:
    """What orjson refuses but is still JSON: a lone surrogate escape (``"\\ud83d"``, as a
    title cut in the middle of an emoji would carry), which the standard library reads.
    Each lone surrogate becomes U+FFFD, as nothing downstream can store or send it; one odd
    character must not cost the whole delivery."""
    try:
        # UTF-8 strictly, as Meta sends it (json.loads would also take UTF-16 or a BOM).
        return _without_lone_surrogates(
            json.loads(body.decode(), parse_constant=_no_constant, parse_int=_int_as_orjson)
        )
    except (ValueError, RecursionError):
        raise DeliveryRejected("the body is not JSON") from None


def _int_as_orjson(digits: str) -> int | float:
    """An integer as orjson reads it: beyond 64 bits, a float (orjson could not write the
    int back, and every later step writes the item)."""
    value = int(digits)
    return value if -(2**63) <= value < 2**64 else float(value)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _without_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_lone_surrogates(v) for v in value]
    return value


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def _pruned(value: Any, depth: int) -> Any:
    """``value`` with what nests deeper than ``depth`` replaced by a note saying so: no
    real payload comes near, and one odd item must not fail its delivery."""
    if isinstance(value, dict | list) and depth <= 0:
        return f"<cut: nested deeper than {MAX_DEPTH} levels>"
    if isinstance(value, dict):
        return {k: _pruned(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_pruned(v, depth - 1) for v in value]
    return value


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
