"""The outbound side of the store (``Tx`` methods of gateway.services.outbound), in SQL both
backends understand.

An outbound message is inserted already leased to the process that will make its first
attempt, so the retry worker never claims it while that attempt runs; recording an
attempt's outcome releases the lease. An echo webhook may overtake the Send API's answer
and be stored first as a message of its own: recording the answer folds it into ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from gateway.domain.models import Connection, Conversation, DeliveryError, Message
from gateway.domain.outbound import DeliveryAttempt
from gateway.store import bulk, rows
from gateway.store.rows import Codec, Params
from gateway.store.sqltx import Executor, in_list

_SENT_FIELDS = (
    "status",
    "external_id",
    "error",
    "attempts",
    "next_attempt_at",
    "sent_at",
    "confirmed_at",
)


# SQLite's form of an outcome batch; PostgreSQL sends one array UPDATE (bulk.update_by_key).
_OUTCOME_UPDATE = (
    "UPDATE messages SET "  # noqa: S608 - the column names are ours
    + ", ".join(f"{col} = :{col}" for col in _SENT_FIELDS)
    + ", claimed_until = :claimed_until WHERE id = :id"
)


def _error_json(e: DeliveryError) -> dict[str, Any]:
    return {
        "reason": e.reason,
        "message": e.message,
        "channel_code": e.channel_code,
        "channel_subcode": e.channel_subcode,
        "retryable": e.retryable,
    }


class OutboundWriter:
    def __init__(self, executor: Executor, codec: Codec) -> None:
        self._ex = executor
        self._codec = codec
        # PostgreSQL's executor takes arrays (one statement per batch); SQLite's does not.
        self._arrays = hasattr(executor, "execute_native")

    async def find_conversation_for_recipient(
        self, connection_id: str, channel_user_id: str
    ) -> Conversation | None:
        found = await self._ex.fetch(
            f"SELECT {rows.CONVERSATION_COLUMNS} FROM {rows.CONVERSATION_FROM}"  # noqa: S608
            " WHERE c.connection_id = :conn AND p.channel_user_id = :user",
            {"conn": connection_id, "user": channel_user_id},
        )
        return rows.conversation_from_row(self._codec, found[0]) if found else None

    async def find_message_by_idempotency_key(self, tenant_id: str, key: str) -> Message | None:
        if not key:
            return None
        found = await self._ex.fetch(
            "SELECT * FROM messages WHERE tenant_id = :tenant AND idempotency_key = :key",
            {"tenant": tenant_id, "key": key},
        )
        return rows.message_from_row(self._codec, found[0]) if found else None

    async def enqueue(
        self, message: Message, lease_until: datetime, now: datetime
    ) -> tuple[Message, bool]:
        params = rows.message_params(self._codec, message, now)
        params["claimed_until"] = self._codec.ts(rows.utc(lease_until))
        columns = ", ".join(params)
        values = ", ".join(f":{k}" for k in params)
        inserted = await self._ex.fetch(
            f"INSERT INTO messages ({columns}) VALUES ({values})"  # noqa: S608
            " ON CONFLICT DO NOTHING RETURNING id",
            params,
        )
        if inserted:
            return message, True
        # Only the idempotency key can conflict: the id is new and there is no external id.
        existing = await self.find_message_by_idempotency_key(
            message.tenant_id, message.idempotency_key
        )
        if existing is None:
            raise RuntimeError(f"message {message.id} conflicts with a row that vanished")
        return existing, False

    async def record(
        self, message: Message, attempt: DeliveryAttempt | None, *, lease_until: datetime | None
    ) -> Message:
        """Writes the outcome; sets ``message.confirmed_at`` when an echo came first."""
        await self.record_many([(message, attempt)], lease_until=lease_until)
        return message

    # ---- batches: the group commits of concurrent SendMessage calls and outcomes ----
    #
    # A statement costs a round trip (a hop to aiosqlite's thread, or to PostgreSQL)
    # whatever the number of rows it carries, so each of these is a constant number of
    # statements per batch. Lookups by several columns fetch by IN-lists per column and
    # keep the exact pairs here: portable, and served by the same indexes.

    async def get_connections(self, ids: Sequence[str]) -> dict[str, Connection]:
        if not ids:
            return {}
        ids_sql, params = in_list("c", list(dict.fromkeys(ids)))
        found = await self._ex.fetch(
            f"SELECT * FROM connections WHERE id IN {ids_sql}",  # noqa: S608
            params,
        )
        return {r["id"]: rows.connection_from_row(self._codec, r) for r in found}

    async def get_conversations(self, ids: Sequence[str]) -> dict[str, Conversation]:
        if not ids:
            return {}
        ids_sql, params = in_list("v", list(dict.fromkeys(ids)))
        found = await self._ex.fetch(
            f"SELECT {rows.CONVERSATION_COLUMNS} FROM {rows.CONVERSATION_FROM}"  # noqa: S608
            f" WHERE c.id IN {ids_sql}",
            params,
        )
        return {r["id"]: rows.conversation_from_row(self._codec, r) for r in found}

    async def find_conversations_for_recipients(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Conversation]:
        """(connection_id, channel_user_id) -> the conversation, for the pairs that have one."""
        if not pairs:
            return {}
        wanted = set(pairs)
        conn_sql, params = in_list("c", list(dict.fromkeys(c for c, _ in pairs)))
        user_sql, user_params = in_list("u", list(dict.fromkeys(u for _, u in pairs)))
        found = await self._ex.fetch(
            f"SELECT {rows.CONVERSATION_COLUMNS} FROM {rows.CONVERSATION_FROM}"  # noqa: S608
            f" WHERE c.connection_id IN {conn_sql} AND p.channel_user_id IN {user_sql}",
            {**params, **user_params},
        )
        out: dict[tuple[str, str], Conversation] = {}
        for r in found:
            key = (r["connection_id"], r["p_channel_user_id"])
            if key in wanted:
                out[key] = rows.conversation_from_row(self._codec, r)
        return out

    async def find_messages_by_idempotency_keys(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Message]:
        """(tenant_id, idempotency_key) -> the message that holds it."""
        pairs = [(t, k) for t, k in pairs if k]
        if not pairs:
            return {}
        wanted = set(pairs)
        tenant_sql, params = in_list("t", list(dict.fromkeys(t for t, _ in pairs)))
        key_sql, key_params = in_list("k", list(dict.fromkeys(k for _, k in pairs)))
        found = await self._ex.fetch(
            f"SELECT * FROM messages WHERE tenant_id IN {tenant_sql}"  # noqa: S608
            f" AND idempotency_key IN {key_sql} AND idempotency_key <> ''",
            {**params, **key_params},
        )
        out: dict[tuple[str, str], Message] = {}
        for r in found:
            key = (r["tenant_id"], r["idempotency_key"])
            if key in wanted:
                out[key] = rows.message_from_row(self._codec, r)
        return out

    async def enqueue_many(
        self, messages: Sequence[Message], lease_until: datetime, now: datetime
    ) -> list[tuple[Message, bool]]:
        """Like :meth:`enqueue` for each message, in order: a later message of the batch
        with an idempotency key an earlier one took gets the earlier one, not inserted."""
        if not messages:
            return []
        lease = self._codec.ts(rows.utc(lease_until))
        batch: list[Params] = []
        for message in messages:
            params = rows.message_params(self._codec, message, now)
            params["claimed_until"] = lease
            batch.append(params)
        # In batch order: of two rows with one idempotency key the first is inserted.
        await self._ex.execute(
            *bulk.insert("messages", batch, "ON CONFLICT DO NOTHING", arrays=self._arrays)
        )
        # The unique (tenant, key) index decided every race, within the batch or with
        # another replica; whoever holds the key now is the message. Without a key only
        # the (fresh, random) id could conflict.
        holders = await self.find_messages_by_idempotency_keys(
            [(m.tenant_id, m.idempotency_key) for m in messages if m.idempotency_key]
        )
        out: list[tuple[Message, bool]] = []
        for message in messages:
            if not message.idempotency_key:
                out.append((message, True))
                continue
            holder = holders.get((message.tenant_id, message.idempotency_key))
            if holder is None:
                raise RuntimeError(f"message {message.id} conflicts with a row that vanished")
            out.append((message, True) if holder.id == message.id else (holder, False))
        return out

    async def record_many(
        self,
        items: Sequence[tuple[Message, DeliveryAttempt | None]],
        *,
        lease_until: datetime | None,
    ) -> list[Message]:
        """Like :meth:`record` for each (message, attempt), in three statements."""
        if not items:
            return []
        sent = [m for m, _ in items if m.external_id]
        if sent:
            # Echoes go first: our row takes their external id under a unique index.
            where: list[str] = []
            params: Params = {}
            for i, m in enumerate(sent):
                where.append(f"(connection_id = :c{i} AND external_id = :e{i} AND id <> :i{i})")
                params.update({f"c{i}": m.connection_id, f"e{i}": m.external_id, f"i{i}": m.id})
            echoed = await self._ex.fetch(
                "DELETE FROM messages WHERE direction = 'OUTBOUND' AND sent_at IS NULL"  # noqa: S608
                f" AND external_id <> '' AND ({' OR '.join(where)})"
                " RETURNING connection_id, external_id, created_at",
                params,
            )
            firsts = {(r["connection_id"], r["external_id"]): r["created_at"] for r in echoed}
            for m in sent:
                at = firsts.get((m.connection_id, m.external_id))
                if at is not None and m.confirmed_at is None:
                    m.confirmed_at = self._codec.ts_in(at)
        codec = self._codec
        lease = rows.opt_ts(codec, lease_until)
        updates: list[Params] = []
        attempts: list[Params] = []
        for m, attempt in items:
            # Only what an outcome changes: message_params would re-encode the content.
            updates.append(
                {
                    "status": m.status.value,
                    "external_id": m.external_id,
                    "error": None if m.error is None else codec.json(_error_json(m.error)),
                    "attempts": m.attempts,
                    "next_attempt_at": rows.opt_ts(codec, m.next_attempt_at),
                    "sent_at": rows.opt_ts(codec, m.sent_at),
                    "confirmed_at": rows.opt_ts(codec, m.confirmed_at),
                    "claimed_until": lease,
                    "id": m.id,
                }
            )
            if attempt is not None:
                attempts.append(self._attempt_params(m.id, attempt))
        if self._arrays:
            await self._ex.execute(*bulk.update_by_key("messages", "id", updates))
        else:
            await self._ex.executemany(_OUTCOME_UPDATE, updates)
        if attempts:
            await self._ex.execute(
                *bulk.insert(
                    "message_attempts",
                    attempts,
                    "ON CONFLICT (message_id, number) DO NOTHING",
                    arrays=self._arrays,
                )
            )
        return [m for m, _ in items]

    def _attempt_params(self, message_id: str, attempt: DeliveryAttempt) -> Params:
        return {
            "message_id": message_id,
            "number": attempt.number,
            "started_at": self._codec.ts(rows.utc(attempt.started_at)),
            "finished_at": self._codec.ts(rows.utc(attempt.finished_at)),
            "error": None
            if attempt.error is None
            else self._codec.json(_error_json(attempt.error)),
        }

    async def list_attempts(self, message_id: str) -> list[DeliveryAttempt]:
        found = await self._ex.fetch(
            "SELECT * FROM message_attempts WHERE message_id = :id ORDER BY number",
            {"id": message_id},
        )
        return [
            DeliveryAttempt(
                number=int(r["number"]),
                started_at=self._codec.ts_in(r["started_at"]),
                finished_at=self._codec.ts_in(r["finished_at"]),
                error=None
                if r["error"] is None
                else DeliveryError(**self._codec.json_in(r["error"])),
            )
            for r in found
        ]

    async def count_queue(self) -> int:
        found = await self._ex.fetch(
            "SELECT COUNT(*) AS n FROM messages WHERE direction = 'OUTBOUND'"
            " AND status IN ('QUEUED', 'RETRYING')"
        )
        return int(found[0]["n"])

    async def confirm(self, echoes: Sequence[tuple[str, str, datetime]]) -> list[Message]:
        """Marks our sent messages that these (connection, external id, time) echoes name
        as confirmed; returns those it changed (a repeated echo changes nothing)."""
        confirmed: list[Message] = []
        for connection_id, external_id, at in sorted(echoes):
            found = await self._ex.fetch(
                "UPDATE messages SET confirmed_at = :at WHERE connection_id = :conn"
                " AND external_id = :ext AND direction = 'OUTBOUND'"
                " AND sent_at IS NOT NULL AND confirmed_at IS NULL RETURNING *",
                {"at": self._codec.ts(rows.utc(at)), "conn": connection_id, "ext": external_id},
            )
            confirmed.extend(rows.message_from_row(self._codec, r) for r in found)
        return confirmed
