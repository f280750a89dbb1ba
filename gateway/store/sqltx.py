"""The Tx protocol implemented once, in SQL both PostgreSQL and SQLite understand.

Statements use ``:name`` parameters; the PostgreSQL executor rewrites them to psycopg's
``%(name)s``. What genuinely differs between the backends lives in the :class:`Executor`
(driver calls, error translation, savepoints), the :class:`~gateway.store.rows.Codec`
(times, JSON) and ``lock_clause`` (row locking for claims; SQLite serializes writers
instead).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from gateway.domain.errors import AlreadyExists, NotFound
from gateway.domain.events import Event
from gateway.domain.inbound import IngestResult, QuarantinedDelivery, RoutedItem
from gateway.domain.models import (
    ApiToken,
    Connection,
    ConnectionStatus,
    Conversation,
    Credential,
    Message,
    OAuthState,
    Page,
    Participant,
)
from gateway.store import pagination, rows
from gateway.store.rows import Codec, Params, Row

if TYPE_CHECKING:
    from gateway.domain.outbound import DeliveryAttempt, SendBatch, SendTarget
    from gateway.domain.store import OutboxEntry
    from gateway.store.ingest import InboundWriter
    from gateway.store.outbound import OutboundWriter


class Executor(Protocol):
    """One database session inside a transaction. Implementations translate driver
    errors: a uniqueness conflict to AlreadyExists, a lost database to StoreUnavailable."""

    async def fetch(
        self, sql: str, params: Params | None = None, *, replan: bool = False
    ) -> list[Row]:
        """The rows a statement returns.

        ``replan`` plans the statement for this call, from the table as it is now. A prepared
        statement's generic plan is only made again when the table's statistics change:
        made while a table was nearly empty (a new install, a fresh database), it scans the
        whole table, and without autovacuum's ANALYZE it keeps doing so however large the
        table grows. For a statement that runs on every batch against a growing table, a
        plan per call costs less than that scan soon enough."""

    async def execute(self, sql: str, params: Params | None = None) -> int:
        """Runs a statement; returns the number of rows it touched."""

    async def executemany(self, sql: str, params: Sequence[Params]) -> None: ...
    def guard(self) -> AbstractAsyncContextManager[None]:
        """Scopes a statement that may fail so that the transaction stays usable."""


def in_list(name: str, values: Sequence[Any]) -> tuple[str, Params]:
    """``(:name0, :name1, ...)`` and its parameters: portable across both drivers."""
    params = {f"{name}{i}": v for i, v in enumerate(values)}
    return "(" + ", ".join(f":{key}" for key in params) + ")", params


T = TypeVar("T")


def answered(value: T) -> Callable[[], Awaitable[T]]:
    """A deferred answer that is known already: the form of a ``*_deferred`` method on a
    store that runs the statement at once."""

    async def ready() -> T:
        return value

    return ready


class Deferred(Protocol):
    async def rows(self) -> list[Row]:
        """The statement's rows, waiting for them if no later statement has yet."""


class NativeExecutor(Executor, Protocol):
    """PostgreSQL's executor: what only it offers, for the statements hot paths run."""

    async def fetch_deferred(self, sql: str, params: Params, *, replan: bool = False) -> Deferred:
        """Sends the statement without waiting for its rows (see PgExecutor)."""

    async def fetch_tuples(self, sql: str, params: Params) -> list[tuple[Any, ...]]:
        """The rows as tuples in the statement's column order."""

    async def execute_native(self, sql: str, params: Params) -> int: ...


def native(executor: Executor) -> NativeExecutor | None:
    """The executor as a :class:`NativeExecutor`, when it is one (PostgreSQL's)."""
    return cast(NativeExecutor, executor) if takes_arrays(executor) else None


def takes_arrays(executor: Executor) -> bool:
    """Whether the executor binds array parameters: PostgreSQL's (the only one with native
    statements) does, so a batch statement keeps one text whatever its number of rows, and
    psycopg parses and PostgreSQL prepares it once instead of once per distinct size."""
    return hasattr(executor, "execute_native")


