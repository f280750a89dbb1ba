"""Batch ingestion of webhook items (``Tx.ingest_inbound``) and the quarantine, in SQL both
backends understand.

A batch holds the items of many concurrent webhook requests (group commit), so every step
is one multi-row statement per chunk rather than one statement per item. Rows are written
in key order so that two concurrent batches lock shared rows in the same order and cannot
deadlock each other.

Meta may deliver an unsend or an edit before the message it changes. An unsend of a
message not stored yet leaves a tombstone (``message_tombstones``), an edit an early edit
(``message_early_edits``, the highest edit_count of each message); both mark the
conversation (``conversations.tombstone_at``, named after the unsends that came first: it
marks any early change). A message of a marked conversation is looked up among the
tombstones and early edits, in one statement: when edited, it is stored and announced with
the edited text and edit count; when unsent, it is stored deleted and not announced (its
MessageDeleted went out with the unsend), whatever its edits. The mark comes back with the
conversation upsert every batch runs anyway, so a batch of unmarked conversations, the
usual case, pays nothing more. Nothing is missed across transactions: a change and its
message name the same customer, so both upsert the same conversation row, and the row lock
orders them; the upsert of the second one returns the mark the first committed, and its
later statements see the first one's rows. (SQLite serializes writers anyway.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.domain.codec import encode_event
from gateway.domain.events import Event, EventKind
from gateway.domain.ids import derived_id, new_id
from gateway.domain.inbound import (
    MESSAGE_KINDS,
    TOMBSTONE_RETENTION,
    WINDOW,
    IngestResult,
    QuarantinedDelivery,
    RoutedItem,
    message_from_item,
)
from gateway.domain.models import Connection, Conversation, Direction, Message, Participant
from gateway.domain.store import OutboxEntry
from gateway.store import bulk, rows
from gateway.store.locks import message_ids_lock
from gateway.store.outbound import OutboundWriter
from gateway.store.rows import Codec, Params, Row
from gateway.store.sqltx import (
    Executor,
    NativeExecutor,
    answered,
    earlier_than,
    in_list,
    later,
    native,
    takes_arrays,
)

# Rows per statement: keeps every statement under SQLite's bound on host parameters.
CHUNK = 200

_CONVERSATION_RETURNING = (
    "id, tenant_id, connection_id, channel, participant_id, created_at, last_message_at,"
    " last_inbound_at, window_expires_at, tombstone_at"
)
# A conversation's times only move forward, whatever order Meta delivers in.
_LATER_TIMES = ", ".join(
    f"{col} = {later('conversations', col)}"
    for col in ("last_message_at", "last_inbound_at", "window_expires_at")
)

# PostgreSQL: the outbox entries of a batch, claimed for this process's relay, from one JSON
# document of rows; seq follows the order of the document.
_ADD_CLAIMED_EVENTS = """
INSERT INTO outbox (event_id, event, created_at, claimed_until, attempts)
SELECT u.i, u.e, :n, :l, 1
FROM ROWS FROM (json_to_recordset(:rows) AS (i text, e json)) WITH ORDINALITY AS u(i, e, o)
ORDER BY u.o ON CONFLICT (event_id) DO NOTHING RETURNING seq, event_id
"""
# PostgreSQL: the batch's messages from one JSON document of rows, for the same reasons.
_INSERT_MESSAGES = f"""
INSERT INTO messages ({rows.RECEIVED_MESSAGE_COLUMNS})
SELECT {rows.RECEIVED_MESSAGE_COLUMNS} FROM json_populate_recordset(NULL::messages, :rows)
ORDER BY connection_id, external_id, id
ON CONFLICT DO NOTHING RETURNING id
"""  # noqa: S608 - the interpolated SQL is ours

# PostgreSQL: a batch's participants, conversations and received messages in one statement:
# one round trip where three or four were needed, each costing more here than its rows. ``d``,
# a JSON document, holds a row per customer: ``u`` their channel id, ``pv`` and ``v`` the ids
# a new participant and a new conversation take, ``t`` tenant, ``c`` connection, ``h``
# channel, ``lm``/``li``/``we`` the times the batch brings. One orjson call costs a fraction
# of binding a binary array per column (a dumper call per value).
# Participants are upserted rather than looked up: the no-op update returns the customers
# known already (those another batch inserted after this statement's snapshot too), and the
# statement reads no table, so its prepared plan cannot go stale as participants grow (a
# join read them by a full scan while the table was small). The update is a heap-only one,
# measured as cheap as the lookup it replaces; the row lock it holds until the commit
# orders two batches of one customer as the conversation's upsert does.
# Received messages go into the conversations the statement returns (their sender is the
# customer), except those of a conversation with a recent early change (``:fresh``, see the
# module's docstring), which the caller writes after applying the change. Each insert sorts
# its rows and so reads all of its input before writing: the participants, then the
# conversations, then the messages are written, each in key order, as by the statements
# this one replaced.
# Rows: one per customer (participant, then conversation columns), then one per message
# inserted (its id first, the rest NULL).
_UPSERT_TOGETHER = f"""
WITH d AS MATERIALIZED (
  SELECT * FROM json_to_recordset(:rows) AS d(pv text, u text, v text, t text, c text, h text,
    lm timestamptz, li timestamptz, we timestamptz)
), p AS (
  INSERT INTO participants (id, connection_id, channel_user_id)
  SELECT d.pv, d.c, d.u FROM d ORDER BY d.c, d.u
  ON CONFLICT (connection_id, channel_user_id) DO UPDATE
  SET channel_user_id = excluded.channel_user_id
  RETURNING *
), cv AS (
  INSERT INTO conversations (id, tenant_id, connection_id, channel, participant_id, created_at,
    last_message_at, last_inbound_at, window_expires_at)
  SELECT d.v, d.t, d.c, d.h, p.id, :now, d.lm, d.li, d.we
  FROM d JOIN p ON p.connection_id = d.c AND p.channel_user_id = d.u
  ORDER BY d.c, p.id
  ON CONFLICT (connection_id, participant_id) DO UPDATE SET {_LATER_TIMES}
  RETURNING id, connection_id, participant_id, created_at, last_message_at, last_inbound_at,
    window_expires_at, tombstone_at
), pc AS MATERIALIZED (
  SELECT p.*, cv.id AS cv_id, cv.created_at AS cv_created_at, cv.last_message_at,
    cv.last_inbound_at, cv.window_expires_at, cv.tombstone_at
  FROM p JOIN cv ON cv.connection_id = p.connection_id AND cv.participant_id = p.id
), ms AS (
  INSERT INTO messages ({rows.RECEIVED_MESSAGE_COLUMNS})
  SELECT m.id, m.tenant_id, m.connection_id, pc.cv_id, m.channel, m.direction, m.status,
    m.external_id, m.sender_id, m.text, m.attachments, m.content, m.created_at, m.deleted,
    m.edit_count
  FROM json_populate_recordset(NULL::messages, :messages) m
  JOIN pc ON pc.connection_id = m.connection_id AND pc.channel_user_id = m.sender_id
  WHERE pc.tombstone_at IS NULL OR pc.tombstone_at <= :fresh
  ORDER BY m.connection_id, m.external_id, m.id
  ON CONFLICT DO NOTHING RETURNING id
)
SELECT id, connection_id, channel_user_id, username, name, picture_url, profile_fetched_at,
  cv_id, cv_created_at, last_message_at, last_inbound_at, window_expires_at, tombstone_at
