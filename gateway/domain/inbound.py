"""The inbound side of a channel: what a plugin gives the core for each webhook delivery.

A plugin exposes a :class:`ChannelInbound` as its ``inbound`` attribute. The core checks the
delivery with :meth:`ChannelInbound.verify` on the raw bytes before anything else, then asks
:meth:`ChannelInbound.parse` for channel-neutral :class:`InboundItem` records, routes them to
connections by the account ids they name, and stores them. Nothing here knows a channel's
wire format, and nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from gateway.domain.channel import HttpRequest, HttpResponse
from gateway.domain.errors import SwitchboardError
from gateway.domain.events import EventKind
from gateway.domain.models import (
    Attachment,
    Connection,
    Conversation,
    Direction,
    Message,
    MessageStatus,
)

# Items of these kinds open (or extend) the customer's messaging window.
WINDOW_OPENERS = frozenset({EventKind.MESSAGE_RECEIVED, EventKind.POSTBACK, EventKind.REFERRAL})


class DeliveryRejected(SwitchboardError):
    """The delivery is not the channel's envelope at all (not JSON, wrong shape)."""

    reason = "MALFORMED_DELIVERY"


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a delivery is authentic; ``reason`` labels the metric when it is not."""

    ok: bool
    reason: str = "ok"


@dataclass(frozen=True, slots=True)
class ReferralInfo:
    ref: str = ""
    source: str = ""
    type: str = ""
    ad_id: str = ""
    product_id: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoryRef:
    id: str = ""
    url: str = ""
    link_sticker_url: str = ""


@dataclass(frozen=True, slots=True)
class InboundItem:
    """One thing that happened, normalized; fields beyond the header depend on ``kind``.

    ``account_ids`` name the business account the item belongs to, most specific first
    (routing tries each); ``customer_id`` is the customer's channel user id, empty when the
    channel left it out. ``dedupe_key`` is equal for two deliveries of the same happening,
    so that retried and duplicated deliveries make one event.
    """

    kind: EventKind
    account_ids: tuple[str, ...]
    customer_id: str
    occurred_at: datetime
    dedupe_key: str
    external_id: str = ""
    text: str = ""
    attachments: tuple[Attachment, ...] = ()
    reply_to_external_id: str = ""
    reply_to_story: StoryRef | None = None
    quick_reply_payload: str = ""
    unsupported: bool = False
    is_self: bool = False
    referral: ReferralInfo | None = None
    # reactions
    react: bool = True
    reaction: str = ""
    emoji: str = ""
    # edits
    edit_count: int = 0
    # postbacks
    title: str = ""
    payload: str = ""
    # raw events: the channel's name for the kind and the original JSON
    raw_kind: str = ""
    raw_json: str = ""
    # Delivered for a thread another app controls (Meta's standby[], the handover
    # protocol): the consumer learns it must not answer into it unasked.
    standby: bool = False
    # The channel's original item, serialized only if it must be quarantined.
    source: Any = field(default=None, compare=False, repr=False)

    @property
    def opens_window(self) -> bool:
        return self.kind in WINDOW_OPENERS


@dataclass(frozen=True, slots=True)
class Leftover:
    """A part of a delivery that cannot become an item (kept in quarantine, not dropped)."""

    reason: str
    raw_json: str
    account_id: str = ""


@dataclass(frozen=True, slots=True)
class ParsedDelivery:
    items: tuple[InboundItem, ...] = ()
    leftovers: tuple[Leftover, ...] = ()
    # Items of the platform's own test payloads (Meta's dashboard "Test" button): answered,
    # delivered nowhere.
    test_items: int = 0

    def account_ids(self) -> list[str]:
        return list(dict.fromkeys(a for item in self.items for a in item.account_ids))


class ChannelInbound(Protocol):
    """The webhook endpoint of one channel."""

    def verify_subscription(self, request: HttpRequest) -> HttpResponse:
        """The platform's subscription handshake (a GET)."""

    def verify(self, request: HttpRequest) -> Verdict:
        """Checks the delivery's signature on its raw bytes."""

    def parse(self, body: bytes) -> ParsedDelivery:
        """Normalizes a verified delivery; raises DeliveryRejected and nothing else."""


@dataclass(frozen=True, slots=True)
class Profile:
    username: str = ""
    name: str = ""
    picture_url: str = ""