def any_of(column: str, name: str, values: Sequence[Any], *, arrays: bool) -> tuple[str, Params]:
    """``column`` is one of ``values``. With ``arrays`` (PostgreSQL) it is ``= ANY(:name)``
    with one array parameter: one statement text whatever the count, which psycopg converts
    once and PostgreSQL prepares (unless fetched with ``replan``), where an IN-list's text
    changes with its length and is parsed and planned anew each time. Elsewhere an IN-list
    (:func:`in_list`)."""
    if arrays:
        return f"{column} = ANY(:{name})", {name: list(values)}
    sql, params = in_list(name, values)
    return f"{column} IN {sql}", params


def later(table: str, column: str) -> str:
    """The later of the stored and the proposed time (NULL counts as earliest)."""
    old, new = f"{table}.{column}", f"excluded.{column}"
    return (
        f"CASE WHEN {new} IS NULL OR ({old} IS NOT NULL AND {old} >= {new})"
        f" THEN {old} ELSE {new} END"
    )


def earlier_than(old: str, new: str) -> str:
    """``old`` is before ``new``, a NULL ``old`` being earliest: the condition under which
    an UPDATE moving ``old`` forward to ``new`` changes anything."""
    return f"({old} IS NULL OR {old} < {new})"


def keep_unless_empty(table: str, column: str) -> str:
    return f"CASE WHEN excluded.{column} <> '' THEN excluded.{column} ELSE {table}.{column} END"


def _insert(table: str, params: Params) -> str:
    columns = ", ".join(params)
    values = ", ".join(f":{key}" for key in params)
    return f"INSERT INTO {table} ({columns}) VALUES ({values})"  # noqa: S608 - names are ours


def _now() -> datetime:
    return datetime.now(UTC)


_LAPSED = "(claimed_until IS NULL OR claimed_until <= :now)"

_MESSAGE_MUTABLE = rows.MESSAGE_MUTABLE_COLUMNS