FROM pc
UNION ALL
SELECT ms.id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM ms
"""  # noqa: S608 - the interpolated SQL is ours


# PostgreSQL: conversations' last message times moved forward, their rows locked first in the
# order _UPSERT_TOGETHER locks them (a locking SELECT sorts before it locks).
_MOVE_LAST_MESSAGE_AT = f"""
WITH l AS MATERIALIZED (
  SELECT id FROM conversations WHERE id = ANY(:v::text[])
  ORDER BY connection_id, participant_id FOR NO KEY UPDATE
)
UPDATE conversations SET last_message_at = u.a
FROM l JOIN unnest(:v::text[], :a::timestamptz[]) AS u(v, a) ON u.v = l.id
WHERE conversations.id = l.id AND {earlier_than("conversations.last_message_at", "u.a")}
"""  # noqa: S608 - the interpolated SQL is ours


def _json(value: Any) -> bytes:
    # A naive time can only mean UTC here (gateway.store.rows.utc): never the session's zone.
    return orjson.dumps(value, option=orjson.OPT_NAIVE_UTC)


def _chunks(values: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _max(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b > a else a


@dataclass(slots=True)
class _ConversationDraft:
    """What a batch's items tell of one customer's conversation."""

    connection: Connection
    last_message_at: datetime | None = None
    last_inbound_at: datetime | None = None

    @property
    def window_expires_at(self) -> datetime | None:
        return None if self.last_inbound_at is None else self.last_inbound_at + WINDOW


def _customer_json(customer_id: str, d: _ConversationDraft) -> dict[str, Any]:
    """A row of ``_UPSERT_TOGETHER``."""
    return {
        "pv": new_id("par"),
        "u": customer_id,
        "v": new_id("cnv"),
        "t": d.connection.tenant_id,
        "c": d.connection.id,
        "h": d.connection.channel,
        "lm": d.last_message_at,
        "li": d.last_inbound_at,
        "we": d.window_expires_at,
    }


def _conversation_drafts(
    routed: Sequence[RoutedItem],
) -> dict[tuple[str, str], _ConversationDraft]:
    """(connection id, customer id) -> the draft of that customer's conversation."""
    drafts: dict[tuple[str, str], _ConversationDraft] = {}
    for r in routed:
        if not r.item.customer_id:
            continue
        draft = drafts.get((r.connection.id, r.item.customer_id))
        if draft is None:
            draft = drafts[(r.connection.id, r.item.customer_id)] = _ConversationDraft(r.connection)
        if r.item.kind in MESSAGE_KINDS:
            draft.last_message_at = _max(draft.last_message_at, r.item.occurred_at)
        if r.item.opens_window:
            draft.last_inbound_at = _max(draft.last_inbound_at, r.item.occurred_at)
    return drafts


def _attach(
    routed: Sequence[RoutedItem],
    results: list[IngestResult],
    participants: dict[tuple[str, str], Participant],
    conversations: dict[tuple[str, str], Conversation],
) -> None:
    """Gives each item's result its customer's conversation."""
    for result, r in zip(results, routed, strict=True):
        part = participants.get((r.connection.id, r.item.customer_id))
        if part is not None:
            result.conversation = conversations.get((r.connection.id, part.id))


# The conversation id of a message drafted before its conversation is known.
_UNKNOWN = ""


def _id_of(conversation: Conversation | None) -> str | None:
    return None if conversation is None else conversation.id


