"""The outbound side of a channel: what the core hands a plugin to send, and what it answers.

A plugin that can send exposes an :class:`OutboundChannel` as its ``outbound`` attribute.
The core (``gateway.services.outbound``) owns validation against the channel's
:class:`OutboundLimits`, idempotency, storage, rate limits, retries and delivery status;
the channel only turns an :class:`OutboundMessage` into its platform's request and reports
failures with the channel errors of :mod:`gateway.domain.errors`:

- ``ChannelTransientError``: retry with backoff;
- ``ChannelRateLimited``: the account is throttled until ``retry_at``; hold, do not fail;
- ``ChannelAuthError``: the token is dead or a permission is missing (connection re-auth);
- ``ChannelRequestError``: the request will never succeed (``reason`` says why, e.g.
  ``OUTSIDE_MESSAGING_WINDOW``, ``RECIPIENT_UNAVAILABLE``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit

from gateway.config import Secret
from gateway.domain.errors import InvalidArgument
from gateway.domain.models import Attachment, Connection, Conversation, DeliveryError, Message

HUMAN_AGENT = "HUMAN_AGENT"


class ContentKind(enum.StrEnum):
    TEXT = "text"
    ATTACHMENT = "attachment"
    STICKER = "sticker"
    SHARE = "share"
    TEMPLATE = "template"
    REACTION = "reaction"
    SENDER_ACTION = "sender_action"


# What makes a message on the channel: a reaction or a sender action is not one.
MESSAGE_KINDS = frozenset(ContentKind) - {ContentKind.REACTION, ContentKind.SENDER_ACTION}


def echoed_as_message(kind: str) -> bool:
    """Whether the channel echoes content of this kind as a message once delivered."""
    return kind in MESSAGE_KINDS


class RateCategory(enum.StrEnum):
    """Which of the account's rate buckets a send draws from."""

    TEXT = "text"
    MEDIA = "media"


ATTACHMENT_TYPES = frozenset({"image", "video", "audio", "file"})
MEDIA_TYPES = frozenset({"audio", "video"})
STICKERS = frozenset({"like_heart"})
SENDER_ACTIONS = frozenset({"typing_on", "typing_off", "mark_seen"})
BUTTON_TYPES = frozenset({"web_url", "postback"})


@dataclass(frozen=True, slots=True)
class QuickReply:
    title: str
    payload: str


@dataclass(frozen=True, slots=True)
class TemplateButton:
    type: str  # "web_url" or "postback"
    title: str
    url: str = ""
    payload: str = ""


@dataclass(frozen=True, slots=True)
class TemplateElement:
    title: str
    subtitle: str = ""
    image_url: str = ""
    default_action_url: str = ""
    buttons: tuple[TemplateButton, ...] = ()


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """What to send to one recipient; the fields beyond ``kind`` depend on it.

    ``recipient_id`` is the channel's user id; ``reply_to_external_id`` and
    ``reaction_external_id`` are channel message ids (the core resolves its own ids).
    """

    kind: ContentKind
    recipient_id: str = ""
    text: str = ""
    attachment_type: str = ""
    url: str = ""
    sticker: str = ""
    post_id: str = ""
    elements: tuple[TemplateElement, ...] = ()
    reaction_external_id: str = ""
    emoji: str = ""
    sender_action: str = ""
    quick_replies: tuple[QuickReply, ...] = ()
    reply_to_external_id: str = ""
    tag: str = ""

    @property
    def category(self) -> RateCategory:
        if self.kind is ContentKind.ATTACHMENT and self.attachment_type in MEDIA_TYPES:
            return RateCategory.MEDIA
        return RateCategory.TEXT

    @property
    def keeps_order(self) -> bool:
        """Whether it goes out in its conversation's send order. A typing indicator or
        a mark-seen late or early garbles nothing, and one held up would be worthless
        by the time it went; a reaction names a message and reads as a reply."""
        return self.kind is not ContentKind.SENDER_ACTION


@dataclass(frozen=True, slots=True)
class OutboundLimits:
    """What the channel accepts; the core checks it before anything is stored."""

    max_text_bytes: int = 1000
    max_quick_replies: int = 13
    max_quick_reply_title: int = 20
    max_template_elements: int = 10
    max_template_buttons: int = 3
    # Characters of an element's title and of its subtitle; of a button's title.
    max_template_title: int = 80
    max_button_title: int = 20
    # The customer's window after their last message, and with the human-agent tag.
    window: timedelta = timedelta(hours=24)
    human_agent_window: timedelta = timedelta(days=7)
    # What the channel takes a tag with (its messages): the rest goes out untagged, so
    # only the untagged window lets it through.
    tagged_kinds: frozenset[ContentKind] = MESSAGE_KINDS


