"""The domain's records: plain dataclasses, no I/O, no protobuf.

Times are timezone-aware UTC ``datetime``s. Ids are opaque strings (prefixed UUIDv7-like
values made by :func:`gateway.domain.ids.new_id`), so that they sort by creation time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class ConnectionStatus(enum.StrEnum):
    PENDING = "PENDING"
    CONNECTED = "CONNECTED"
    NEEDS_REAUTH = "NEEDS_REAUTH"
    DISCONNECTED = "DISCONNECTED"


class Direction(enum.StrEnum):
    INBOUND = "INBOUND"
    OUTBOUND = "OUTBOUND"


class MessageStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    SENT = "SENT"
    FAILED = "FAILED"
    RECEIVED = "RECEIVED"
    RETRYING = "RETRYING"


class Scope(enum.StrEnum):
    """What an API token may do."""

    CONNECT = "connect"
    SEND = "send"
    READ = "read"
    SUBSCRIBE = "subscribe"
    ADMIN = "admin"


ALL_TENANTS = "*"


@dataclass(frozen=True, slots=True)
class Account:
    """The channel-side business account a connection speaks as."""

    external_id: str
    username: str = ""
    display_name: str = ""
    picture_url: str = ""
    page_id: str = ""


@dataclass(slots=True)
class Connection:
    id: str
    tenant_id: str
    channel: str
    status: ConnectionStatus
    account: Account
    login_flow: str = ""
    scopes: tuple[str, ...] = ()
    token_expires_at: datetime | None = None
    connected_at: datetime | None = None
    last_event_at: datetime | None = None
    last_error: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Credential:
    """An encrypted credential blob; only gateway.security.keyring can open it."""

    connection_id: str
    key_id: str
    ciphertext: bytes
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class OAuthState:
    """A pending OAuth flow, bound to its tenant and channel; single use."""

    state_hash: str
    tenant_id: str
    channel: str
    login_flow: str
    return_url: str
    expires_at: datetime
    created_at: datetime | None = None


@dataclass(slots=True)
class Participant:
    """A customer on a channel, scoped to one connection."""

    id: str
    connection_id: str
    channel_user_id: str
    username: str = ""
    name: str = ""
    picture_url: str = ""
    profile_fetched_at: datetime | None = None


@dataclass(slots=True)
class Conversation:
    id: str
    tenant_id: str
    connection_id: str
    channel: str
    participant: Participant
    created_at: datetime | None = None
    last_message_at: datetime | None = None
    last_inbound_at: datetime | None = None
    window_expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Attachment:
    type: str
    url: str = ""
    mime: str = ""
    title: str = ""
    media_id: str = ""
    raw_type: str = ""


@dataclass(frozen=True, slots=True)
class DeliveryError:
    reason: str
    message: str = ""
    channel_code: int = 0
    channel_subcode: int = 0
    retryable: bool = False
    # The attempt may have reached the channel, which then delivered it (a timeout or a
    # dropped connection after the request went out).
    maybe_delivered: bool = False


@dataclass(slots=True)
class Message:
    id: str
    tenant_id: str
    connection_id: str
    conversation_id: str
    channel: str
    direction: Direction
    status: MessageStatus
    external_id: str = ""
    sender_id: str = ""
    text: str = ""
    attachments: tuple[Attachment, ...] = ()
    # The channel-specific content (reply_to, quick replies, template, ...) as JSON-able data.
    content: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str = ""
    error: DeliveryError | None = None
    attempts: int = 0
    next_attempt_at: datetime | None = None
    created_at: datetime | None = None
    sent_at: datetime | None = None
    confirmed_at: datetime | None = None
    deleted: bool = False
    edit_count: int = 0


@dataclass(frozen=True, slots=True)
class ApiToken:
    """An API token's record; the token itself is never stored, only its hash."""

    id: str
    name: str
    tenants: tuple[str, ...]
    scopes: frozenset[Scope]
    created_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None

    def allows_tenant(self, tenant_id: str) -> bool:
        return ALL_TENANTS in self.tenants or tenant_id in self.tenants

    @property
    def all_tenants(self) -> bool:
        return ALL_TENANTS in self.tenants


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; ``next_token`` is empty on the last page."""

    items: list[T]
    next_token: str = ""