def _message_drafts(
    routed: Sequence[RoutedItem],
    results: list[IngestResult],
    conversation_of: Callable[[int], str | None],
) -> list[tuple[int, Message]]:
    """The messages of the batch's received and echoed items, each under its item's index,
    in key order; ``conversation_of(i)``: the id of item i's conversation, None when it has
    none (its message is not stored). A repeat within the batch is marked a duplicate."""
    first_of: dict[tuple[str, str], int] = {}
    drafts: list[tuple[int, Message]] = []
    for i, r in enumerate(routed):
        if r.item.kind not in MESSAGE_KINDS:
            continue
        conversation_id = conversation_of(i)
        if conversation_id is None:
            continue
        # Meta's message id names the message; one without (any field may be missing)
        # is named by its dedupe key, and its id derived from that key, so that Meta's
        # retries of it hit the primary key and are stored once, as they are published.
        mid = r.item.external_id
        key = (r.connection.id, mid or r.item.dedupe_key)
        if key in first_of:
            results[i].duplicate = True  # a repeat within this very batch
            continue
        first_of[key] = i
        message_id = new_id("msg") if mid else derived_id("msg", *key)
        drafts.append((i, message_from_item(r.item, r.connection, conversation_id, message_id)))
    drafts.sort(key=lambda d: (d[1].connection_id, d[1].external_id, d[1].id))
    return drafts


@dataclass(slots=True)
class _Known:
    """A stored message an item refers to."""

    id: str
    conversation_id: str
    edit_count: int