class ProfileSource(Protocol):
    """Looks up a customer's public profile on the channel."""

    async def fetch_profile(
        self, connection: Connection, access_token: str, channel_user_id: str
    ) -> Profile:
        """Raises ChannelError when the channel refuses or fails."""


# ---- what the store is given and answers (gateway.domain.store.Tx.ingest_inbound) ----


@dataclass(frozen=True, slots=True)
class RoutedItem:
    """An item and the connection it was routed to."""

    connection: Connection
    item: InboundItem
    received_at: datetime


@dataclass(slots=True)
class IngestResult:
    """What storing one routed item found or changed.

    ``conversation`` is None only when the item names no customer and no known message.
    ``message`` is the stored message of a received or echoed item (the existing one when
    ``duplicate``); ``message_id`` is our id of the message any item refers to, if known.
    ``confirmed`` is set when an echo named a message the gateway sent and had not seen
    confirmed yet. ``deleted_before_arrival`` is set when a received or echoed message was
    stored already deleted, because its unsend was delivered first (Meta reorders).
    """

    conversation: Conversation | None = None
    message: Message | None = None
    message_id: str = ""
    reply_to_message_id: str = ""
    duplicate: bool = False
    # Stored deleted: its MessageDeleted went out before it arrived, so it is not announced.
    deleted_before_arrival: bool = False
    # An echo of a message sent through the gateway, which this item confirmed.
    confirmed: Message | None = None
    # An echo stored before the outcome of the gateway's own send it echoes: not announced
    # (that send's DeliveryUpdates will say it was confirmed).
    own_echo: bool = False
    # An edit older than one already applied or kept (Meta reorders): not announced, as a
    # subscriber would show the older wording.
    superseded: bool = False


@dataclass(frozen=True, slots=True)
class QuarantinedDelivery:
    """A delivery (or part of one) kept for inspection instead of being processed."""

    channel: str
    reason: str
    body: bytes
    received_at: datetime
    account_id: str = ""
    body_size: int = 0
    seq: int = 0


MESSAGE_KINDS = frozenset({EventKind.MESSAGE_RECEIVED, EventKind.MESSAGE_ECHOED})
WINDOW = timedelta(hours=24)
# How long the unsend of a message not stored yet is remembered, for the message to come:
# well beyond the 36 hours Meta retries a failed delivery for.
TOMBSTONE_RETENTION = timedelta(days=7)


def message_from_item(
    item: InboundItem, connection: Connection, conversation_id: str, message_id: str
) -> Message:
    """The message a received or echoed item stores; what has no column goes in ``content``
    (the keys gateway.api.convert reads)."""
    content: dict[str, Any] = {}
    if item.reply_to_story is not None:
        story = item.reply_to_story
        content["reply_to"] = {"story": {"id": story.id, "url": story.url}}
        if story.link_sticker_url:
            content["reply_to"]["story"]["link_sticker_url"] = story.link_sticker_url
    elif item.reply_to_external_id:
        content["reply_to"] = {"mid": item.reply_to_external_id}
    if item.quick_reply_payload:
        content["quick_reply_payload"] = item.quick_reply_payload
    if item.unsupported:
        content["unsupported"] = True
    if item.is_self:
        content["is_self"] = True
    if item.referral is not None:
        content["referral"] = referral_to_dict(item.referral)
    echoed = item.kind == EventKind.MESSAGE_ECHOED
    return Message(
        id=message_id,
        tenant_id=connection.tenant_id,
        connection_id=connection.id,
        conversation_id=conversation_id,
        channel=connection.channel,
        direction=Direction.OUTBOUND if echoed else Direction.INBOUND,
        status=MessageStatus.SENT if echoed else MessageStatus.RECEIVED,
        external_id=item.external_id,
        sender_id=connection.account.external_id if echoed else item.customer_id,
        text=item.text,
        attachments=item.attachments,
        content=content,
        created_at=item.occurred_at,
    )


def referral_to_dict(r: ReferralInfo) -> dict[str, Any]:
    """The ReferralInfo message in the protobuf JSON mapping (empty fields left out)."""
    out: dict[str, Any] = {
        k: v
        for k, v in (
            ("ref", r.ref),
            ("source", r.source),
            ("type", r.type),
            ("ad_id", r.ad_id),
            ("product_id", r.product_id),
        )
        if v
    }
    if r.extra:
        out["extra"] = dict(r.extra)
    return out