class SqlTx:
    """Implements :class:`gateway.domain.store.Tx` on one executor."""

    def __init__(self, executor: Executor, codec: Codec, *, lock_clause: str) -> None:
        self._ex = executor
        self._codec = codec
        self._lock = lock_clause
        # Where claims lock rows (PostgreSQL), a read that the transaction writes back locks
        # its row: a concurrent writer waits, then reads what this one wrote. (SQLite runs
        # one writing transaction at a time.)
        self._row_lock = " FOR UPDATE" if lock_clause else ""

    # ---- API tokens ----

    async def create_api_token(self, token: ApiToken, token_hash: str) -> None:
        params = rows.api_token_params(self._codec, token, token_hash, _now())
        async with self._ex.guard():
            await self._ex.execute(_insert("api_tokens", params), params)

    async def find_api_token(self, token_hash: str) -> ApiToken | None:
        found = await self._ex.fetch(
            "SELECT * FROM api_tokens WHERE token_hash = :h AND revoked_at IS NULL",
            {"h": token_hash},
        )
        return rows.api_token_from_row(self._codec, found[0]) if found else None

    async def list_api_tokens(self) -> list[ApiToken]:
        found = await self._ex.fetch("SELECT * FROM api_tokens ORDER BY created_at, id")
        return [rows.api_token_from_row(self._codec, r) for r in found]

    async def revoke_api_token(self, id_or_name: str, now: datetime) -> int:
        return await self._ex.execute(
            "UPDATE api_tokens SET revoked_at = :now"
            " WHERE (id = :key OR name = :key) AND revoked_at IS NULL",
            {"now": self._codec.ts(rows.utc(now)), "key": id_or_name},
        )

    async def touch_api_token(self, token_id: str, now: datetime) -> None:
        await self._ex.execute(
            "UPDATE api_tokens SET last_used_at = :now WHERE id = :id",
            {"now": self._codec.ts(rows.utc(now)), "id": token_id},
        )

    # ---- OAuth states ----

    async def put_oauth_state(self, state: OAuthState) -> None:
        params = rows.oauth_state_params(self._codec, state, _now())
        async with self._ex.guard():
            await self._ex.execute(_insert("oauth_states", params), params)

    async def take_oauth_state(self, state_hash: str, now: datetime) -> OAuthState | None:
        # Deleting first makes the state single-use even when two callbacks race.
        found = await self._ex.fetch(
            "DELETE FROM oauth_states WHERE state_hash = :h RETURNING *", {"h": state_hash}
        )
        if not found:
            return None
        state = rows.oauth_state_from_row(self._codec, found[0])
        return state if state.expires_at > rows.utc(now) else None

    async def purge_oauth_states(self, now: datetime) -> int:
        return await self._ex.execute(
            "DELETE FROM oauth_states WHERE expires_at <= :now",
            {"now": self._codec.ts(rows.utc(now))},
        )

    # ---- connections ----

    async def save_connection(self, conn: Connection) -> None:
        """Also fills ``conn.created_at`` (as stored) and ``conn.updated_at``."""
        now = _now()
        params = rows.connection_params(self._codec, conn, now)
        # last_event_at only moves forward: the caller's copy may predate a write of
        # advance_last_event_at that committed after it was read.
        updates = ", ".join(
            f"{k} = {later('connections', k) if k == 'last_event_at' else f'excluded.{k}'}"
            for k in params
            if k not in ("id", "created_at")
        )
        sql = (
            _insert("connections", params)
            + f" ON CONFLICT (id) DO UPDATE SET {updates} RETURNING created_at"
        )
        async with self._ex.guard():
            try:
                saved = await self._ex.fetch(sql, params)
            except AlreadyExists:
                raise AlreadyExists(
                    f"{conn.channel} account {conn.account.external_id} is already connected",
                    reason="ACCOUNT_ALREADY_CONNECTED",
                    metadata={"channel": conn.channel},
                ) from None
        conn.created_at = self._codec.ts_in(saved[0]["created_at"])
        conn.updated_at = now

    async def get_connection(
        self, connection_id: str, *, for_update: bool = False
    ) -> Connection | None:
        lock = self._row_lock if for_update else ""
        found = await self._ex.fetch(
            f"SELECT * FROM connections WHERE id = :id{lock}",  # noqa: S608
            {"id": connection_id},
        )
        return rows.connection_from_row(self._codec, found[0]) if found else None

    async def find_connection_by_account(self, channel: str, external_id: str) -> Connection | None:
        found = await self._ex.fetch(
            "SELECT * FROM connections WHERE channel = :channel"
            " AND account_external_id = :ext AND status <> 'DISCONNECTED'",
            {"channel": channel, "ext": external_id},
        )
        return rows.connection_from_row(self._codec, found[0]) if found else None

    async def find_connections_by_account_ids(
        self, channel: str, account_ids: Sequence[str]
    ) -> list[Connection]:
        if not account_ids:
            return []
        # Every batch of webhooks asks this, for however many accounts it names.
        ids = list(dict.fromkeys(account_ids))
        arrays = takes_arrays(self._ex)
        by_ig, params = any_of("account_external_id", "a", ids, arrays=arrays)
        by_page, _ = any_of("account_page_id", "a", ids, arrays=arrays)
        found = await self._ex.fetch(
            "SELECT * FROM connections WHERE channel = :channel AND status <> 'DISCONNECTED'"  # noqa: S608
            f" AND ({by_ig} OR {by_page}) ORDER BY created_at, id",
            {"channel": channel, **params},
        )
        return [rows.connection_from_row(self._codec, r) for r in found]

    async def list_connections(
        self,
        tenant_id: str,
        *,
        page_size: int,
        page_token: str = "",
        channel: str = "",
        statuses: Sequence[ConnectionStatus] = (),
    ) -> Page[Connection]:
        where = ["tenant_id = :tenant"]
        params: Params = {"tenant": tenant_id}
        if channel:
            where.append("channel = :channel")
            params["channel"] = channel
        if statuses:
            status_sql, status_params = in_list("s", [s.value for s in statuses])
            where.append(f"status IN {status_sql}")
            params.update(status_params)
        found = await self._page(
            "connections", "*", "connections", "created_at", where, params, page_size, page_token
        )
        items = [rows.connection_from_row(self._codec, r) for r in found]
        return self._paged("connections", items, page_size, lambda c: (c.created_at, c.id))

    async def advance_last_event_at(self, times: Mapping[str, datetime]) -> None:
        if not times:
            return
        # Sorted ids: concurrent flushes of other processes lock shared rows in one order.
        ids = sorted(times)
        stale = earlier_than("connections.last_event_at", "u.t")
        if takes_arrays(self._ex):
            await self._ex.execute(
                "UPDATE connections SET last_event_at = u.t"  # noqa: S608
                " FROM unnest(:ids::text[], :times::timestamptz[]) AS u(id, t)"
                f" WHERE connections.id = u.id AND {stale}",
                {"ids": ids, "times": [self._codec.ts(rows.utc(times[i])) for i in ids]},
            )
            return
        # SQLite has no arrays; executemany runs the one prepared statement per row.
        await self._ex.executemany(
            "UPDATE connections SET last_event_at = :t"  # noqa: S608
            f" WHERE id = :id AND {earlier_than('last_event_at', ':t')}",
            [{"id": i, "t": self._codec.ts(rows.utc(times[i]))} for i in ids],
        )

    async def count_connections_by_status(self) -> dict[tuple[str, ConnectionStatus], int]:
        found = await self._ex.fetch(
            "SELECT channel, status, COUNT(*) AS n FROM connections GROUP BY channel, status"
        )
        return {(r["channel"], ConnectionStatus(r["status"])): int(r["n"]) for r in found}

    async def claim_connections_due(
        self, *, due_before: datetime, now: datetime, lease_until: datetime, limit: int
    ) -> list[Connection]:
        found = await self._ex.fetch(
            "UPDATE connections SET claimed_until = :lease WHERE id IN ("  # noqa: S608
            " SELECT id FROM connections WHERE status = 'CONNECTED'"
            f" AND token_expires_at < :due AND {_LAPSED}"
            f" ORDER BY token_expires_at LIMIT :limit{self._lock}) RETURNING *",
            {
                "lease": self._codec.ts(rows.utc(lease_until)),
                "due": self._codec.ts(rows.utc(due_before)),
                "now": self._codec.ts(rows.utc(now)),
                "limit": limit,
            },
        )
        claimed = [rows.connection_from_row(self._codec, r) for r in found]
        return sorted(claimed, key=lambda c: (c.token_expires_at, c.id))

    # ---- credentials ----

    async def put_credential(self, credential: Credential) -> None:
        params = rows.credential_params(self._codec, credential, _now())
        await self._ex.execute(
            _insert("credentials", params)
            + " ON CONFLICT (connection_id) DO UPDATE SET key_id = excluded.key_id,"
            " ciphertext = excluded.ciphertext, created_at = excluded.created_at",
            params,
        )

    async def get_credential(self, connection_id: str) -> Credential | None:
        found = await self._ex.fetch(
            "SELECT * FROM credentials WHERE connection_id = :id", {"id": connection_id}
        )
        return rows.credential_from_row(self._codec, found[0]) if found else None

    async def delete_credential(self, connection_id: str) -> bool:
        deleted = await self._ex.execute(
            "DELETE FROM credentials WHERE connection_id = :id", {"id": connection_id}
        )
        return deleted > 0

    async def list_credentials(self, *, after_connection_id: str, limit: int) -> list[Credential]:
        found = await self._ex.fetch(
            "SELECT * FROM credentials WHERE connection_id > :after"  # noqa: S608
            f" ORDER BY connection_id LIMIT :limit{self._row_lock}",
            {"after": after_connection_id, "limit": limit},
        )
        return [rows.credential_from_row(self._codec, r) for r in found]

    # ---- participants and conversations ----

    async def upsert_participant(self, participant: Participant) -> Participant:
        params = rows.participant_params(self._codec, participant)
        keep = ", ".join(
            f"{col} = {keep_unless_empty('participants', col)}"
            for col in ("username", "name", "picture_url")
        )
        found = await self._ex.fetch(
            _insert("participants", params)
            + f" ON CONFLICT (connection_id, channel_user_id) DO UPDATE SET {keep},"
            f" profile_fetched_at = {later('participants', 'profile_fetched_at')}"
            " RETURNING *",
            params,
        )
        return rows.participant_from_row(self._codec, found[0])

    async def get_participant(self, participant_id: str) -> Participant | None:
        found = await self._ex.fetch(
            "SELECT * FROM participants WHERE id = :id", {"id": participant_id}
        )
        return rows.participant_from_row(self._codec, found[0]) if found else None

    async def upsert_conversation(self, conversation: Conversation) -> Conversation:
        params = rows.conversation_params(self._codec, conversation, _now())
        times = ", ".join(
            f"{col} = {later('conversations', col)}"
            for col in ("last_message_at", "last_inbound_at", "window_expires_at")
        )
        found = await self._ex.fetch(
            _insert("conversations", params)
            + f" ON CONFLICT (connection_id, participant_id) DO UPDATE SET {times} RETURNING id",
            params,
        )
        stored = await self.get_conversation(found[0]["id"])
        if stored is None:  # the row was written by this very transaction
            raise NotFound(f"conversation {found[0]['id']} vanished")
        return stored

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        found = await self._ex.fetch(
            f"SELECT {rows.CONVERSATION_COLUMNS} FROM {rows.CONVERSATION_FROM}"  # noqa: S608
            " WHERE c.id = :id",
            {"id": conversation_id},
        )
        return rows.conversation_from_row(self._codec, found[0]) if found else None

    async def list_conversations(
        self, tenant_id: str, *, connection_id: str = "", page_size: int, page_token: str = ""
    ) -> Page[Conversation]:
        where = ["c.tenant_id = :tenant"]
        params: Params = {"tenant": tenant_id}
        if connection_id:
            where.append("c.connection_id = :conn")
            params["conn"] = connection_id
        found = await self._page(
            "conversations",
            rows.CONVERSATION_COLUMNS,
            rows.CONVERSATION_FROM,
            "c.activity_at",
            where,
            params,
            page_size,
            page_token,
            id_column="c.id",
        )
        items = [rows.conversation_from_row(self._codec, r) for r in found]
        return self._paged(
            "conversations",
            items,
            page_size,
            lambda c: (c.last_message_at or c.created_at, c.id),
        )

    # ---- messages ----

    async def insert_message(self, message: Message) -> tuple[Message, bool]:
        params = rows.message_params(self._codec, message, _now())
        inserted = await self._ex.fetch(
            _insert("messages", params) + " ON CONFLICT DO NOTHING RETURNING id", params
        )
        if inserted:
            created_at = self._codec.ts_in(params["created_at"])
            return dataclasses.replace(message, created_at=created_at), True
        existing = await self._existing_message(message)
        if existing is None:
            raise AlreadyExists(f"message {message.id} already exists")
        return existing, False

    async def _existing_message(self, message: Message) -> Message | None:
        if message.external_id:
            found = await self.find_message_by_external_id(
                message.connection_id, message.external_id
            )
            if found is not None:
                return found
        if message.idempotency_key:
            rows_found = await self._ex.fetch(
                "SELECT * FROM messages WHERE tenant_id = :tenant AND idempotency_key = :key",
                {"tenant": message.tenant_id, "key": message.idempotency_key},
            )
            if rows_found:
                return rows.message_from_row(self._codec, rows_found[0])
        return await self.get_message(message.id)

    async def update_message(self, message: Message) -> None:
        """Writes the fields that change over a message's life; leaves any claim lease
        alone, so a worker still holding the message keeps it."""
        params = rows.message_params(self._codec, message, _now())
        sets = ", ".join(f"{col} = :{col}" for col in _MESSAGE_MUTABLE)
        updated = await self._ex.execute(
            f"UPDATE messages SET {sets} WHERE id = :id",  # noqa: S608
            {col: params[col] for col in (*_MESSAGE_MUTABLE, "id")},
        )
        if not updated:
            raise NotFound(f"message {message.id} not found")

    async def get_message(self, message_id: str) -> Message | None:
        found = await self._ex.fetch("SELECT * FROM messages WHERE id = :id", {"id": message_id})
        return rows.message_from_row(self._codec, found[0]) if found else None

    async def find_message_by_external_id(
        self, connection_id: str, external_id: str
    ) -> Message | None:
        if not external_id:
            return None
        found = await self._ex.fetch(
            "SELECT * FROM messages WHERE connection_id = :conn AND external_id = :ext",
            {"conn": connection_id, "ext": external_id},
        )
        return rows.message_from_row(self._codec, found[0]) if found else None

    async def list_messages(
        self, conversation_id: str, *, page_size: int, page_token: str = ""
    ) -> Page[Message]:
        found = await self._page(
            "messages",
            "*",
            "messages",
            "created_at",
            ["conversation_id = :conv"],
            {"conv": conversation_id},
            page_size,
            page_token,
        )
        items = [rows.message_from_row(self._codec, r) for r in found]
        return self._paged("messages", items, page_size, lambda m: (m.created_at, m.id))

    # ---- inbound: webhook ingestion (gateway.store.ingest) ----

    def _inbound(self) -> InboundWriter:
        # Imported here: gateway.store.ingest builds on this module's helpers.
        from gateway.store.ingest import InboundWriter

        return InboundWriter(self._ex, self._codec)

    async def ingest_inbound(self, items: Sequence[RoutedItem]) -> list[IngestResult]:
        return await self._inbound().ingest(items)

    async def quarantine(self, entries: Sequence[QuarantinedDelivery], *, keep: int) -> None:
        await self._inbound().quarantine(entries, keep=keep)

    async def list_quarantine(
        self, *, channel: str = "", limit: int = 100
    ) -> list[QuarantinedDelivery]:
        return await self._inbound().list_quarantine(channel=channel, limit=limit)

    async def add_claimed_events(
        self, events: Sequence[Event], lease_until: datetime
    ) -> list[OutboxEntry]:
        return await self._inbound().add_claimed_events(events, lease_until)

    async def add_claimed_events_deferred(
        self, events: Sequence[Event], lease_until: datetime
    ) -> Callable[[], Awaitable[list[OutboxEntry]]]:
        return await self._inbound().add_claimed_events_deferred(events, lease_until)

    # ---- end of inbound ----

    # ---- outbound: sending (gateway.store.outbound) ----

    def _outbound(self) -> OutboundWriter:
        # Imported here: gateway.store.outbound builds on this module's Executor.
        from gateway.store.outbound import OutboundWriter

        return OutboundWriter(self._ex, self._codec)

    async def find_conversation_for_recipient(
        self, connection_id: str, channel_user_id: str
    ) -> Conversation | None:
        return await self._outbound().find_conversation_for_recipient(
            connection_id, channel_user_id
        )

    async def find_message_by_idempotency_key(self, tenant_id: str, key: str) -> Message | None:
        return await self._outbound().find_message_by_idempotency_key(tenant_id, key)

    async def enqueue_outbound(
        self, message: Message, lease_until: datetime
    ) -> tuple[Message, bool]:
        return await self._outbound().enqueue(message, lease_until, _now())

    async def record_outbound(
        self, message: Message, attempt: DeliveryAttempt | None, *, lease_until: datetime | None
    ) -> Message:
        return await self._outbound().record(message, attempt, lease_until=lease_until)

    async def get_connections(self, ids: Sequence[str]) -> dict[str, Connection]:
        return await self._outbound().get_connections(ids)

    async def find_messages_by_idempotency_keys(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Message]:
        return await self._outbound().find_messages_by_idempotency_keys(pairs)

    async def list_attempts(self, message_id: str) -> list[DeliveryAttempt]:
        return await self._outbound().list_attempts(message_id)

    async def count_send_queue(self) -> int:
        return await self._outbound().count_queue()

    async def find_unadopted_echo(
        self, message: Message, since: datetime
    ) -> tuple[str, datetime] | None:
        return await self._outbound().find_unadopted_echo(message, since)

    async def confirm_outbound(self, echoes: Sequence[tuple[str, str, datetime]]) -> list[Message]:
        return await self._outbound().confirm(echoes)

    # Send order within a conversation: the forms SendMessage and the worker use.

    async def get_send_targets(self, ids: Sequence[str]) -> dict[str, SendTarget]:
        return await self._outbound().get_send_targets(ids)

    async def find_send_targets_for_recipients(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], SendTarget]:
        return await self._outbound().find_send_targets_for_recipients(pairs)

    async def find_send_batch(
        self,
        conversation_ids: Sequence[str],
        connection_ids: Sequence[str],
        pairs: Sequence[tuple[str, str]],
    ) -> SendBatch:
        return await self._outbound().find_send_batch(conversation_ids, connection_ids, pairs)

    async def enqueue_outbound_in_order(
        self, messages: Sequence[Message], lease_until: datetime, *, behind: Sequence[str]
    ) -> list[tuple[Message, bool]]:
        return await self._outbound().enqueue_many(
            messages, lease_until, _now(), behind=frozenset(behind)
        )

    async def record_outbound_and_peek(
        self,
        items: Sequence[tuple[Message, DeliveryAttempt | None]],
        *,
        lease_until: datetime | None,
    ) -> tuple[list[Message], bool]:
        return await self._outbound().record_and_peek(items, lease_until=lease_until)

    async def record_outbound_deferred(
        self,
        items: Sequence[tuple[Message, DeliveryAttempt | None]],
        *,
        lease_until: datetime | None,
    ) -> Callable[[], Awaitable[tuple[list[Message], bool]]]:
        return await self._outbound().record_and_peek_deferred(items, lease_until=lease_until)

    async def claim_next_messages(
        self, *, now: datetime, lease_until: datetime, limit: int
    ) -> list[Message]:
        return await self._outbound().claim_next(
            now=now, lease_until=lease_until, limit=limit, lock=self._lock
        )

    # ---- end of outbound ----

    # ---- outbox ----

    async def add_events(self, events: Sequence[Event]) -> None:
        if not events:
            return
        now = _now()
        batch = [rows.event_params(self._codec, e, now) for e in events]
        # A re-added event (same event_id) is the same event: keep the first.
        await self._ex.executemany(
            _insert("outbox", batch[0]) + " ON CONFLICT (event_id) DO NOTHING", batch
        )

    # ---- keyset pagination ----

    async def _page(
        self,
        kind: str,
        columns: str,
        source: str,
        sort_column: str,
        where: list[str],
        params: Params,
        page_size: int,
        page_token: str,
        *,
        id_column: str = "id",
    ) -> list[Row]:
        """Newest first by (sort_column, id); one extra row tells whether a next page exists."""
        if page_token:
            sort_key, after_id = pagination.decode_token(kind, page_token)
            where = [*where, f"({sort_column}, {id_column}) < (:k_sort, :k_id)"]
            params = {**params, "k_sort": self._codec.ts(sort_key), "k_id": after_id}
        return await self._ex.fetch(
            f"SELECT {columns} FROM {source} WHERE {' AND '.join(where)}"  # noqa: S608
            f" ORDER BY {sort_column} DESC, {id_column} DESC LIMIT :limit",
            {**params, "limit": page_size + 1},
        )

    @staticmethod
    def _paged(
        kind: str, items: list[T], page_size: int, key: Callable[[T], tuple[Any, str]]
    ) -> Page[T]:
        if len(items) <= page_size:
            return Page(items=items)
        items = items[:page_size]
        sort_key, last_id = key(items[-1])
        return Page(items=items, next_token=pagination.encode_token(kind, sort_key, last_id))

    # ---- connect: refresh scheduling and reconciliation ----

    async def set_connection_claim(self, connection_id: str, until: datetime | None) -> None:
        await self._ex.execute(
            "UPDATE connections SET claimed_until = :until WHERE id = :id",
            {
                "until": None if until is None else self._codec.ts(rows.utc(until)),
                "id": connection_id,
            },
        )

    async def scan_connections(
        self, *, statuses: Sequence[ConnectionStatus], after_id: str, limit: int
    ) -> list[Connection]:
        if not statuses:
            return []
        status_sql, params = in_list("s", [s.value for s in statuses])
        found = await self._ex.fetch(
            f"SELECT * FROM connections WHERE status IN {status_sql}"  # noqa: S608
            " AND id > :after ORDER BY id LIMIT :limit",
            {**params, "after": after_id, "limit": limit},
        )
        return [rows.connection_from_row(self._codec, r) for r in found]

    async def nearest_token_expiry(self) -> datetime | None:
        found = await self._ex.fetch(
            "SELECT token_expires_at FROM connections WHERE status = 'CONNECTED'"
            " AND token_expires_at IS NOT NULL ORDER BY token_expires_at LIMIT 1"
        )
        return self._codec.ts_in(found[0]["token_expires_at"]) if found else None