class InboundWriter:
    def __init__(self, executor: Executor, codec: Codec) -> None:
        self._ex = executor
        self._codec = codec
        self._arrays = takes_arrays(executor)
        self._native = native(executor)

    async def _insert(self, table: str, rows_: Sequence[Params], suffix: str) -> list[Row]:
        """A multi-row INSERT of rows with the same keys (``unnest`` on PostgreSQL)."""
        return await self._ex.fetch(*bulk.insert(table, rows_, suffix, arrays=self._arrays))

    async def ingest(self, routed: Sequence[RoutedItem]) -> list[IngestResult]:
        results = [IngestResult() for _ in routed]
        if not routed:
            return results
        rest = await self._confirm_echoes_first(routed, results)
        confirmed = [
            (r, result.confirmed)
            for r, result in zip(routed, results, strict=True)
            if result.confirmed is not None
        ]
        if rest:
            # The confirmed echoes' conversations move in the batch upsert with the others,
            # so that all of the batch's conversation rows are locked in one order (see
            # _move_last_message_at). The same result objects: what the rest of the batch
            # finds lands in ``results``.
            await self._store(
                [routed[i] for i in rest], [results[i] for i in rest], [r for r, _ in confirmed]
            )
        else:
            await self._move_last_message_at(
                [(m.conversation_id, r.item.occurred_at) for r, m in confirmed]
            )
        return results

    async def _confirm_echoes_first(
        self, routed: Sequence[RoutedItem], results: list[IngestResult]
    ) -> list[int]:
        """Meta echoes every message it sends for us, so most echoes name a message of ours
        already SENT: such an echo confirms it first, and that is all it does, where storing
        it would lock its id and insert it only to find it stored (its conversation's last
        message time still moves to the echo's, as storing it did). Returns the indexes of
        the items left to store: echoes that confirm nothing now (the send's outcome not
        committed yet, a repeat, another app's message) go the usual way, where the id lock
        orders them after the outcome (gateway.store.locks)."""
        wanted: dict[tuple[str, str], datetime] = {}
        for r in routed:
            if r.item.kind == EventKind.MESSAGE_ECHOED and r.item.external_id:
                wanted.setdefault((r.connection.id, r.item.external_id), r.item.occurred_at)
        everything = list(range(len(routed)))
        if not wanted:
            return everything
        confirmed = await OutboundWriter(self._ex, self._codec).confirm(
            [(conn, ext, at) for (conn, ext), at in wanted.items()]
        )
        if not confirmed:
            return everything
        by_key = {(m.connection_id, m.external_id): m for m in confirmed}
        untold = dict(by_key)  # a repeat within the batch confirms nothing more
        rest: list[int] = []
        for i, r in enumerate(routed):
            key = (r.connection.id, r.item.external_id)
            if r.item.kind != EventKind.MESSAGE_ECHOED or key not in by_key:
                rest.append(i)
                continue
            result = results[i]
            result.duplicate = True
            result.message_id = by_key[key].id
            result.confirmed = untold.pop(key, None)
        return rest

    async def _move_last_message_at(self, confirmed: Sequence[tuple[str, datetime]]) -> None:
        """A batch of confirmed echoes alone: moves each (conversation id, echo time)'s
        conversation's last message time forward to its latest echo's. The rows are locked
        in the order the batch upsert locks conversations (connection, participant), so that
        this batch and one of customers' messages cannot deadlock on them."""
        latest: dict[str, datetime] = {}
        for conversation_id, at in confirmed:
            latest[conversation_id] = _max(latest.get(conversation_id), at)
        ordered = sorted(latest)
        if self._arrays:
            await self._ex.execute(
                _MOVE_LAST_MESSAGE_AT,
                {"v": ordered, "a": [self._codec.ts(rows.utc(latest[v])) for v in ordered]},
            )
            return
        # SQLite has no arrays: the one prepared statement runs once per conversation.
        await self._ex.executemany(
            "UPDATE conversations SET last_message_at = :a"  # noqa: S608 - ours
            f" WHERE id = :v AND {earlier_than('last_message_at', ':a')}",
            [{"v": v, "a": self._codec.ts(rows.utc(latest[v]))} for v in ordered],
        )

    async def _store(
        self,
        routed: Sequence[RoutedItem],
        results: list[IngestResult],
        confirmed: Sequence[RoutedItem] = (),
    ) -> None:
        """Stores the items; ``confirmed``: echoes that confirmed our messages already, whose
        conversations move with the batch's (see :meth:`ingest`)."""
        drafts = _conversation_drafts([*routed, *confirmed])
        if self._native is not None:
            await self._ingest_together(self._native, routed, drafts, results)
        else:
            participants = await self._participants(sorted(drafts))
            conversations, marked = await self._conversations(drafts, participants)
            _attach(routed, results, participants, conversations)
            await self._lock_message_ids(routed)
            messages = _message_drafts(routed, results, lambda i: _id_of(results[i].conversation))
            await self._insert_messages(messages, results, marked, messages)
        await self._confirm_echoes(routed, results)
        await self._own_echoes(routed, results)
        known = await self._known_messages(routed, results)
        await self._apply_changes(routed, results, known)
        await self._fill_conversations(results, known, routed)

    async def _lock_message_ids(self, routed: Sequence[RoutedItem]) -> None:
        """Echoes of ours may be in the way of the ids an outcome batch is writing (see
        gateway.store.locks). Taken before the messages are written, after the
        participants and conversations, which no outcome batch waits for: held for as
        short a time as the rest of the transaction allows."""
        if not self._arrays:
            return
        lock = message_ids_lock(
            r.item.external_id for r in routed if r.item.kind == EventKind.MESSAGE_ECHOED
        )
        if lock is not None:
            await self._ex.fetch(*lock)

    # ---- participants and conversations, one statement at a time (SQLite) ----

    async def _participants(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Participant]:
        found: dict[tuple[str, str], Participant] = {}
        for chunk in _chunks(keys):
            # Customers write again and again: reading first makes the usual case one
            # statement, and ids are only minted for the customers actually new.
            await self._select_participants(chunk, found)
            missing = [key for key in chunk if key not in found]
            if not missing:
                continue
            for row in await self._insert(
                "participants",
                [
                    {"id": new_id("par"), "connection_id": conn_id, "channel_user_id": user_id}
                    for conn_id, user_id in missing
                ],
                "ON CONFLICT (connection_id, channel_user_id) DO NOTHING RETURNING *",
            ):
                p = rows.participant_from_row(self._codec, row)
                found[(p.connection_id, p.channel_user_id)] = p
            raced = [key for key in missing if key not in found]
            if raced:
                # Another transaction inserted them meanwhile (it committed: ON CONFLICT
                # waited for it), so they are visible now.
                await self._select_participants(raced, found)
        return found

    async def _select_participants(
        self, keys: Sequence[tuple[str, str]], found: dict[tuple[str, str], Participant]
    ) -> None:
        conn_sql, conn_params = in_list("c", sorted({c for c, _ in keys}))
        user_sql, user_params = in_list("u", sorted({u for _, u in keys}))
        # Replanned: participants grow with every new customer (see Executor.fetch).
        for row in await self._ex.fetch(
            f"SELECT * FROM participants WHERE connection_id IN {conn_sql}"  # noqa: S608
            f" AND channel_user_id IN {user_sql}",
            {**conn_params, **user_params},
            replan=True,
        ):
            p = rows.participant_from_row(self._codec, row)
            found[(p.connection_id, p.channel_user_id)] = p

    async def _conversations(
        self,
        drafts: dict[tuple[str, str], _ConversationDraft],
        participants: dict[tuple[str, str], Participant],
    ) -> tuple[dict[tuple[str, str], Conversation], set[str]]:
        """The conversations as stored, and the ids of those marked by a recent unsend or
        edit of a message not stored then."""
        by_participant: dict[tuple[str, str], tuple[_ConversationDraft, Participant]] = {}
        for key, draft in drafts.items():
            part = participants.get(key)
            if part is not None:
                by_participant[(key[0], part.id)] = (draft, part)
        now = datetime.now(UTC)
        found: dict[tuple[str, str], Conversation] = {}
        marked: set[str] = set()
        # Early changes older than this are purged, or due to be.
        fresh_after = now - TOMBSTONE_RETENTION
        for chunk in _chunks(sorted(by_participant)):
            # RETURNING gives the row as stored (new or merged); the participant is already
            # in hand, so no read-back join is needed.
            for row in await self._insert(
                "conversations",
                [self._conversation_row(*by_participant[k], now) for k in chunk],
                f"ON CONFLICT (connection_id, participant_id) DO UPDATE SET {_LATER_TIMES}"
                f" RETURNING {_CONVERSATION_RETURNING}",
            ):
                key = (row["connection_id"], row["participant_id"])
                found[key] = self._conversation(row, by_participant[key][1])
                mark = row["tombstone_at"]
                if mark is not None and self._codec.ts_in(mark) > fresh_after:
                    marked.add(row["id"])
        return found, marked

    def _conversation(self, row: Row, participant: Participant) -> Conversation:
        return Conversation(
            id=row["id"],
            tenant_id=row["tenant_id"],
            connection_id=row["connection_id"],
            channel=row["channel"],
            participant=participant,
            created_at=rows.opt_ts_in(self._codec, row["created_at"]),
            last_message_at=rows.opt_ts_in(self._codec, row["last_message_at"]),
            last_inbound_at=rows.opt_ts_in(self._codec, row["last_inbound_at"]),
            window_expires_at=rows.opt_ts_in(self._codec, row["window_expires_at"]),
        )

    def _conversation_row(
        self, d: _ConversationDraft, participant: Participant, now: datetime
    ) -> Params:
        return {
            "id": new_id("cnv"),
            "tenant_id": d.connection.tenant_id,
            "connection_id": d.connection.id,
            "channel": d.connection.channel,
            "participant_id": participant.id,
            "created_at": self._codec.ts(now),
            "last_message_at": rows.opt_ts(self._codec, d.last_message_at),
            "last_inbound_at": rows.opt_ts(self._codec, d.last_inbound_at),
            "window_expires_at": rows.opt_ts(self._codec, d.window_expires_at),
        }

    # ---- all at once (PostgreSQL) ----

    async def _ingest_together(
        self,
        pg: NativeExecutor,
        routed: Sequence[RoutedItem],
        drafts: dict[tuple[str, str], _ConversationDraft],
        results: list[IngestResult],
    ) -> None:
        """PostgreSQL: participants, conversations and received messages in one statement
        (``_UPSERT_TOGETHER``); the messages it leaves (echoes, and those of marked
        conversations) are written after it as on the other path."""
        # Each message with a customer gets its conversation from the statement; until then
        # it names none (the statement fills it in).
        messages = _message_drafts(
            routed, results, lambda i: _UNKNOWN if routed[i].item.customer_id else None
        )
        now = datetime.now(UTC)
        fresh_after = now - TOMBSTONE_RETENTION
        keys = sorted(drafts)
        document = _json([_customer_json(key[1], drafts[key]) for key in keys])
        received = [
            rows.received_message_json(m, now)
            for _, m in messages
            if m.direction is Direction.INBOUND
        ]
        found = await pg.fetch_tuples(
            _UPSERT_TOGETHER,
            {
                "rows": self._codec.json_document(document),
                "messages": self._codec.json_document(_json(received)),
                "now": now,
                "fresh": fresh_after,
            },
        )
        participants: dict[tuple[str, str], Participant] = {}
        conversations: dict[tuple[str, str], Conversation] = {}
        marked: set[str] = set()
        inserted: set[str] = set()
        for row in found:
            if row[1] is None:
                inserted.add(row[0])
                continue
            pid, conn_id, user_id, username, name, picture, fetched = row[:7]
            cid, created, last_msg, last_in, window, mark = row[7:]
            fetched = rows.opt_ts_in(self._codec, fetched)
            part = Participant(pid, conn_id, user_id, username, name, picture, fetched)
            connection = drafts[(conn_id, user_id)].connection
            participants[(conn_id, user_id)] = part
            conversations[(conn_id, pid)] = Conversation(
                cid,
                connection.tenant_id,
                conn_id,
                connection.channel,
                part,
                created,
                last_msg,
                last_in,
                window,
            )
            if mark is not None and mark > fresh_after:
                marked.add(cid)
        _attach(routed, results, participants, conversations)
        for i, m in messages:
            conversation = results[i].conversation
            if conversation is None:
                # Every customer comes back from the statement (see _UPSERT_TOGETHER).
                raise RuntimeError("a customer's conversation is missing from the batch upsert")
            m.conversation_id = conversation.id
        await self._lock_message_ids(routed)
        # What the statement did not write: echoes, and messages of marked conversations.
        left = [
            (i, m)
            for i, m in messages
            if m.direction is Direction.OUTBOUND or m.conversation_id in marked
        ]
        await self._insert_messages(messages, results, marked, left, inserted)

    # ---- messages ----

    async def _insert_messages(
        self,
        messages: list[tuple[int, Message]],
        results: list[IngestResult],
        marked: set[str],
        left: list[tuple[int, Message]],
        inserted: Iterable[str] = (),
    ) -> None:
        """Writes the batch's messages not written yet (``left``; ``inserted``: the ids of
        those already inserted) and tells each item's result what became of its message."""
        inserted = set(inserted)
        if left:
            if marked:
                await self._apply_early_changes([m for _, m in left if m.conversation_id in marked])
            inserted |= await self._insert_received([m for _, m in left])
        for i, message in messages:
            if message.id in inserted:
                results[i].message = message
                results[i].message_id = message.id
                results[i].deleted_before_arrival = message.deleted
            else:
                results[i].duplicate = True

    async def _insert_received(self, messages: Sequence[Message]) -> set[str]:
        """Inserts the messages not stored yet; returns the ids of those it inserted."""
        now = datetime.now(UTC)
        if self._native is not None:
            document = _json([rows.received_message_json(m, now) for m in messages])
            found = await self._native.fetch_tuples(
                _INSERT_MESSAGES, {"rows": self._codec.json_document(document)}
            )
            return {message_id for (message_id,) in found}
        inserted: set[str] = set()
        for chunk in _chunks(messages):
            for row in await self._insert(
                "messages",
                [rows.message_params(self._codec, m, now) for m in chunk],
                "ON CONFLICT DO NOTHING RETURNING id",
            ):
                inserted.add(row["id"])
        return inserted

    async def _apply_early_changes(self, messages: Sequence[Message]) -> None:
        """Applies to the messages (of marked conversations) the edits and unsends that came
        before them. An unsend wins: the message is stored deleted, edited or not."""
        by_key = {(m.connection_id, m.external_id): m for m in messages if m.external_id}
        for chunk in _chunks(sorted(by_key)):
            conn_sql, conn_params = in_list("c", sorted({c for c, _ in chunk}))
            ext_sql, ext_params = in_list("x", sorted({x for _, x in chunk}))
            where = f"WHERE connection_id IN {conn_sql} AND external_id IN {ext_sql}"
            for row in await self._ex.fetch(
                # One round trip for both kinds; the tombstones' branch has no edit.
                "SELECT connection_id, external_id, NULL AS text, NULL AS edit_count"  # noqa: S608
                f" FROM message_tombstones {where} UNION ALL"
                " SELECT connection_id, external_id, text, edit_count"
                f" FROM message_early_edits {where}",
                {**conn_params, **ext_params},
            ):
                # The two IN-lists match their cross product: pairs not asked for too.
                m = by_key.get((row["connection_id"], row["external_id"]))
                if m is None:
                    continue
                if row["edit_count"] is None:
                    m.deleted = True
                else:
                    m.text = row["text"] or m.text
                    m.edit_count = int(row["edit_count"])

    async def _confirm_echoes(
        self, routed: Sequence[RoutedItem], results: list[IngestResult]
    ) -> None:
        """An echo of a message the gateway sent confirms it rather than being stored."""
        wanted = {
            (r.connection.id, r.item.external_id): r.item.occurred_at
            for r, result in zip(routed, results, strict=True)
            if r.item.kind == EventKind.MESSAGE_ECHOED and result.duplicate and r.item.external_id
        }
        if not wanted:
            return
        confirmed = await OutboundWriter(self._ex, self._codec).confirm(
            [(conn, ext, at) for (conn, ext), at in wanted.items()]
        )
        by_key = {(m.connection_id, m.external_id): m for m in confirmed}
        for r, result in zip(routed, results, strict=True):
            if r.item.kind == EventKind.MESSAGE_ECHOED and result.duplicate:
                result.confirmed = by_key.pop((r.connection.id, r.item.external_id), None)
                if result.confirmed is not None:
                    result.message_id = result.confirmed.id

    async def _own_echoes(self, routed: Sequence[RoutedItem], results: list[IngestResult]) -> None:
        """Meta may echo a message before answering the Send API call that sent it, or
        before that answer is recorded: the echo's message id is then unknown and it is
        stored as a new message. When its conversation has a message of the same text being
        sent through the gateway right now (leased), it is taken for that message's echo and
        not announced as one sent from another app; recording the send's outcome folds it
        into ours, or its retry adopts it. A message waiting for a retry is not being
        sent: an echo of its text meanwhile is another app's (a human agent's) and is
        announced, unless the attempt may have been delivered (it then stays leased)."""
        fresh = [
            result
            for r, result in zip(routed, results, strict=True)
            if r.item.kind == EventKind.MESSAGE_ECHOED
            and not result.duplicate
            and result.message is not None
        ]
        if not fresh:
            return
        pending = await OutboundWriter(self._ex, self._codec).pending_texts(
            [result.message.conversation_id for result in fresh if result.message is not None],
            datetime.now(UTC),
        )
        if not pending:
            return
        for result in fresh:
            message = result.message
            if message is not None and (message.conversation_id, message.text or "") in pending:
                result.own_echo = True

    async def _known_messages(
        self, routed: Sequence[RoutedItem], results: list[IngestResult]
    ) -> dict[tuple[str, str], _Known]:
        """Stored messages the items refer to (by external id), after this batch's inserts.
        A duplicate is looked up for its id, unless known already (the echo that confirmed
        our message)."""
        wanted: set[tuple[str, str]] = set()
        for r, result in zip(routed, results, strict=True):
            if r.item.external_id and (
                r.item.kind not in MESSAGE_KINDS or (result.duplicate and not result.message_id)
            ):
                wanted.add((r.connection.id, r.item.external_id))
            if r.item.reply_to_external_id:
                wanted.add((r.connection.id, r.item.reply_to_external_id))
        found: dict[tuple[str, str], _Known] = {}
        for chunk in _chunks(sorted(wanted)):
            conn_sql, conn_params = in_list("c", sorted({c for c, _ in chunk}))
            ext_sql, ext_params = in_list("x", sorted({x for _, x in chunk}))
            for row in await self._ex.fetch(
                "SELECT id, connection_id, external_id, conversation_id, edit_count"  # noqa: S608
                f" FROM messages WHERE connection_id IN {conn_sql}"
                f" AND external_id IN {ext_sql}",
                {**conn_params, **ext_params},
            ):
                found[(row["connection_id"], row["external_id"])] = _known(row)
        return found

    async def _apply_changes(
        self,
        routed: Sequence[RoutedItem],
        results: list[IngestResult],
        known: dict[tuple[str, str], _Known],
    ) -> None:
        edits: dict[str, Params] = {}
        deletes: set[str] = set()
        tombstones: dict[tuple[str, str], datetime] = {}
        early_edits: dict[tuple[str, str], tuple[str, int]] = {}
        # The early edits of each message in this batch that are not older than another one
        # of the batch: all older than the one kept already, if it is not replaced.
        early_results: dict[tuple[str, str], list[IngestResult]] = {}
        marks: set[str] = set()
        inserted_at: dict[str, int] | None = None
        for j, (r, result) in enumerate(zip(routed, results, strict=True)):
            item = r.item
            reply = known.get((r.connection.id, item.reply_to_external_id))
            if reply is not None:
                result.reply_to_message_id = reply.id
            target = known.get((r.connection.id, item.external_id))
            if target is None:
                # Without a customer there is no conversation to mark, nor a lock to order
                # the change and its message: Meta's unsends and edits name the customer.
                if not item.external_id or result.conversation is None:
                    continue
                key = (r.connection.id, item.external_id)
                if item.kind == EventKind.MESSAGE_DELETED:
                    tombstones.setdefault(key, item.occurred_at)
                    marks.add(result.conversation.id)
                elif item.kind == EventKind.MESSAGE_EDITED:
                    kept = early_edits.get(key)
                    if kept is None or item.edit_count > kept[1]:
                        # An edit that does not say its text keeps the text known so far.
                        text = item.text or (kept[0] if kept else "")
                        early_edits[key] = (text, item.edit_count)
                    if kept is not None and item.edit_count < kept[1]:
                        result.superseded = True
                    else:
                        early_results.setdefault(key, []).append(result)
                    marks.add(result.conversation.id)
                continue
            if not result.message_id:
                result.message_id = target.id
            if item.kind == EventKind.MESSAGE_DELETED:
                deletes.add(target.id)
                if inserted_at is None:
                    inserted_at = _inserted_at(results)
                late = inserted_at.get(target.id, -1)
                if late > j:
                    # Its unsend came earlier in this very batch, so its MessageDeleted
                    # precedes it in the outbox: not announced, as with a tombstone.
                    _deleted_before_arrival(results[late])
            elif item.kind == EventKind.MESSAGE_EDITED and item.edit_count < target.edit_count:
                result.superseded = True
            elif item.kind == EventKind.MESSAGE_EDITED:
                # An older edit arriving late does not overwrite a newer one.
                target.edit_count = max(item.edit_count, target.edit_count)
                # Empty when the edit does not say its text: the text stored is kept.
                text = item.text or edits.get(target.id, {}).get("text", "")
                edits[target.id] = {"id": target.id, "text": text, "n": target.edit_count}
                if inserted_at is None:
                    inserted_at = _inserted_at(results)
                late = inserted_at.get(target.id, -1)
                if late > j:
                    # Its edit came earlier in this very batch, so its MessageEdited
                    # precedes it in the outbox: announced edited, as with an early edit.
                    _edited_before_arrival(results[late], text, target.edit_count)
        if edits:
            await self._ex.executemany(
                "UPDATE messages SET text = COALESCE(NULLIF(:text, ''), text), edit_count = :n"
                " WHERE id = :id",
                [edits[k] for k in sorted(edits)],
            )
        if deletes:
            await self._ex.executemany(
                "UPDATE messages SET deleted = :d WHERE id = :id",
                [{"d": True, "id": k} for k in sorted(deletes)],
            )
        if marks:
            replaced = await self._add_early_changes(tombstones, early_edits, marks)
            for key, edited in early_results.items():
                # One kept already is as new or newer: these edits change nothing (a repeat
                # of that one was announced with it).
                if key not in replaced:
                    for result in edited:
                        result.superseded = True

    async def _add_early_changes(
        self,
        tombstones: dict[tuple[str, str], datetime],
        early_edits: dict[tuple[str, str], tuple[str, int]],
        conversation_ids: set[str],
    ) -> set[tuple[str, str]]:
        """Unsends and edits of messages not stored: the message may still come, as Meta
        reorders deliveries and retries a failed one for up to 36 hours. Answers the
        messages whose kept early edit this batch created or replaced."""
        now = self._codec.ts(datetime.now(UTC))
        unsent = [
            {
                "connection_id": conn_id,
                "external_id": external_id,
                "deleted_at": self._codec.ts(rows.utc(deleted_at)),
                "created_at": now,
            }
            for (conn_id, external_id), deleted_at in sorted(tombstones.items())
        ]
        for chunk in _chunks(unsent):
            # A retried unsend finds its tombstone there already: the first one stands.
            await self._insert(
                "message_tombstones",
                chunk,
                "ON CONFLICT (connection_id, external_id) DO NOTHING RETURNING external_id",
            )
        edited = [
            {
                "connection_id": conn_id,
                "external_id": external_id,
                "text": text,
                "edit_count": edit_count,
                "created_at": now,
            }
            for (conn_id, external_id), (text, edit_count) in sorted(early_edits.items())
        ]
        replaced: set[tuple[str, str]] = set()
        for chunk in _chunks(edited):
            # Only a newer edit replaces the one kept (a retried or older one arriving late
            # does not), and its retention starts over.
            rows_ = await self._insert(
                "message_early_edits",
                chunk,
                "ON CONFLICT (connection_id, external_id) DO UPDATE"
                " SET text = COALESCE(NULLIF(excluded.text, ''), message_early_edits.text),"
                " edit_count = excluded.edit_count, created_at = excluded.created_at"
                " WHERE excluded.edit_count > message_early_edits.edit_count"
                " RETURNING connection_id, external_id",
            )
            replaced.update((row["connection_id"], row["external_id"]) for row in rows_)
        # This transaction upserted these conversations: it holds their rows already.
        for chunk in _chunks(sorted(conversation_ids)):
            ids_sql, params = in_list("v", chunk)
            await self._ex.execute(
                f"UPDATE conversations SET tombstone_at = :now WHERE id IN {ids_sql}",  # noqa: S608
                {"now": now, **params},
            )
        return replaced

    async def _fill_conversations(
        self,
        results: list[IngestResult],
        known: dict[tuple[str, str], _Known],
        routed: Sequence[RoutedItem],
    ) -> None:
        """Items without a customer (a read without sender) belong to their message's
        conversation, when that message is known."""
        missing: dict[int, str] = {}
        for i, (r, result) in enumerate(zip(routed, results, strict=True)):
            target = known.get((r.connection.id, r.item.external_id))
            if result.conversation is None and target is not None:
                missing[i] = target.conversation_id
        if not missing:
            return
        ids_sql, params = in_list("v", sorted(set(missing.values())))
        found = {
            row["id"]: rows.conversation_from_row(self._codec, row)
            for row in await self._ex.fetch(
                f"SELECT {rows.CONVERSATION_COLUMNS} FROM {rows.CONVERSATION_FROM}"  # noqa: S608
                f" WHERE c.id IN {ids_sql}",
                params,
            )
        }
        for i, conversation_id in missing.items():
            results[i].conversation = found.get(conversation_id)

    # ---- the outbox, claimed for the relay of this process ----

    async def add_claimed_events(
        self, events: Sequence[Event], lease_until: datetime
    ) -> list[OutboxEntry]:
        """Adds the events to the outbox already claimed until ``lease_until`` and returns
        the entries this transaction added (an event_id already there is left alone, as
        ``add_events`` does), in the order given, so that the caller's relay can publish
        them right after the commit. If it never does, the lease lapses and the sweep
        publishes them: claiming here saves the relay a transaction per batch."""
        if not events:
            return []
        # Encoded once, for the outbox row and for the bus (OutboxEntry.wire).
        wires = {e.event_id: encode_event(e) for e in events}
        if self._native is not None:
            found = await self._native.fetch_tuples(
                _ADD_CLAIMED_EVENTS, self._claimed_params(events, wires, lease_until)
            )
            return _entries(events, wires, {event_id: int(seq) for seq, event_id in found})
        now = self._codec.ts(datetime.now(UTC))
        lease = self._codec.ts(rows.utc(lease_until))
        seqs: dict[str, int] = {}
        for chunk in _chunks(events):
            # Rows go in in list order, so seq keeps the order of the events.
            values, params = bulk.values_list(
                [
                    {
                        "i": e.event_id,
                        "e": self._codec.json_document(wires[e.event_id]),
                        "n": now,
                        "l": lease,
                        "a": 1,
                    }
                    for e in chunk
                ]
            )
            for row in await self._ex.fetch(
                "INSERT INTO outbox (event_id, event, created_at, claimed_until, attempts)"  # noqa: S608
                f" VALUES {values} ON CONFLICT (event_id) DO NOTHING"
                " RETURNING seq, event_id",
                params,
            ):
                seqs[row["event_id"]] = int(row["seq"])
        return _entries(events, wires, seqs)

    async def add_claimed_events_deferred(
        self, events: Sequence[Event], lease_until: datetime
    ) -> Callable[[], Awaitable[list[OutboxEntry]]]:
        """:meth:`add_claimed_events`, its entries read by awaiting the function returned:
        on PostgreSQL the statement goes out now and its answer comes back with the next
        one that waits, the COMMIT included (the entries can be read once the transaction
        ended); elsewhere it runs now."""
        if self._native is None or not events:
            return answered(await self.add_claimed_events(events, lease_until))
        wires = {e.event_id: encode_event(e) for e in events}
        sent = await self._native.fetch_deferred(
            _ADD_CLAIMED_EVENTS, self._claimed_params(events, wires, lease_until)
        )

        async def read() -> list[OutboxEntry]:
            seqs = {r["event_id"]: int(r["seq"]) for r in await sent.rows()}
            return _entries(events, wires, seqs)

        return read

    def _claimed_params(
        self, events: Sequence[Event], wires: dict[str, bytes], lease_until: datetime
    ) -> Params:
        """PostgreSQL: _ADD_CLAIMED_EVENTS's parameters."""
        return {
            "rows": self._codec.json_document(_claimed_document(events, wires)),
            "n": self._codec.ts(datetime.now(UTC)),
            "l": self._codec.ts(rows.utc(lease_until)),
        }

    # ---- quarantine ----

    async def quarantine(self, entries: Sequence[QuarantinedDelivery], *, keep: int) -> None:
        if not entries:
            return
        await self._ex.executemany(
            "INSERT INTO inbound_quarantine"
            " (channel, reason, account_id, body, body_size, received_at)"
            " VALUES (:channel, :reason, :account, :body, :size, :at)",
            [
                {
                    "channel": e.channel,
                    "reason": e.reason,
                    "account": e.account_id,
                    "body": bytes(e.body),
                    "size": e.body_size or len(e.body),
                    "at": self._codec.ts(rows.utc(e.received_at)),
                }
                for e in entries
            ],
        )
        # seq only grows, so the newest ``keep`` rows are those above max(seq) - keep.
        await self._ex.execute(
            "DELETE FROM inbound_quarantine"
            " WHERE seq <= (SELECT MAX(seq) FROM inbound_quarantine) - :keep",
            {"keep": keep},
        )

    async def list_quarantine(
        self, *, channel: str = "", limit: int = 100
    ) -> list[QuarantinedDelivery]:
        where = "WHERE channel = :channel" if channel else ""
        found = await self._ex.fetch(
            f"SELECT * FROM inbound_quarantine {where} ORDER BY seq DESC LIMIT :limit",  # noqa: S608
            {"channel": channel, "limit": limit},
        )
        return [_quarantined(self._codec, row) for row in found]