@dataclass(frozen=True, slots=True)
class SendResult:
    """The channel accepted the message. ``pause_until``: the platform's usage headers
    asked the account to slow down until then (None: no sign of throttling)."""

    external_id: str = ""
    recipient_id: str = ""
    pause_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class SendTarget:
    """A conversation as SendMessage finds it. ``pending_at``: the created_at of its
    latest message that keeps order and is still QUEUED or RETRYING (None: none is), so
    that a new message goes out after it rather than now."""

    conversation: Conversation
    pending_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SendBatch:
    """What a batch of SendMessage calls reads before it stores anything: conversations
    by id and by (connection_id, channel_user_id), and connections by id."""

    targets: dict[str, SendTarget]
    connections: dict[str, Connection]
    recipients: dict[tuple[str, str], SendTarget]


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One try to hand an outbound message to the channel (``error`` None: accepted)."""

    number: int
    started_at: datetime
    finished_at: datetime
    error: DeliveryError | None = None


class OutboundChannel(Protocol):
    limits: OutboundLimits

    async def send(
        self, connection: Connection, token: Secret, message: OutboundMessage
    ) -> SendResult:
        """Hands the message to the platform once; raises a ChannelError on failure."""


def outbound_of(plugin: object) -> OutboundChannel | None:
    """The plugin's sender, or None for a channel that cannot send."""
    outbound: OutboundChannel | None = getattr(plugin, "outbound", None)
    return outbound


# ---- validation (INVALID_ARGUMENT names the request field) ----


def _require_https(field_name: str, url: str) -> None:
    try:
        parts = urlsplit(url)
    except ValueError:  # a bracketed host left open, say
        raise InvalidArgument(field_name, "is not a URL") from None
    if parts.scheme != "https" or not parts.netloc:
        raise InvalidArgument(field_name, "must be an absolute https URL")


def _require(field_name: str, value: str) -> None:
    if not value.strip():
        raise InvalidArgument(field_name, "must not be empty")


def validate(message: OutboundMessage, limits: OutboundLimits) -> None:
    """Raises InvalidArgument naming the first offending field."""
    kind = message.kind
    if kind is ContentKind.TEXT:
        _require("text", message.text)
        size = len(message.text.encode("utf-8"))
        if size > limits.max_text_bytes:
            raise InvalidArgument(
                "text", f"is {size} bytes of UTF-8; at most {limits.max_text_bytes} are allowed"
            )
    elif kind is ContentKind.ATTACHMENT:
        if message.attachment_type not in ATTACHMENT_TYPES:
            raise InvalidArgument("attachment.type", "must be IMAGE, VIDEO, AUDIO or FILE")
        _require_https("attachment.url", message.url)
    elif kind is ContentKind.STICKER:
        if message.sticker not in STICKERS:
            raise InvalidArgument("sticker.kind", "must be KIND_LIKE_HEART")
    elif kind is ContentKind.SHARE:
        _require("share.post_id", message.post_id)
    elif kind is ContentKind.TEMPLATE:
        _validate_template(message.elements, limits)
    elif kind is ContentKind.REACTION:
        _require("reaction.message_id", message.reaction_external_id)
    elif kind is ContentKind.SENDER_ACTION and message.sender_action not in SENDER_ACTIONS:
        raise InvalidArgument("sender_action.action", "must be TYPING_ON, TYPING_OFF or MARK_SEEN")
    _validate_quick_replies(message, limits)
    if message.reply_to_external_id and kind in (ContentKind.REACTION, ContentKind.SENDER_ACTION):
        raise InvalidArgument("reply_to_message_id", "only a message can reply to another")
    if message.tag and message.tag != HUMAN_AGENT:
        raise InvalidArgument("tag", f"must be empty or {HUMAN_AGENT}")


def _validate_quick_replies(message: OutboundMessage, limits: OutboundLimits) -> None:
    replies = message.quick_replies
    if not replies:
        return
    if message.kind is not ContentKind.TEXT:
        raise InvalidArgument("quick_replies", "are allowed with text only")
    if len(replies) > limits.max_quick_replies:
        raise InvalidArgument(
            "quick_replies",
            f"holds {len(replies)} replies; at most {limits.max_quick_replies} are allowed",
        )
    for i, reply in enumerate(replies):
        _require(f"quick_replies[{i}].title", reply.title)
        _at_most(f"quick_replies[{i}].title", reply.title, limits.max_quick_reply_title)
        _require(f"quick_replies[{i}].payload", reply.payload)


def _at_most(field: str, value: str, characters: int) -> None:
    if len(value) > characters:
        raise InvalidArgument(
            field, f"is {len(value)} characters; at most {characters} are allowed"
        )


