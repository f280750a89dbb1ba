"""SendMessageRequest -> the domain's SendRequest, and delivery attempts -> protobuf.

Field names in InvalidArgument are the request's proto field paths, so a caller can point
at the offending field.
"""

from __future__ import annotations

from dataclasses import replace

from switchboard.v1 import common_pb2, messaging_pb2

from gateway.api.convert import delivery_error, enum_name, timestamp
from gateway.domain.errors import InvalidArgument
from gateway.domain.outbound import (
    ContentKind,
    DeliveryAttempt,
    OutboundMessage,
    QuickReply,
    SendRequest,
    TemplateButton,
    TemplateElement,
)


def _enum_value(name: str, prefix: str) -> str:
    """``ATTACHMENT_TYPE_IMAGE`` -> ``image``; the UNSPECIFIED value -> empty."""
    value = name.removeprefix(prefix).lower()
    return "" if value == "unspecified" else value


def _content(req: messaging_pb2.SendMessageRequest) -> tuple[OutboundMessage, str]:
    """The content, and the message a reaction names (resolved by the service)."""
    kind = req.WhichOneof("content")
    if kind is None:
        raise InvalidArgument(
            "content",
            "set one of text, attachment, sticker, share, template, reaction, sender_action",
        )
    if kind == "text":
        return OutboundMessage(ContentKind.TEXT, text=req.text), ""
    if kind == "attachment":
        type_name = enum_name(common_pb2.AttachmentType, req.attachment.type, "attachment.type")
        return (
            OutboundMessage(
                ContentKind.ATTACHMENT,
                attachment_type=_enum_value(type_name, "ATTACHMENT_TYPE_"),
                url=req.attachment.url.strip(),
            ),
            "",
        )
    if kind == "sticker":
        kind_name = enum_name(messaging_pb2.Sticker.Kind, req.sticker.kind, "sticker.kind")
        sticker = _enum_value(kind_name, "KIND_")
        return OutboundMessage(ContentKind.STICKER, sticker=sticker), ""
    if kind == "share":
        return OutboundMessage(ContentKind.SHARE, post_id=req.share.post_id.strip()), ""
    if kind == "template":
        return OutboundMessage(ContentKind.TEMPLATE, elements=_elements(req)), ""
    if kind == "reaction":
        return (
            OutboundMessage(ContentKind.REACTION, emoji=req.reaction.emoji),
            req.reaction.message_id.strip(),
        )
    action = enum_name(
        messaging_pb2.SenderAction.Action, req.sender_action.action, "sender_action.action"
    )
    return (
        OutboundMessage(
            ContentKind.SENDER_ACTION,
            sender_action=_enum_value(action, "ACTION_"),
        ),
        "",
    )


def _elements(req: messaging_pb2.SendMessageRequest) -> tuple[TemplateElement, ...]:
    return tuple(
        TemplateElement(
            title=e.title,
            subtitle=e.subtitle,
            image_url=e.image_url,
            default_action_url=e.default_action.url,
            buttons=tuple(
                TemplateButton(
                    type=_enum_value(
                        enum_name(
                            messaging_pb2.TemplateButton.Type,
                            b.type,
                            f"template.elements[{i}].buttons[{j}].type",
                        ),
                        "TYPE_",
                    ),
                    title=b.title,
                    url=b.url,
                    payload=b.payload,
                )
                for j, b in enumerate(e.buttons)
            ),
        )
        for i, e in enumerate(req.template.elements)
    )


def send_request(req: messaging_pb2.SendMessageRequest) -> SendRequest:
    if not req.tenant_id.strip():
        raise InvalidArgument("tenant_id", "must not be empty")
    content, reaction_message_id = _content(req)
    message = replace(
        content,
        quick_replies=tuple(QuickReply(q.title, q.payload) for q in req.quick_replies),
        tag=req.tag.strip(),
    )
    if message.kind is ContentKind.REACTION and not reaction_message_id:
        raise InvalidArgument("reaction.message_id", "must not be empty")
    return SendRequest(
        tenant_id=req.tenant_id.strip(),
        connection_id=req.connection_id.strip(),
        message=message,
        conversation_id=req.conversation_id.strip(),
        recipient_id=req.recipient_id.strip(),
        # Opaque, as the caller made it: "k" and "k " are two keys, "  " is one.
        idempotency_key=req.idempotency_key,
        reply_to_message_id=req.reply_to_message_id.strip(),
        reaction_message_id=reaction_message_id,
        fail_fast=req.fail_fast,
    )


def attempts(items: list[DeliveryAttempt]) -> list[common_pb2.DeliveryAttempt]:
    return [
        common_pb2.DeliveryAttempt(
            number=a.number,
            started_at=timestamp(a.started_at),
            finished_at=timestamp(a.finished_at),
            error=delivery_error(a.error),
        )
        for a in items
    ]