def _inserted_at(results: Sequence[IngestResult]) -> dict[str, int]:
    """Our id of each message this batch inserted -> the index of the item it came from."""
    return {r.message.id: i for i, r in enumerate(results) if r.message is not None}


def _deleted_before_arrival(result: IngestResult) -> None:
    result.deleted_before_arrival = True
    if result.message is not None:
        result.message.deleted = True


def _edited_before_arrival(result: IngestResult, text: str, edit_count: int) -> None:
    if result.message is not None:
        result.message.text = text or result.message.text
        result.message.edit_count = edit_count


def _known(row: Row) -> _Known:
    return _Known(
        id=row["id"], conversation_id=row["conversation_id"], edit_count=int(row["edit_count"])
    )


def _quarantined(codec: Codec, row: Row) -> QuarantinedDelivery:
    return QuarantinedDelivery(
        channel=row["channel"],
        reason=row["reason"],
        body=bytes(row["body"]),
        received_at=codec.ts_in(row["received_at"]),
        account_id=row["account_id"],
        body_size=int(row["body_size"]),
        seq=int(row["seq"]),
    )


def _claimed_document(events: Sequence[Event], wires: dict[str, bytes]) -> bytes:
    """PostgreSQL: one JSON document of ``{"i": event id, "e": event}`` spliced from the
    encoded events (ids are ASCII letters and digits), so that no event is encoded twice
    and no dumper runs per value."""
    return (
        b"["
        + b",".join(b'{"i":"%s","e":%s}' % (e.event_id.encode(), wires[e.event_id]) for e in events)
        + b"]"
    )


def _entries(
    events: Sequence[Event], wires: dict[str, bytes], seqs: dict[str, int]
) -> list[OutboxEntry]:
    """The entries added, in the order of ``events``; ``seqs``: event id -> seq of those the
    statement added (consumed)."""
    added: list[OutboxEntry] = []
    for e in events:
        seq = seqs.pop(e.event_id, None)  # pop: an event listed twice is added once
        if seq is not None:
            added.append(OutboxEntry(seq=seq, event=e, attempts=1, wire=wires[e.event_id]))
    return added
