"""The outbound side of the store (``Tx`` methods of gateway.services.outbound), in SQL both
backends understand.

An outbound message is inserted already leased to the process that will make its first
attempt, so the retry worker never claims it while that attempt runs; recording an
attempt's outcome releases the lease. An echo webhook may overtake the Send API's answer
and be stored first as a message of its own: recording the answer folds it into ours.

A settled message (SENT or FAILED) is final. An outcome that finds its message settled
comes from an attempt whose lease lapsed while it ran (a process stalled past it) and
another worker took the message over and settled it: the outcome is dropped, and the
message is answered as stored. Both attempts reached the channel (nothing can undo that),
but the late one no longer overwrites the record: a RETRYING over a SENT would have the
message sent a third time.

Send order: a message that keeps order (all but sender actions, stored ``unordered``) is
not claimed while an earlier one of its conversation (by created_at, then id) is pending,
QUEUED or RETRYING. One queued behind another is inserted without a lease, for the worker.
The partial index ``messages_send_order`` (0005) serves every such question; the SQL
below repeats its predicate word for word so that SQLite's planner matches it too.

The send path's statements on PostgreSQL take a batch's rows as one JSON document
(``json_to_recordset``): binary arrays cost a dumper call per column and value on the
Python side, several times what the statement's round trip costs, where a document is one
orjson call. A round trip costs about 100 µs of CPU on each side whatever it carries, so
each batch is as few statements as the work allows: the insert answers which rows it
inserted (no read of the keys before or after, unless one conflicted), and an outcome
(echoes, status, attempt) is one statement.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.domain.models import (
    Connection,
    Conversation,
    DeliveryError,
    Message,
    MessageStatus,
)
from gateway.domain.outbound import (
    ContentKind,
    DeliveryAttempt,
    SendBatch,
    SendTarget,
    stored_kind,
)
from gateway.store import bulk, rows
from gateway.store.locks import message_ids_lock
from gateway.store.rows import Codec, Params
from gateway.store.sqltx import (
    Deferred,
    Executor,
    answered,
    any_of,
    in_list,
    native,
    takes_arrays,
)

log = logging.getLogger(__name__)

_SENT_FIELDS = (
    "status",
    "external_id",
    "error",
    "attempts",
    "next_attempt_at",
    "sent_at",
    "confirmed_at",
)


# SQLite's form of an outcome batch; PostgreSQL sends _RECORD_OUTCOMES.
_OUTCOME_UPDATE = (
    "UPDATE messages SET "  # noqa: S608 - the column names are ours
    + ", ".join(f"{col} = :{col}" for col in _SENT_FIELDS)
    + ", claimed_until = :claimed_until WHERE id = :id"
)


_SETTLED = (MessageStatus.SENT, MessageStatus.FAILED)


def lease_of(message: Message, lease_until: datetime | None) -> datetime | None:
    """The lease an outcome leaves on its message: ``lease_until``, except that a message
    whose attempt may have been delivered stays leased until its retry. An echo of it
    meanwhile is then taken for ours (``pending_texts``), for the retry to adopt instead
    of sending the message again (``find_unadopted_echo``)."""
    error = message.error
    if message.status is MessageStatus.RETRYING and error is not None and error.maybe_delivered:
        return message.next_attempt_at
    return lease_until


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


_TARGET_COLUMNS = f"{rows.CONVERSATION_COLUMNS}, {_PENDING_AT}"


# PostgreSQL: a batch of new messages in one statement; RETURNING names the rows inserted,
# so that only the keys that conflicted are looked up afterwards. Rows are inserted in the
# document's order: of two rows with one idempotency key the first wins.
_MESSAGE_TYPES = {
    column: bulk.PG_TYPES[column]
    for column in (
        *("id", "tenant_id", "connection_id", "conversation_id", "channel", "direction"),
        *("idempotency_key", "created_at", *rows.MESSAGE_MUTABLE_COLUMNS),
        *("claimed_until", "unordered"),
    )
}
_INSERT_MESSAGES = (
    f"INSERT INTO messages ({', '.join(_MESSAGE_TYPES)})"  # noqa: S608 - the names are ours
    f" SELECT {', '.join(_MESSAGE_TYPES)} FROM json_to_recordset(:rows) AS r("
    + ", ".join(f"{c} {t}" for c, t in _MESSAGE_TYPES.items())
    + ") ON CONFLICT DO NOTHING RETURNING id"
)

# PostgreSQL: a batch of outcomes in one statement. ``echoes`` removes the rows that echoes
# of these sent messages stored before them (their external id is about to be ours, under
# a unique index): the UPDATE reads ``echoes`` through its join, so every echo of a row is
# deleted before that row is written, whichever way the join is planned. ``tried`` records
# the attempts. RETURNING says, per row, whether an echo confirmed it and, once a message
# settled, whether another of its conversation still waits (the subquery sees the rows as
# they were before the statement, the settled row itself included, hence ``w.id <> m.id``).
# ``unsettled`` leaves out the messages settled already (see the module's docstring): their
# rows are neither updated nor returned, and the echoes they name are left alone; the
# UPDATE says it again so that PostgreSQL checks it anew on a row another transaction
# settled meanwhile.
# ``LIMIT :n`` (the document's length, here and in the recipients lookup) tells the planner
# how many rows the document holds: it assumes 100 for a set-returning function, enough
# to make scanning a table of a few thousand rows look cheaper than an index probe each.
_RECORD_OUTCOMES = f"""
WITH u AS (
  SELECT * FROM json_to_recordset(:outcomes) AS u(id text, connection_id text, status text,
    external_id text, error jsonb, attempts integer, next_attempt_at timestamptz,
    sent_at timestamptz, confirmed_at timestamptz, number integer, started_at timestamptz,
    finished_at timestamptz, attempt_error jsonb, claimed_until timestamptz)
  LIMIT :n
), unsettled AS (
  SELECT u.* FROM u JOIN messages s ON s.id = u.id WHERE s.status NOT IN ('SENT', 'FAILED')
), echoes AS (
  DELETE FROM messages e USING unsettled u
  WHERE u.external_id <> '' AND e.connection_id = u.connection_id
    AND e.external_id = u.external_id AND e.id <> u.id
    AND e.direction = 'OUTBOUND' AND e.sent_at IS NULL AND e.external_id <> ''
  RETURNING u.id, e.created_at
), tried AS (
  INSERT INTO message_attempts (message_id, number, started_at, finished_at, error)
  SELECT id, number, started_at, finished_at, attempt_error FROM u WHERE number IS NOT NULL
  ON CONFLICT (message_id, number) DO NOTHING
)
UPDATE messages m SET status = u.status, external_id = u.external_id, error = u.error,
  attempts = u.attempts, next_attempt_at = u.next_attempt_at, sent_at = u.sent_at,
  confirmed_at = CASE WHEN x.created_at IS NULL OR u.confirmed_at IS NOT NULL
    THEN u.confirmed_at ELSE GREATEST(x.created_at, u.sent_at) END,
  claimed_until = u.claimed_until