def _validate_template(elements: tuple[TemplateElement, ...], limits: OutboundLimits) -> None:
    if not 1 <= len(elements) <= limits.max_template_elements:
        raise InvalidArgument(
            "template.elements", f"must hold 1 to {limits.max_template_elements} elements"
        )
    for i, element in enumerate(elements):
        where = f"template.elements[{i}]"
        _require(f"{where}.title", element.title)
        _at_most(f"{where}.title", element.title, limits.max_template_title)
        _at_most(f"{where}.subtitle", element.subtitle, limits.max_template_title)
        if not (
            element.subtitle or element.image_url or element.default_action_url or element.buttons
        ):
            # Meta refuses a card that is a title alone, and the whole carousel with it.
            raise InvalidArgument(
                where,
                "needs a subtitle, an image_url, a default_action or buttons beside its title",
            )
        if element.image_url:
            _require_https(f"{where}.image_url", element.image_url)
        if element.default_action_url:
            _require_https(f"{where}.default_action.url", element.default_action_url)
        if len(element.buttons) > limits.max_template_buttons:
            raise InvalidArgument(
                f"{where}.buttons", f"holds at most {limits.max_template_buttons} buttons"
            )
        for j, button in enumerate(element.buttons):
            spot = f"{where}.buttons[{j}]"
            if button.type not in BUTTON_TYPES:
                raise InvalidArgument(f"{spot}.type", "must be TYPE_WEB_URL or TYPE_POSTBACK")
            _require(f"{spot}.title", button.title)
            _at_most(f"{spot}.title", button.title, limits.max_button_title)
            if button.type == "web_url":
                _require_https(f"{spot}.url", button.url)
            else:
                _require(f"{spot}.payload", button.payload)


# ---- storage form (Message.content["outbound"]) ----


def stored_kind(message: Message) -> str:
    """The kind of content a stored outbound message holds ("" when it holds none)."""
    outbound = message.content.get("outbound")
    return str(outbound.get("kind") or "") if isinstance(outbound, dict) else ""


def to_json(message: OutboundMessage) -> dict[str, Any]:
    """The message as JSON-able data, empty fields left out."""
    data: dict[str, Any] = {
        "kind": message.kind.value,
        "recipient_id": message.recipient_id,
        "text": message.text,
        "attachment_type": message.attachment_type,
        "url": message.url,
        "sticker": message.sticker,
        "post_id": message.post_id,
        "reaction_external_id": message.reaction_external_id,
        "emoji": message.emoji,
        "sender_action": message.sender_action,
        "reply_to_external_id": message.reply_to_external_id,
        "tag": message.tag,
    }
    if message.quick_replies:
        data["quick_replies"] = [
            {"title": q.title, "payload": q.payload} for q in message.quick_replies
        ]
    if message.elements:
        data["elements"] = [_element_json(e) for e in message.elements]
    return {k: v for k, v in data.items() if v}


def _element_json(e: TemplateElement) -> dict[str, Any]:
    return {
        "title": e.title,
        "subtitle": e.subtitle,
        "image_url": e.image_url,
        "default_action_url": e.default_action_url,
        "buttons": [
            {"type": b.type, "title": b.title, "url": b.url, "payload": b.payload}
            for b in e.buttons
        ],
    }


def from_json(data: dict[str, Any]) -> OutboundMessage:
    return OutboundMessage(
        kind=ContentKind(data["kind"]),
        recipient_id=str(data.get("recipient_id", "")),
        text=str(data.get("text", "")),
        attachment_type=str(data.get("attachment_type", "")),
        url=str(data.get("url", "")),
        sticker=str(data.get("sticker", "")),
        post_id=str(data.get("post_id", "")),
        elements=tuple(
            TemplateElement(
                title=str(e.get("title", "")),
                subtitle=str(e.get("subtitle", "")),
                image_url=str(e.get("image_url", "")),
                default_action_url=str(e.get("default_action_url", "")),
                buttons=tuple(TemplateButton(**b) for b in e.get("buttons", ())),
            )
            for e in data.get("elements", ())
        ),
        reaction_external_id=str(data.get("reaction_external_id", "")),
        emoji=str(data.get("emoji", "")),
        sender_action=str(data.get("sender_action", "")),
        quick_replies=tuple(QuickReply(**q) for q in data.get("quick_replies", ())),
        reply_to_external_id=str(data.get("reply_to_external_id", "")),
        tag=str(data.get("tag", "")),
    )


def attachments_of(message: OutboundMessage) -> tuple[Attachment, ...]:
    """What the stored message shows as attachments (history and events)."""
    if message.kind is ContentKind.ATTACHMENT:
        return (Attachment(type=message.attachment_type, url=message.url),)
    if message.kind is ContentKind.STICKER:
        return (Attachment(type="sticker", raw_type=message.sticker),)
    if message.kind is ContentKind.SHARE:
        return (Attachment(type="share", media_id=message.post_id),)
    if message.kind is ContentKind.TEMPLATE:
        return (Attachment(type="template", title=message.elements[0].title),)
    return ()


@dataclass(frozen=True, slots=True)
class SendRequest:
    """A SendMessage call, channel-neutral. Exactly one of conversation_id and
    recipient_id is set; message/reaction ids may be Switchboard ids or channel ids."""

    tenant_id: str
    connection_id: str
    message: OutboundMessage
    conversation_id: str = ""
    recipient_id: str = ""
    idempotency_key: str = ""
    reply_to_message_id: str = ""
    reaction_message_id: str = ""
    fail_fast: bool = False
