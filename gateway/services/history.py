"""Read-side queries: connections, conversations and messages, paginated."""

from __future__ import annotations

from gateway.domain.errors import InvalidArgument, NotFound
from gateway.domain.models import (
    Connection,
    ConnectionStatus,
    Conversation,
    Message,
    Page,
    Participant,
)
from gateway.domain.store import Store

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument("page_size", "must not be negative")
    if value > MAX_PAGE_SIZE:
        raise InvalidArgument("page_size", f"must be at most {MAX_PAGE_SIZE}")
    return value or DEFAULT_PAGE_SIZE


def require_id(field: str, value: str) -> str:
    if not value.strip():
        raise InvalidArgument(field, "must not be empty")
    return value.strip()


class History:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def get_connection(self, connection_id: str) -> Connection:
        async with self._store.transaction() as tx:
            conn = await tx.get_connection(require_id("connection_id", connection_id))
        if conn is None:
            raise NotFound(
                f"no connection {connection_id!r}", metadata={"connection_id": connection_id}
            )
        return conn

    async def list_connections(
        self,
        tenant_id: str,
        *,
        size: int,
        token: str,
        channel: str = "",
        statuses: tuple[ConnectionStatus, ...] = (),
    ) -> Page[Connection]:
        async with self._store.transaction() as tx:
            return await tx.list_connections(
                require_id("tenant_id", tenant_id),
                page_size=page_size(size),
                page_token=token,
                channel=channel,
                statuses=statuses,
            )

    async def get_conversation(self, conversation_id: str) -> Conversation:
        async with self._store.transaction() as tx:
            conv = await tx.get_conversation(require_id("conversation_id", conversation_id))
        if conv is None:
            raise NotFound(
                f"no conversation {conversation_id!r}",
                metadata={"conversation_id": conversation_id},
            )
        return conv

    async def list_conversations(
        self, tenant_id: str, *, connection_id: str, size: int, token: str
    ) -> Page[Conversation]:
        async with self._store.transaction() as tx:
            return await tx.list_conversations(
                require_id("tenant_id", tenant_id),
                connection_id=connection_id,
                page_size=page_size(size),
                page_token=token,
            )

    async def get_message(self, message_id: str) -> Message:
        async with self._store.transaction() as tx:
            message = await tx.get_message(require_id("message_id", message_id))
        if message is None:
            raise NotFound(f"no message {message_id!r}", metadata={"message_id": message_id})
        return message

    async def list_messages(
        self, conversation_id: str, *, size: int, token: str
    ) -> tuple[Conversation, Page[Message]]:
        conversation = await self.get_conversation(conversation_id)
        async with self._store.transaction() as tx:
            page = await tx.list_messages(
                conversation.id, page_size=page_size(size), page_token=token
            )
        return conversation, page

    async def participant_of(self, conversation: Conversation) -> Participant:
        return conversation.participant