FROM unsettled u LEFT JOIN echoes x ON x.id = u.id
WHERE m.id = u.id AND m.status NOT IN ('SENT', 'FAILED')
RETURNING m.id, x.created_at IS NOT NULL AS echoed, m.confirmed_at,
  CASE WHEN m.status IN ('SENT', 'FAILED') AND NOT m.unordered
    THEN EXISTS (SELECT 1 FROM messages w WHERE w.conversation_id = m.conversation_id
      AND {_pending("w")} AND w.id <> m.id)
    ELSE false END AS waiting
"""  # noqa: S608 - the interpolated SQL is ours


# PostgreSQL: our sent messages that a batch of echoes names, confirmed. The rows are locked
# first, in key order (a locking SELECT sorts before it locks): two batches holding copies of
# the same echoes (Meta repeats deliveries) then wait for each other instead of deadlocking,
# and the second finds them confirmed. Meta's echo time (milliseconds, its clock) can
# precede our sent_at.
_CONFIRM_ECHOES = """
WITH l AS MATERIALIZED (
  SELECT m.id, u.a
  FROM messages m
  JOIN unnest(:c::text[], :e::text[], :a::timestamptz[]) AS u(c, e, a)
    ON m.connection_id = u.c AND m.external_id = u.e
  WHERE m.external_id <> '' AND m.direction = 'OUTBOUND' AND m.sent_at IS NOT NULL
    AND m.confirmed_at IS NULL
  ORDER BY m.connection_id, m.external_id FOR NO KEY UPDATE OF m
)
UPDATE messages SET confirmed_at = GREATEST(l.a, messages.sent_at)
FROM l WHERE messages.id = l.id RETURNING messages.*
"""


def _message_ids_lock(
    items: Sequence[tuple[Message, DeliveryAttempt | None]],
) -> tuple[str, Params] | None:
    """The lock an outcome batch takes before giving messages their Meta ids (see
    gateway.store.locks): a webhook committing their echoes meanwhile waits for it."""
    return message_ids_lock(m.external_id for m, _ in items)


class _Ready:
    """Rows already read, as a :class:`Deferred`."""

    __slots__ = ("_rows",)

    def __init__(self, found: list[rows.Row]) -> None:
        self._rows = found

    async def rows(self) -> list[rows.Row]:
        return self._rows


_NOTHING = _Ready([])


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _unordered(message: Message) -> bool:
    return stored_kind(message) == ContentKind.SENDER_ACTION


def _document(rows_: list[dict[str, Any]]) -> bytes:
    # The times are all aware (UTC): orjson writes them with their offset.
    return orjson.dumps(rows_)


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else rows.utc(value)


class OutboundWriter:
    """The outbound statements. Those that find rows by key in tables growing without bound
    (messages, participants, conversations) on every send are replanned at each call: a
    plan cached while the table was small would scan it (see ``Executor.fetch``)."""

    def __init__(self, executor: Executor, codec: Codec) -> None:
        self._ex = executor
        self._codec = codec
        self._arrays = takes_arrays(executor)
        self._native = native(executor)

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
        return self._connections(await (await self._connections_sent(ids)).rows())

    async def get_send_targets(self, ids: Sequence[str]) -> dict[str, SendTarget]:
        """Conversations by id, with their latest pending ordered message's time."""
        return self._targets(await (await self._targets_sent(ids)).rows())

    async def find_send_targets_for_recipients(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], SendTarget]:
        """(connection_id, channel_user_id) -> the conversation, for the pairs that have one,
        each with its latest pending ordered message's time."""
        wanted = list(dict.fromkeys(pairs))
        return self._recipients(wanted, await (await self._recipients_sent(wanted)).rows())

    async def find_send_batch(
        self,
        conversation_ids: Sequence[str],
        connection_ids: Sequence[str],
        pairs: Sequence[tuple[str, str]],
    ) -> SendBatch:
        """:meth:`get_send_targets`, :meth:`get_connections` and
        :meth:`find_send_targets_for_recipients` at once: on PostgreSQL the three
        statements (and any sent before them) share one round trip."""
        wanted = list(dict.fromkeys(pairs))
        targets = await self._targets_sent(conversation_ids)
        connections = await self._connections_sent(connection_ids)
        recipients = await self._recipients_sent(wanted)
        return SendBatch(
            self._targets(await targets.rows()),
            self._connections(await connections.rows()),
            self._recipients(wanted, await recipients.rows()),
        )

    async def _sent(self, sql: str, params: Params, *, replan: bool = False) -> Deferred:
        """The statement sent: read later on PostgreSQL (see fetch_deferred), run now
        elsewhere."""
        if self._native is not None:
            return await self._native.fetch_deferred(sql, params, replan=replan)
        return _Ready(await self._ex.fetch(sql, params, replan=replan))

    async def _connections_sent(self, ids: Sequence[str]) -> Deferred:
        if not ids:
            return _NOTHING
        where, params = any_of("id", "c", _unique(ids), arrays=self._arrays)
        return await self._sent(f"SELECT * FROM connections WHERE {where}", params)  # noqa: S608

    def _connections(self, found: list[rows.Row]) -> dict[str, Connection]:
        return {r["id"]: rows.connection_from_row(self._codec, r) for r in found}

    async def _targets_sent(self, ids: Sequence[str]) -> Deferred:
        if not ids:
            return _NOTHING
        where, params = any_of("c.id", "v", _unique(ids), arrays=self._arrays)
        return await self._sent(
            f"SELECT {_TARGET_COLUMNS} FROM {rows.CONVERSATION_FROM} WHERE {where}",  # noqa: S608
            params,
            replan=True,
        )

    def _targets(self, found: list[rows.Row]) -> dict[str, SendTarget]:
        return {r["id"]: self._target(r) for r in found}

    async def _recipients_sent(self, wanted: Sequence[tuple[str, str]]) -> Deferred:
        if not wanted:
            return _NOTHING
        if self._arrays:
            # The exact pairs, joined: one parameter, and no other customer's row comes back.
            return await self._sent(
                f"SELECT {_TARGET_COLUMNS} FROM (SELECT * FROM json_to_recordset(:pairs)"  # noqa: S608
                " AS r(c text, u text) LIMIT :n) r"
                " JOIN participants p ON p.connection_id = r.c AND p.channel_user_id = r.u"
                " JOIN conversations c"
                " ON c.participant_id = p.id AND c.connection_id = p.connection_id",
                {
                    "pairs": self._codec.json_document(
                        _document([{"c": c, "u": u} for c, u in wanted])
                    ),
                    "n": len(wanted),
                },
                replan=True,
            )
        conns, params = any_of("p.connection_id", "c", _unique(c for c, _ in wanted), arrays=False)
        users, user_params = any_of(
            "p.channel_user_id", "u", _unique(u for _, u in wanted), arrays=False
        )
        return await self._sent(
            f"SELECT {_TARGET_COLUMNS} FROM {rows.CONVERSATION_FROM}"  # noqa: S608
            f" WHERE {conns} AND {users}",
            {**params, **user_params},
        )

    def _recipients(
        self, wanted: Sequence[tuple[str, str]], found: list[rows.Row]
    ) -> dict[tuple[str, str], SendTarget]:
        keep = set(wanted)
        out: dict[tuple[str, str], SendTarget] = {}
        for r in found:
            key = (r["connection_id"], r["p_channel_user_id"])
            if key in keep:
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
        if self._native is not None:
            document = _document(self._message_rows(messages, lease_until, behind))
            found = await self._native.fetch_tuples(
                _INSERT_MESSAGES, {"rows": self._codec.json_document(document)}
            )
            inserted = {r[0] for r in found}
        else:
            lease = self._codec.ts(rows.utc(lease_until))
            batch: list[Params] = []
            for message in messages:
                params = rows.message_params(self._codec, message, now)
                params["claimed_until"] = None if message.id in behind else lease
                params["unordered"] = _unordered(message)
                batch.append(params)
            # In batch order: of two rows with one idempotency key the first is inserted.
            returned = await self._ex.fetch(
                *bulk.insert("messages", batch, "ON CONFLICT DO NOTHING RETURNING id", arrays=False)
            )
            inserted = {r["id"] for r in returned}
        # The unique (tenant, key) index decided every race, within the batch or with
        # another replica; whoever holds the key now is the message. Without a key only
        # the (fresh, random) id could conflict.
        conflicts = [m for m in messages if m.id not in inserted]
        holders = await self.find_messages_by_idempotency_keys(
            [(m.tenant_id, m.idempotency_key) for m in conflicts if m.idempotency_key]
        )
        out: list[tuple[Message, bool]] = []
        for message in messages:
            if message.id in inserted:
                out.append((message, True))
                continue
            holder = holders.get((message.tenant_id, message.idempotency_key))
            if holder is None:
                raise RuntimeError(f"message {message.id} conflicts with a row that vanished")
            out.append((holder, False))
        return out

    def _message_rows(
        self, messages: Sequence[Message], lease_until: datetime, behind: Collection[str]
    ) -> list[dict[str, Any]]:
        """The messages as rows of ``_INSERT_MESSAGES``'s document (times in UTC, as
        orjson writes them with their offset)."""
        lease = rows.utc(lease_until)
        out = []
        for m in messages:
            out.append(
                {
                    **rows.message_identity(m),
                    "attachments": [rows.attachment_to_json(a) for a in m.attachments],
                    "content": m.content,
                    "idempotency_key": m.idempotency_key,
                    "error": None if m.error is None else rows.error_to_json(m.error),
                    "attempts": m.attempts,
                    "next_attempt_at": _utc(m.next_attempt_at),
                    "created_at": _utc(m.created_at) or datetime.now(UTC),
                    "sent_at": _utc(m.sent_at),
                    "confirmed_at": _utc(m.confirmed_at),
                    "deleted": m.deleted,
                    "edit_count": m.edit_count,
                    "claimed_until": None if m.id in behind else lease,
                    "unordered": _unordered(m),
                }
            )
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
        another of its conversation waiting behind it. On PostgreSQL one statement does it
        all (``_RECORD_OUTCOMES``); SQLite takes three, and asks once more, only when an
        ordered message settled."""
        if not items:
            return [], False
        if self._arrays:
            return await self._record_native(items, lease_until)
        # SQLite serializes writers: what this reads stays true until the updates below.
        late = await self._superseded([m.id for m, _ in items])
        if late:
            recorded, waiting = await self.record_and_peek(
                [(m, a) for m, a in items if m.id not in late], lease_until=lease_until
            )
            # Their attempts happened all the same (as _RECORD_OUTCOMES keeps them).
            await self._insert_attempts(
                [self._attempt_params(m.id, a) for m, a in items if m.id in late and a]
            )
            by_id = {m.id: m for m in recorded} | late
            return [by_id[m.id] for m, _ in items], waiting
        sent = [m for m, _ in items if m.external_id]
        if sent:
            # Echoes go first: our row takes their external id under a unique index.
            echoed = await self._ex.fetch(*self._echoes_of(sent))
            firsts = {(r["connection_id"], r["external_id"]): r["created_at"] for r in echoed}
            for m in sent:
                at = firsts.get((m.connection_id, m.external_id))
                if at is not None and m.confirmed_at is None:
                    echoed_at = self._codec.ts_in(at)
                    sent_at = m.sent_at or echoed_at
                    m.confirmed_at = max(echoed_at, sent_at)
        codec = self._codec
        updates: list[Params] = []
        attempts: list[Params] = []
        for m, attempt in items:
            # Only what an outcome changes: message_params would re-encode the content.
            updates.append(
                {
                    "status": m.status.value,
                    "external_id": m.external_id,
                    "error": None if m.error is None else codec.json(rows.error_to_json(m.error)),
                    "attempts": m.attempts,
                    "next_attempt_at": rows.opt_ts(codec, m.next_attempt_at),
                    "sent_at": rows.opt_ts(codec, m.sent_at),
                    "confirmed_at": rows.opt_ts(codec, m.confirmed_at),
                    "claimed_until": rows.opt_ts(codec, lease_of(m, lease_until)),
                    "id": m.id,
                }
            )
            if attempt is not None:
                attempts.append(self._attempt_params(m.id, attempt))
        await self._ex.executemany(_OUTCOME_UPDATE, updates)
        waiting = await self._waiting_behind(
            [m for m, _ in items if m.status in _SETTLED and not _unordered(m)]
        )
        await self._insert_attempts(attempts)
        return [m for m, _ in items], waiting

    async def _insert_attempts(self, attempts: list[Params]) -> None:
        if attempts:
            await self._ex.execute(
                *bulk.insert(
                    "message_attempts",
                    attempts,
                    "ON CONFLICT (message_id, number) DO NOTHING",
                    arrays=False,
                )
            )

    async def record_and_peek_deferred(
        self,
        items: Sequence[tuple[Message, DeliveryAttempt | None]],
        *,
        lease_until: datetime | None,
    ) -> Callable[[], Awaitable[tuple[list[Message], bool]]]:
        """:meth:`record_and_peek`, its answer read by awaiting the function returned: on
        PostgreSQL the statement goes out now and its answer comes back with the next
        statement of the transaction that waits for its own; elsewhere it runs now."""
        if not items or not self._arrays:
            return answered(await self.record_and_peek(items, lease_until=lease_until))
        lock = _message_ids_lock(items)
        if lock is not None:
            await self._sent(*lock)
        sent = await self._sent(*self._outcomes(items, lease_until), replan=True)

        async def read() -> tuple[list[Message], bool]:
            return await self._outcomes_recorded(items, await sent.rows())

        return read

    async def _record_native(
        self, items: Sequence[tuple[Message, DeliveryAttempt | None]], lease_until: datetime | None
    ) -> tuple[list[Message], bool]:
        lock = _message_ids_lock(items)
        if lock is not None:
            await self._ex.fetch(*lock)
        # Planned per call: the UPDATE finds its rows in messages, which grows without bound
        # (see Executor.fetch).
        sql, params = self._outcomes(items, lease_until)
        answers = await self._ex.fetch(sql, params, replan=True)
        return await self._outcomes_recorded(items, answers)

    def _outcomes(
        self, items: Sequence[tuple[Message, DeliveryAttempt | None]], lease_until: datetime | None
    ) -> tuple[str, Params]:
        """_RECORD_OUTCOMES and its parameters."""
        document = []
        for m, attempt in items:
            row: dict[str, Any] = {
                "id": m.id,
                "connection_id": m.connection_id,
                "status": m.status.value,
                "external_id": m.external_id,
                "error": None if m.error is None else rows.error_to_json(m.error),
                "attempts": m.attempts,
                "next_attempt_at": _utc(m.next_attempt_at),
                "sent_at": _utc(m.sent_at),
                "confirmed_at": _utc(m.confirmed_at),
                "claimed_until": _utc(lease_of(m, lease_until)),
            }
            if attempt is not None:
                row["number"] = attempt.number
                row["started_at"] = rows.utc(attempt.started_at)
                row["finished_at"] = rows.utc(attempt.finished_at)
                error = attempt.error
                row["attempt_error"] = None if error is None else rows.error_to_json(error)
            document.append(row)
        return _RECORD_OUTCOMES, {
            "outcomes": self._codec.json_document(_document(document)),
            "n": len(document),
        }

    async def _outcomes_recorded(
        self, items: Sequence[tuple[Message, DeliveryAttempt | None]], answers: list[rows.Row]
    ) -> tuple[list[Message], bool]:
        """The messages as recorded: those the statement left out, settled already by
        another attempt, are read back as stored."""
        if len(answers) < len(items):
            answered_ids = {r["id"] for r in answers}
            late = [m.id for m, _ in items if m.id not in answered_ids]
            stored = await self._superseded(late)
            return [stored.get(m.id, m) for m, _ in items], self._note_answers(items, answers)
        return [m for m, _ in items], self._note_answers(items, answers)

    async def _superseded(self, ids: Sequence[str]) -> dict[str, Message]:
        """The settled messages among ``ids``, as stored: their outcomes came late."""
        if not ids:
            return {}
        where, params = in_list("s", list(ids))
        found = await self._ex.fetch(
            f"SELECT * FROM messages WHERE id IN {where}"  # noqa: S608
            " AND status IN ('SENT', 'FAILED')",
            params,
        )
        stored = {r["id"]: rows.message_from_row(self._codec, r) for r in found}
        for message_id in stored:
            log.warning(
                "send outcome dropped: another attempt settled the message first (this"
                " attempt's lease lapsed while it ran); both reached the channel",
                extra={"message_id": message_id},
            )
        return stored

    def _note_answers(
        self, items: Sequence[tuple[Message, DeliveryAttempt | None]], answers: list[rows.Row]
    ) -> bool:
        """Sets the confirmations the answers tell of; whether a message waits behind."""
        waiting = False
        echoed: dict[str, datetime] = {}
        for r in answers:
            waiting = waiting or bool(r["waiting"])
            if r["echoed"]:
                echoed[r["id"]] = self._codec.ts_in(r["confirmed_at"])
        if echoed:
            for m, _ in items:
                at = echoed.get(m.id)
                if at is not None and m.confirmed_at is None:
                    m.confirmed_at = at
        return waiting

    def _echoes_of(self, sent: Sequence[Message]) -> tuple[str, Params]:
        """SQLite: the DELETE of rows that echoes of these sent messages stored before them."""
        where: list[str] = []
        params: Params = {}
        for i, m in enumerate(sent):
            where.append(f"(connection_id = :c{i} AND external_id = :e{i} AND id <> :i{i})")
            params.update({f"c{i}": m.connection_id, f"e{i}": m.external_id, f"i{i}": m.id})
        return (
            "DELETE FROM messages WHERE direction = 'OUTBOUND' AND sent_at IS NULL"  # noqa: S608
            f" AND external_id <> '' AND ({' OR '.join(where)})"
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
            else self._codec.json(rows.error_to_json(attempt.error)),
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

    async def pending_texts(
        self, conversation_ids: Sequence[str], now: datetime
    ) -> set[tuple[str, str]]:
        """(conversation id, text) of the messages these conversations have an attempt of
        under way (leased, first attempt included): what an echo of ours may be seen as
        before its outcome is recorded. A message waiting for a retry is not out, so an
        echo of its text meanwhile is another app's message, unless its attempt may have
        been delivered: it then stays leased until its retry (``lease_of``)."""
        if not conversation_ids:
            return set()
        where, params = any_of(
            "conversation_id", "v", sorted(set(conversation_ids)), arrays=self._arrays
        )
        params["now"] = self._codec.ts(rows.utc(now))
        found = await self._ex.fetch(
            "SELECT conversation_id, text FROM messages w"  # noqa: S608
            f" WHERE {where} AND {_pending('w')} AND w.claimed_until > :now",
            params,
            replan=True,
        )
        return {(r["conversation_id"], r["text"] or "") for r in found}

    async def find_unadopted_echo(
        self, message: Message, since: datetime
    ) -> tuple[str, datetime] | None:
        """(external id, time) of the oldest echo stored as a message of its own in the
        message's conversation since ``since`` with the message's text: no outcome has
        claimed its id. Send order keeps one ordered message of a conversation out at a
        time, so while this one is pending such an echo is of this one (or of a message of
        the same text another app sent meanwhile: the customer has the text either way)."""
        found = await self._ex.fetch(
            "SELECT external_id, created_at FROM messages"
            " WHERE conversation_id = :conv AND direction = 'OUTBOUND' AND sent_at IS NULL"
            " AND external_id <> '' AND text = :text AND created_at >= :since"
            " AND id <> :id ORDER BY created_at LIMIT 1",
            {
                "conv": message.conversation_id,
                "text": message.text,
                "since": self._codec.ts(rows.utc(since)),
                "id": message.id,
            },
            replan=True,
        )
        if not found:
            return None
        return found[0]["external_id"], self._codec.ts_in(found[0]["created_at"])

    async def confirm(self, echoes: Sequence[tuple[str, str, datetime]]) -> list[Message]:
        """Marks our sent messages that these (connection, external id, time) echoes name
        as confirmed; returns those it changed (a repeated echo changes nothing)."""
        if self._arrays:
            # Every message Meta sends is echoed: one statement per batch of echoes.
            ordered = sorted(echoes)
            found = await self._ex.fetch(
                _CONFIRM_ECHOES,
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
