"""The outbound side of the store (``Tx`` methods of gateway.services.outbound), in SQL both
backends understand.

An outbound message is inserted already leased to the process that will make its first
attempt, so the retry worker never claims it while that attempt runs; recording an
attempt's outcome releases the lease. An echo webhook may overtake the Send API's answer
and be stored first as a message of its own: recording the answer folds it into ours.

Send order: a message that keeps order (all but sender actions, stored ``unordered``) is
not claimed while an earlier one of its conversation (by created_at, then id) is pending,
QUEUED or RETRYING. One queued behind another is inserted without a lease, for the worker.
The partial index ``messages_send_order`` (0005) serves every such question; the SQL
below repeats its predicate word for word so that SQLite's planner matches it too.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from datetime import datetime
from typing import Any

from gateway.domain.models import Connection, Conversation, DeliveryError, Message, MessageStatus
from gateway.domain.outbound import ContentKind, DeliveryAttempt, SendTarget
from gateway.store import bulk, rows
from gateway.store.rows import Codec, Params
from gateway.store.sqltx import Executor, any_of, in_list, takes_arrays

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


_SETTLED = (MessageStatus.SENT, MessageStatus.FAILED)


def _pending(alias: str) -> str:
    """``alias`` keeps send order and is still to be sent: the predicate of
    messages_send_order, as its partial index must be matched."""
    return (
        f"{alias}.direction = 'OUTBOUND' AND {alias}.status IN ('QUEUED', 'RETRYING')"
        f" AND NOT {alias}.unordered"
    )


# The created_at of the conversation's latest pending message: an index probe per row.
_PENDING_AT = (
    "(SELECT m.created_at FROM messages m WHERE m.conversation_id = c.id"  # noqa: S608
    f" AND {_pending('m')} ORDER BY m.created_at DESC, m.id DESC LIMIT 1) AS send_pending_at"
)

# Per settled row of an outcome UPDATE (PostgreSQL): does another message of its
# conversation still wait? The subquery sees the rows as they were before the statement,
# the settled row itself included, hence ``w.id <> messages.id``.
_WAITING = (
    " RETURNING CASE WHEN messages.status IN ('SENT', 'FAILED') AND NOT messages.unordered"  # noqa: S608
    " THEN EXISTS (SELECT 1 FROM messages w"
    " WHERE w.conversation_id = messages.conversation_id"
    f" AND {_pending('w')} AND w.id <> messages.id) ELSE false END AS waiting"
)


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _unordered(message: Message) -> bool:
    outbound = message.content.get("outbound")
    return isinstance(outbound, dict) and outbound.get("kind") == ContentKind.SENDER_ACTION


def _error_json(e: DeliveryError) -> dict[str, Any]:
    return {
        "reason": e.reason,
        "message": e.message,
        "channel_code": e.channel_code,
        "channel_subcode": e.channel_subcode,
        "retryable": e.retryable,
    }


class OutboundWriter:
    """The outbound statements. Those that find rows by key in tables growing without bound
    (messages, participants, conversations) on every send are replanned at each call: a
    plan cached while the table was small would scan it (see ``Executor.fetch``)."""

    def __init__(self, executor: Executor, codec: Codec) -> None:
        self._ex = executor
        self._codec = codec
        self._arrays = takes_arrays(executor)

    async def find_conversation_for_recipient(
        self, connection_id: str, channel_user_id: str
    ) -> Conversation | None:
        found = await self._ex.fetch(
            f"SELECT {rows.CONVERSATION_COLUMNS} FROM {rows.CONVERSATION_FROM}"  # noqa: S608
            " WHERE c.connection_id = :conn AND p.channel_user_id = :user",
            {"conn": connection_id, "user": channel_user_id},
            replan=True,
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
    # statements per batch. Lookups by several columns match each column against its list
    # of values (any_of) and keep the exact pairs here: portable, and served by the same
    # indexes.

    async def get_connections(self, ids: Sequence[str]) -> dict[str, Connection]:
        if not ids:
            return {}
        where, params = any_of("id", "c", _unique(ids), arrays=self._arrays)
        found = await self._ex.fetch(f"SELECT * FROM connections WHERE {where}", params)  # noqa: S608
        return {r["id"]: rows.connection_from_row(self._codec, r) for r in found}

    async def get_send_targets(self, ids: Sequence[str]) -> dict[str, SendTarget]:
        """Conversations by id, with their latest pending ordered message's time."""
        if not ids:
            return {}
        where, params = any_of("c.id", "v", _unique(ids), arrays=self._arrays)
        found = await self._ex.fetch(
            f"SELECT {rows.CONVERSATION_COLUMNS}, {_PENDING_AT} FROM {rows.CONVERSATION_FROM}"  # noqa: S608
            f" WHERE {where}",
            params,
            replan=True,
        )
        return {r["id"]: self._target(r) for r in found}

    async def find_send_targets_for_recipients(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], SendTarget]:
        """(connection_id, channel_user_id) -> the conversation, for the pairs that have one,
        each with its latest pending ordered message's time."""
        if not pairs:
            return {}
        wanted = set(pairs)
        arrays = self._arrays
        conns, params = any_of("p.connection_id", "c", _unique(c for c, _ in pairs), arrays=arrays)
        users, user_params = any_of(
            "p.channel_user_id", "u", _unique(u for _, u in pairs), arrays=arrays
        )
        found = await self._ex.fetch(
            f"SELECT {rows.CONVERSATION_COLUMNS}, {_PENDING_AT} FROM {rows.CONVERSATION_FROM}"  # noqa: S608
            f" WHERE {conns} AND {users}",
            {**params, **user_params},
            replan=True,
        )
        out: dict[tuple[str, str], SendTarget] = {}
        for r in found:
            key = (r["connection_id"], r["p_channel_user_id"])
            if key in wanted:
                out[key] = self._target(r)
        return out

    def _target(self, row: rows.Row) -> SendTarget:
        at = row.get("send_pending_at")
        return SendTarget(
            rows.conversation_from_row(self._codec, row),
            None if at is None else self._codec.ts_in(at),
        )

    async def find_messages_by_idempotency_keys(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Message]:
        """(tenant_id, idempotency_key) -> the message that holds it."""
        pairs = [(t, k) for t, k in pairs if k]
        if not pairs:
            return {}
        wanted = set(pairs)
        tenants, params = any_of(
            "tenant_id", "t", _unique(t for t, _ in pairs), arrays=self._arrays
        )
        keys, key_params = any_of(
            "idempotency_key", "k", _unique(k for _, k in pairs), arrays=self._arrays
        )
        found = await self._ex.fetch(
            f"SELECT * FROM messages WHERE {tenants} AND {keys} AND idempotency_key <> ''",  # noqa: S608
            {**params, **key_params},
            replan=True,
        )
        out: dict[tuple[str, str], Message] = {}
        for r in found:
            key = (r["tenant_id"], r["idempotency_key"])
            if key in wanted:
                out[key] = rows.message_from_row(self._codec, r)
        return out

    async def enqueue_many(
        self,
        messages: Sequence[Message],
        lease_until: datetime,
        now: datetime,
        *,
        behind: Collection[str] = (),
    ) -> list[tuple[Message, bool]]:
        """Like :meth:`enqueue` for each message, in order: a later message of the batch
        with an idempotency key an earlier one took gets the earlier one, not inserted.
        Messages whose id is in ``behind`` wait for an earlier one of their conversation:
        no lease, so that the worker takes them when their turn comes."""
        if not messages:
            return []
        lease = self._codec.ts(rows.utc(lease_until))
        batch: list[Params] = []
        for message in messages:
            params = rows.message_params(self._codec, message, now)
            params["claimed_until"] = None if message.id in behind else lease
            params["unordered"] = _unordered(message)
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
        stored, _ = await self.record_and_peek(items, lease_until=lease_until)
        return stored

    async def record_and_peek(
        self,
        items: Sequence[tuple[Message, DeliveryAttempt | None]],
        *,
        lease_until: datetime | None,
    ) -> tuple[list[Message], bool]:
        """:meth:`record_many`, and whether a message that settled (SENT or FAILED) has
        another of its conversation waiting behind it. On PostgreSQL the outcome UPDATE
        answers that itself; SQLite asks once more, only when an ordered message settled."""
        if not items:
            return [], False
        sent = [m for m, _ in items if m.external_id]
        if sent:
            # Echoes go first: our row takes their external id under a unique index.
            echoed = await self._ex.fetch(*self._echoes_of(sent), replan=True)
            firsts = {(r["connection_id"], r["external_id"]): r["created_at"] for r in echoed}
            for m in sent:
                at = firsts.get((m.connection_id, m.external_id))
                if at is not None and m.confirmed_at is None:
                    echoed_at = self._codec.ts_in(at)
                    sent_at = m.sent_at or echoed_at
                    m.confirmed_at = max(echoed_at, sent_at)
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
            sql, update_params = bulk.update_by_key("messages", "id", updates)
            answers = await self._ex.fetch(sql + _WAITING, update_params, replan=True)
            waiting = any(r["waiting"] for r in answers)
        else:
            await self._ex.executemany(_OUTCOME_UPDATE, updates)
            waiting = await self._waiting_behind(
                [m for m, _ in items if m.status in _SETTLED and not _unordered(m)]
            )
        if attempts:
            await self._ex.execute(
                *bulk.insert(
                    "message_attempts",
                    attempts,
                    "ON CONFLICT (message_id, number) DO NOTHING",
                    arrays=self._arrays,
                )
            )
        return [m for m, _ in items], waiting

    def _echoes_of(self, sent: Sequence[Message]) -> tuple[str, Params]:
        """The DELETE of rows that echoes of these sent messages stored before them."""
        echo = "direction = 'OUTBOUND' AND sent_at IS NULL AND external_id <> ''"
        if self._arrays:
            # One statement text whatever the batch (psycopg converts it once); planned per
            # call, as messages grows (see Executor.fetch).
            return (
                "DELETE FROM messages USING unnest(:c::text[], :e::text[], :i::text[])"  # noqa: S608
                f" AS u(c, e, i) WHERE {echo} AND connection_id = u.c AND external_id = u.e"
                " AND id <> u.i RETURNING connection_id, external_id, created_at",
                {
                    "c": [m.connection_id for m in sent],
                    "e": [m.external_id for m in sent],
                    "i": [m.id for m in sent],
                },
            )
        where: list[str] = []
        params: Params = {}
        for i, m in enumerate(sent):
            where.append(f"(connection_id = :c{i} AND external_id = :e{i} AND id <> :i{i})")
            params.update({f"c{i}": m.connection_id, f"e{i}": m.external_id, f"i{i}": m.id})
        return (
            f"DELETE FROM messages WHERE {echo} AND ({' OR '.join(where)})"  # noqa: S608
            " RETURNING connection_id, external_id, created_at",
            params,
        )

    async def _waiting_behind(self, settled: Sequence[Message]) -> bool:
        """Whether these settled messages' conversations still have a pending message
        (the settled ones, already updated, no longer count)."""
        if not settled:
            return False
        ids_sql, params = in_list("v", list(dict.fromkeys(m.conversation_id for m in settled)))
        found = await self._ex.fetch(
            "SELECT 1 AS n FROM messages w"  # noqa: S608
            f" WHERE w.conversation_id IN {ids_sql} AND {_pending('w')} LIMIT 1",
            params,
        )
        return bool(found)

    async def claim_next(
        self, *, now: datetime, lease_until: datetime, limit: int, lock: str
    ) -> list[Message]:
        """Due messages whose lease lapsed and that are next in their conversation's send
        order (no earlier pending one there), leased until ``lease_until``. Under
        ``FOR UPDATE SKIP LOCKED`` a replica skips the head another one is claiming and
        sees it pending, so it claims nothing else of that conversation either."""
        found = await self._ex.fetch(
            "UPDATE messages SET claimed_until = :lease WHERE id IN ("  # noqa: S608
            " SELECT q.id FROM messages q WHERE q.direction = 'OUTBOUND'"
            " AND q.status IN ('QUEUED', 'RETRYING') AND q.next_attempt_at <= :now"
            " AND (q.claimed_until IS NULL OR q.claimed_until <= :now)"
            " AND (q.unordered OR NOT EXISTS (SELECT 1 FROM messages o"
            f" WHERE o.conversation_id = q.conversation_id AND {_pending('o')}"
            " AND (o.created_at, o.id) < (q.created_at, q.id)))"
            f" ORDER BY q.next_attempt_at LIMIT :limit{lock}) RETURNING *",
            {
                "lease": self._codec.ts(rows.utc(lease_until)),
                "now": self._codec.ts(rows.utc(now)),
                "limit": limit,
            },
            replan=True,
        )
        claimed = [rows.message_from_row(self._codec, r) for r in found]
        return sorted(claimed, key=lambda m: (m.next_attempt_at, m.created_at, m.id))

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

    async def pending_texts(self, conversation_ids: Sequence[str]) -> set[tuple[str, str]]:
        """(conversation id, text) of the messages these conversations have still to send
        (a first attempt under way included): what an echo of ours may be seen as before
        its outcome is recorded."""
        if not conversation_ids:
            return set()
        where, params = any_of(
            "conversation_id", "v", sorted(set(conversation_ids)), arrays=self._arrays
        )
        found = await self._ex.fetch(
            f"SELECT conversation_id, text FROM messages w WHERE {where} AND {_pending('w')}",  # noqa: S608
            params,
            replan=True,
        )
        return {(r["conversation_id"], r["text"] or "") for r in found}

    async def confirm(self, echoes: Sequence[tuple[str, str, datetime]]) -> list[Message]:
        """Marks our sent messages that these (connection, external id, time) echoes name
        as confirmed; returns those it changed (a repeated echo changes nothing)."""
        if self._arrays:
            # Every message Meta sends is echoed: one statement per batch of echoes.
            ordered = sorted(echoes)
            found = await self._ex.fetch(
                # Meta's echo time (milliseconds, its clock) can precede our sent_at.
                "UPDATE messages SET confirmed_at = GREATEST(u.a, messages.sent_at)"
                " FROM unnest(:c::text[], :e::text[], :a::timestamptz[]) AS u(c, e, a)"
                " WHERE messages.connection_id = u.c AND messages.external_id = u.e"
                " AND messages.external_id <> '' AND direction = 'OUTBOUND'"
                " AND sent_at IS NOT NULL AND confirmed_at IS NULL RETURNING messages.*",
                {
                    "c": [c for c, _, _ in ordered],
                    "e": [e for _, e, _ in ordered],
                    "a": [self._codec.ts(rows.utc(a)) for _, _, a in ordered],
                },
                replan=True,
            )
            return [rows.message_from_row(self._codec, r) for r in found]
        confirmed: list[Message] = []
        for connection_id, external_id, at in sorted(echoes):
            found = await self._ex.fetch(
                "UPDATE messages SET confirmed_at = MAX(:at, sent_at) WHERE connection_id = :conn"
                " AND external_id = :ext AND direction = 'OUTBOUND'"
                " AND sent_at IS NOT NULL AND confirmed_at IS NULL RETURNING *",
                {"at": self._codec.ts(rows.utc(at)), "conn": connection_id, "ext": external_id},
            )
            confirmed.extend(rows.message_from_row(self._codec, r) for r in found)
        return confirmed
