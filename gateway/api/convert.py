"""Domain records to protobuf messages (the core never sees protobuf)."""

from __future__ import annotations

import dataclasses
from datetime import datetime

from google.protobuf import timestamp_pb2
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from switchboard.v1 import common_pb2, connect_pb2

from gateway.domain.channel import ChannelInfo
from gateway.domain.errors import InvalidArgument
from gateway.domain.models import (
    Account,
    Attachment,
    Connection,
    Conversation,
    DeliveryError,
    Message,
    Participant,
)


def enum_name(enum: EnumTypeWrapper, value: int, field: str) -> str:
    """The name of an enum value; a number this build does not know (proto3 lets any
    through, from a newer client or a hand-built request) is the caller's mistake."""
    try:
        return enum.Name(value)
    except ValueError:
        raise InvalidArgument(field, f"unknown value {value}") from None


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def channel_info(info: ChannelInfo) -> connect_pb2.ChannelInfo:
    return connect_pb2.ChannelInfo(
        name=info.name,
        display_name=info.display_name,
        capabilities=list(info.capabilities),
        login_flows=[
            connect_pb2.LoginFlow(
                name=f.name,
                display_name=f.display_name,
                scopes=list(f.scopes),
                configured=f.configured,
            )
            for f in info.login_flows
        ],
        default_login_flow=info.default_login_flow,
        configured=info.configured,
        sandbox=info.sandbox,
    )


def account(a: Account) -> common_pb2.Account:
    return common_pb2.Account(
        external_id=a.external_id,
        username=a.username,
        display_name=a.display_name,
        picture_url=a.picture_url,
        page_id=a.page_id,
    )


def connection(conn: Connection) -> common_pb2.Connection:
    return common_pb2.Connection(
        id=conn.id,
        tenant_id=conn.tenant_id,
        channel=conn.channel,
        status=f"CONNECTION_STATUS_{conn.status.value}",
        account=account(conn.account),
        scopes=list(conn.scopes),
        token_expires_at=timestamp(conn.token_expires_at),
        connected_at=timestamp(conn.connected_at),
        last_event_at=timestamp(conn.last_event_at),
        last_error=conn.last_error,
        login_flow=conn.login_flow,
        created_at=timestamp(conn.created_at),
        updated_at=timestamp(conn.updated_at),
    )


def participant(p: Participant) -> common_pb2.Participant:
    return common_pb2.Participant(
        channel_user_id=p.channel_user_id,
        username=p.username,
        name=p.name,
        picture_url=p.picture_url,
    )


def conversation(c: Conversation) -> common_pb2.Conversation:
    return common_pb2.Conversation(
        id=c.id,
        tenant_id=c.tenant_id,
        connection_id=c.connection_id,
        channel=c.channel,
        participant=participant(c.participant),
        created_at=timestamp(c.created_at),
        last_message_at=timestamp(c.last_message_at),
        last_inbound_at=timestamp(c.last_inbound_at),
        window_expires_at=timestamp(c.window_expires_at),
    )


_ATTACHMENT_TYPES = frozenset(common_pb2.AttachmentType.keys())


def _attachment_type(name: str) -> str:
    key = f"ATTACHMENT_TYPE_{name.upper()}"
    return key if key in _ATTACHMENT_TYPES else "ATTACHMENT_TYPE_OTHER"


def attachment(a: Attachment) -> common_pb2.Attachment:
    return common_pb2.Attachment(
        type=_attachment_type(a.type),
        url=a.url,
        mime=a.mime,
        title=a.title,
        media_id=a.media_id,
        raw_type=a.raw_type,
    )


def delivery_error(e: DeliveryError | None) -> common_pb2.DeliveryError | None:
    if e is None:
        return None
    # The proto's fields are the dataclass's, by name.
    return common_pb2.DeliveryError(**dataclasses.asdict(e))


def message(m: Message, sender: Participant | None = None) -> common_pb2.Message:
    reply = m.content.get("reply_to") or {}
    reply_to = None
    if reply.get("story"):
        story = reply["story"]
        reply_to = common_pb2.ReplyTo(
            story=common_pb2.StoryRef(
                id=str(story.get("id", "")),
                url=str(story.get("url", "")),
                link_sticker_url=str(story.get("link_sticker_url", "")),
            )
        )
    elif reply.get("mid") or reply.get("message_id"):
        reply_to = common_pb2.ReplyTo(
            message_external_id=str(reply.get("mid", "")),
            message_id=str(reply.get("message_id", "")),
        )
    return common_pb2.Message(
        id=m.id,
        conversation_id=m.conversation_id,
        direction=f"DIRECTION_{m.direction.value}",
        external_id=m.external_id,
        sender=participant(sender)
        if sender
        else common_pb2.Participant(channel_user_id=m.sender_id),
        text=m.text,
        attachments=[attachment(a) for a in m.attachments],
        reply_to=reply_to,
        quick_reply_payload=str(m.content.get("quick_reply_payload", "")),
        created_at=timestamp(m.created_at),
        status=f"MESSAGE_STATUS_{m.status.value}",
        error=delivery_error(m.error),
        tenant_id=m.tenant_id,
        connection_id=m.connection_id,
        channel=m.channel,
        idempotency_key=m.idempotency_key,
        sent_at=timestamp(m.sent_at),
        confirmed_at=timestamp(m.confirmed_at),
        deleted=m.deleted,
        edit_count=m.edit_count,
        unsupported=bool(m.content.get("unsupported", False)),
    )
