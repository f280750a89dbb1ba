"""Rows <-> domain records, shared by both backends.

Column names are the same in both schemas; what differs is how a time or a JSON value
travels (timestamptz and JSONB on PostgreSQL, sortable text on SQLite), which a
:class:`Codec` hides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from gateway.domain.codec import event_from_dict, event_to_dict
from gateway.domain.events import Event
from gateway.domain.models import (
    Account,
    ApiToken,
    Attachment,
    Connection,
    ConnectionStatus,
    Conversation,
    Credential,
    DeliveryError,
    Direction,
    Message,
    MessageStatus,
    OAuthState,
    Participant,
    Scope,
)
from gateway.domain.store import OutboxEntry

Row = Mapping[str, Any]
Params = dict[str, Any]


class Codec(Protocol):
    """How one backend stores times and JSON values."""

    def ts(self, value: datetime) -> Any: ...
    def ts_in(self, value: Any) -> datetime: ...
    def json(self, value: Any) -> Any: ...
    def json_document(self, raw: bytes) -> Any:
        """Encoded JSON (UTF-8 bytes) bound as ``json`` rather than ``jsonb``, without
        encoding it again: a document a statement only reads (``json_to_recordset``), or a
        value stored as it came (an outbox event), not worth converting to ``jsonb``."""

    def json_in(self, value: Any) -> Any: ...


def utc(value: datetime) -> datetime:
    # A naive time can only have come from a caller that meant UTC: the domain has no other.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def opt_ts(codec: Codec, value: datetime | None) -> Any:
    return None if value is None else codec.ts(utc(value))


def opt_ts_in(codec: Codec, value: Any) -> datetime | None:
    return None if value is None else codec.ts_in(value)


# ---- API tokens and OAuth states ----


def api_token_params(codec: Codec, token: ApiToken, token_hash: str, now: datetime) -> Params:
    return {
        "id": token.id,
        "name": token.name,
        "token_hash": token_hash,
        "tenants": codec.json(list(token.tenants)),
        "scopes": codec.json(sorted(s.value for s in token.scopes)),
        "created_at": codec.ts(utc(token.created_at or now)),
        "revoked_at": opt_ts(codec, token.revoked_at),
        "last_used_at": opt_ts(codec, token.last_used_at),
    }


def api_token_from_row(codec: Codec, row: Row) -> ApiToken:
    return ApiToken(
        id=row["id"],
        name=row["name"],
        tenants=tuple(codec.json_in(row["tenants"])),
        scopes=frozenset(Scope(s) for s in codec.json_in(row["scopes"])),
        created_at=opt_ts_in(codec, row["created_at"]),
        revoked_at=opt_ts_in(codec, row["revoked_at"]),
        last_used_at=opt_ts_in(codec, row["last_used_at"]),
    )


def oauth_state_params(codec: Codec, state: OAuthState, now: datetime) -> Params:
    return {
        "state_hash": state.state_hash,
        "tenant_id": state.tenant_id,
        "channel": state.channel,
        "login_flow": state.login_flow,
        "return_url": state.return_url,
        "expires_at": codec.ts(utc(state.expires_at)),
        "created_at": codec.ts(utc(state.created_at or now)),
    }


def oauth_state_from_row(codec: Codec, row: Row) -> OAuthState:
    return OAuthState(
        state_hash=row["state_hash"],
        tenant_id=row["tenant_id"],
        channel=row["channel"],
        login_flow=row["login_flow"],
        return_url=row["return_url"],
        expires_at=codec.ts_in(row["expires_at"]),
        created_at=opt_ts_in(codec, row["created_at"]),
    )


# ---- connections and credentials ----


def connection_params(codec: Codec, conn: Connection, now: datetime) -> Params:
    return {
        "id": conn.id,
        "tenant_id": conn.tenant_id,
        "channel": conn.channel,
        "status": conn.status.value,
        "account_external_id": conn.account.external_id,
        "account_username": conn.account.username,
        "account_display_name": conn.account.display_name,
        "account_picture_url": conn.account.picture_url,
        "account_page_id": conn.account.page_id,
        "login_flow": conn.login_flow,
        "scopes": codec.json(list(conn.scopes)),
        "token_expires_at": opt_ts(codec, conn.token_expires_at),
        "connected_at": opt_ts(codec, conn.connected_at),
        "last_event_at": opt_ts(codec, conn.last_event_at),
        "last_error": conn.last_error,
        "created_at": codec.ts(utc(conn.created_at or now)),
        "updated_at": codec.ts(utc(now)),
    }


def connection_from_row(codec: Codec, row: Row) -> Connection:
    return Connection(
        id=row["id"],
        tenant_id=row["tenant_id"],
        channel=row["channel"],
        status=ConnectionStatus(row["status"]),
        account=Account(
            external_id=row["account_external_id"],
            username=row["account_username"],
            display_name=row["account_display_name"],
            picture_url=row["account_picture_url"],
            page_id=row["account_page_id"],
        ),
        login_flow=row["login_flow"],
        scopes=tuple(codec.json_in(row["scopes"])),
        token_expires_at=opt_ts_in(codec, row["token_expires_at"]),
        connected_at=opt_ts_in(codec, row["connected_at"]),
        last_event_at=opt_ts_in(codec, row["last_event_at"]),
        last_error=row["last_error"],
        created_at=opt_ts_in(codec, row["created_at"]),
        updated_at=opt_ts_in(codec, row["updated_at"]),
    )


def credential_params(codec: Codec, credential: Credential, now: datetime) -> Params:
    return {
        "connection_id": credential.connection_id,
        "key_id": credential.key_id,
        "ciphertext": bytes(credential.ciphertext),
        "created_at": codec.ts(utc(credential.created_at or now)),
    }


def credential_from_row(codec: Codec, row: Row) -> Credential:
    return Credential(
        connection_id=row["connection_id"],
        key_id=row["key_id"],
        ciphertext=bytes(row["ciphertext"]),
        created_at=opt_ts_in(codec, row["created_at"]),
    )


# ---- participants, conversations, messages ----


def participant_params(codec: Codec, p: Participant) -> Params:
    return {
        "id": p.id,
        "connection_id": p.connection_id,
        "channel_user_id": p.channel_user_id,
        "username": p.username,
        "name": p.name,
        "picture_url": p.picture_url,
        "profile_fetched_at": opt_ts(codec, p.profile_fetched_at),
    }


def participant_from_row(codec: Codec, row: Row, prefix: str = "") -> Participant:
    return Participant(
        id=row[prefix + "id"],
        connection_id=row[prefix + "connection_id"],
        channel_user_id=row[prefix + "channel_user_id"],
        username=row[prefix + "username"],
        name=row[prefix + "name"],
        picture_url=row[prefix + "picture_url"],
        profile_fetched_at=opt_ts_in(codec, row[prefix + "profile_fetched_at"]),
    )


# A conversation row joined with its participant's columns, prefixed "p_".
CONVERSATION_COLUMNS = (
    "c.id, c.tenant_id, c.connection_id, c.channel, c.created_at, c.last_message_at,"
    " c.last_inbound_at, c.window_expires_at, c.activity_at,"
    " p.id AS p_id, p.connection_id AS p_connection_id, p.channel_user_id AS p_channel_user_id,"
    " p.username AS p_username, p.name AS p_name, p.picture_url AS p_picture_url,"
    " p.profile_fetched_at AS p_profile_fetched_at"
)
# The connection is stated on both sides (it is the same): a customer is then found through
# the participants' (connection_id, channel_user_id) index rather than by a scan.
CONVERSATION_FROM = (
    "conversations c JOIN participants p"
    " ON p.id = c.participant_id AND p.connection_id = c.connection_id"
)


def conversation_params(codec: Codec, c: Conversation, now: datetime) -> Params:
    return {
        "id": c.id,
        "tenant_id": c.tenant_id,
        "connection_id": c.connection_id,
        "channel": c.channel,
        "participant_id": c.participant.id,
        "created_at": codec.ts(utc(c.created_at or now)),
        "last_message_at": opt_ts(codec, c.last_message_at),
        "last_inbound_at": opt_ts(codec, c.last_inbound_at),
        "window_expires_at": opt_ts(codec, c.window_expires_at),
    }


def conversation_from_row(codec: Codec, row: Row) -> Conversation:
    return Conversation(
        id=row["id"],
        tenant_id=row["tenant_id"],
        connection_id=row["connection_id"],
        channel=row["channel"],
        participant=participant_from_row(codec, row, prefix="p_"),
        created_at=opt_ts_in(codec, row["created_at"]),
        last_message_at=opt_ts_in(codec, row["last_message_at"]),
        last_inbound_at=opt_ts_in(codec, row["last_inbound_at"]),
        window_expires_at=opt_ts_in(codec, row["window_expires_at"]),
    )


def attachment_to_json(a: Attachment) -> dict[str, str]:
    return {
        "type": a.type,
        "url": a.url,
        "mime": a.mime,
        "title": a.title,
        "media_id": a.media_id,
        "raw_type": a.raw_type,
    }


def error_to_json(e: DeliveryError) -> dict[str, Any]:
    # Its fields by name, as DeliveryError(**...) reads them back.
    return dataclasses.asdict(e)


def message_identity(m: Message) -> dict[str, Any]:
    """The columns of a message that every way of writing it gives as they are: ids,
    routing, status and text."""
    return {
        "id": m.id,
        "tenant_id": m.tenant_id,
        "connection_id": m.connection_id,
        "conversation_id": m.conversation_id,
        "channel": m.channel,
        "direction": m.direction.value,
        "status": m.status.value,
        "external_id": m.external_id,
        "sender_id": m.sender_id,
        "text": m.text,
    }


def message_params(codec: Codec, m: Message, now: datetime) -> Params:
    return {
        **message_identity(m),
        "attachments": codec.json([attachment_to_json(a) for a in m.attachments]),
        "content": codec.json(m.content),
        "idempotency_key": m.idempotency_key,
        "error": None if m.error is None else codec.json(error_to_json(m.error)),
        "attempts": m.attempts,
        "next_attempt_at": opt_ts(codec, m.next_attempt_at),
        "created_at": codec.ts(utc(m.created_at or now)),
        "sent_at": opt_ts(codec, m.sent_at),
        "confirmed_at": opt_ts(codec, m.confirmed_at),
        "deleted": bool(m.deleted),
        "edit_count": m.edit_count,
    }


# The columns of a message that change after it is stored (delivery, edits, unsends).
MESSAGE_MUTABLE_COLUMNS = (
    "status",
    "external_id",
    "sender_id",
    "text",
    "attachments",
    "content",
    "error",
    "attempts",
    "next_attempt_at",
    "sent_at",
    "confirmed_at",
    "deleted",
    "edit_count",
)


# The columns a received or echoed message sets; the others (the send queue's) keep their
# defaults. Kept beside message_params, which sets every column.
RECEIVED_MESSAGE_COLUMNS = (
    "id, tenant_id, connection_id, conversation_id, channel, direction, status, external_id,"
    " sender_id, text, attachments, content, created_at, deleted, edit_count"
)


def received_message_json(m: Message, now: datetime) -> dict[str, Any]:
    """The RECEIVED_MESSAGE_COLUMNS of ``m`` as one JSON object (a row for
    ``json_populate_recordset``): values JSON can carry as they are, times as RFC 3339."""
    return {
        **message_identity(m),
        "attachments": [attachment_to_json(a) for a in m.attachments],
        "content": m.content,
        "created_at": utc(m.created_at or now),
        "deleted": bool(m.deleted),
        "edit_count": m.edit_count,
    }


def message_from_row(codec: Codec, row: Row) -> Message:
    error = row["error"]
    return Message(
        id=row["id"],
        tenant_id=row["tenant_id"],
        connection_id=row["connection_id"],
        conversation_id=row["conversation_id"],
        channel=row["channel"],
        direction=Direction(row["direction"]),
        status=MessageStatus(row["status"]),
        external_id=row["external_id"],
        sender_id=row["sender_id"],
        text=row["text"],
        attachments=tuple(Attachment(**a) for a in codec.json_in(row["attachments"])),
        content=codec.json_in(row["content"]),
        idempotency_key=row["idempotency_key"],
        error=None if error is None else DeliveryError(**codec.json_in(error)),
        attempts=row["attempts"],
        next_attempt_at=opt_ts_in(codec, row["next_attempt_at"]),
        created_at=opt_ts_in(codec, row["created_at"]),
        sent_at=opt_ts_in(codec, row["sent_at"]),
        confirmed_at=opt_ts_in(codec, row["confirmed_at"]),
        deleted=bool(row["deleted"]),
        edit_count=row["edit_count"],
    )


# ---- outbox ----


def event_params(codec: Codec, event: Event, now: datetime) -> Params:
    return {
        "event_id": event.event_id,
        "event": codec.json(event_to_dict(event)),
        "created_at": codec.ts(utc(now)),
    }


def outbox_entry_from_row(codec: Codec, row: Row) -> OutboxEntry:
    return OutboxEntry(
        seq=row["seq"],
        event=event_from_dict(codec.json_in(row["event"])),
        attempts=row["attempts"],
        # Where the query selects it (the in-process bus's reload).
        published_at=opt_ts_in(codec, row.get("published_at")),
    )
