"""Batch ingestion of webhook items (``Tx.ingest_inbound``) and the quarantine, in SQL both
backends understand.

A batch holds the items of many concurrent webhook requests (group commit), so every step
is one multi-row statement per chunk rather than one statement per item. Rows are written
in key order so that two concurrent batches lock shared rows in the same order and cannot
deadlock each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.domain.events import EventKind
from gateway.domain.ids import new_id
from gateway.domain.inbound import (
    MESSAGE_KINDS,
    WINDOW,
    IngestResult,
    QuarantinedDelivery,
    RoutedItem,
    message_from_item,
)
from gateway.domain.models import Connection, Conversation, Message, Participant
from gateway.store import rows
from gateway.store.outbound import OutboundWriter
from gateway.store.rows import Codec, Params, Row
from gateway.store.sqltx import Executor, in_list, later

# Rows per statement: keeps every statement under SQLite's bound on host parameters.
CHUNK = 200


def _chunks(values: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def values_list(rows_: Sequence[Params]) -> tuple[str, Params]:
    """``(:r0_a, :r0_b), (:r1_a, ...)`` and its parameters, for a multi-row VALUES."""
    parts: list[str] = []
    params: Params = {}
    for i, row in enumerate(rows_):
        names = []
        for key, value in row.items():
            name = f"r{i}_{key}"
            params[name] = value
            names.append(":" + name)
        parts.append("(" + ", ".join(names) + ")")
    return ", ".join(parts), params


def _max(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b > a else a


@dataclass(slots=True)
class _ConversationDraft:
    connection: Connection
    participant: Participant
    last_message_at: datetime | None = None
    last_inbound_at: datetime | None = None


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

    async def ingest(self, routed: Sequence[RoutedItem]) -> list[IngestResult]:
        results = [IngestResult() for _ in routed]
        if not routed:
            return results
        participants = await self._participants(routed)
        conversations = await self._conversations(routed, participants)
        for result, r in zip(results, routed, strict=True):
            part = participants.get((r.connection.id, r.item.customer_id))
            if part is not None:
                result.conversation = conversations.get((r.connection.id, part.id))
        await self._insert_messages(routed, results)
        await self._confirm_echoes(routed, results)
        known = await self._known_messages(routed, results)
        await self._apply_changes(routed, results, known)
        await self._fill_conversations(results, known, routed)
        return results

    # ---- participants and conversations ----

    async def _participants(
        self, routed: Sequence[RoutedItem]
    ) -> dict[tuple[str, str], Participant]:
        keys = sorted({(r.connection.id, r.item.customer_id) for r in routed if r.item.customer_id})
        found: dict[tuple[str, str], Participant] = {}
        for chunk in _chunks(keys):
            values, params = values_list(
                [{"id": new_id("par"), "c": conn_id, "u": user_id} for conn_id, user_id in chunk]
            )
            await self._ex.execute(
                "INSERT INTO participants (id, connection_id, channel_user_id)"  # noqa: S608
                f" VALUES {values} ON CONFLICT (connection_id, channel_user_id) DO NOTHING",
                params,
            )
            conn_sql, conn_params = in_list("c", sorted({c for c, _ in chunk}))
            user_sql, user_params = in_list("u", sorted({u for _, u in chunk}))
            for row in await self._ex.fetch(
                f"SELECT * FROM participants WHERE connection_id IN {conn_sql}"  # noqa: S608
                f" AND channel_user_id IN {user_sql}",
                {**conn_params, **user_params},
            ):
                p = rows.participant_from_row(self._codec, row)
                found[(p.connection_id, p.channel_user_id)] = p
        return found

    async def _conversations(
        self,
        routed: Sequence[RoutedItem],
        participants: dict[tuple[str, str], Participant],
    ) -> dict[tuple[str, str], Conversation]:
        drafts: dict[tuple[str, str], _ConversationDraft] = {}
        for r in routed:
            part = participants.get((r.connection.id, r.item.customer_id))
            if part is None:
                continue
            draft = drafts.setdefault(
                (r.connection.id, part.id), _ConversationDraft(r.connection, part)
            )
            if r.item.kind in MESSAGE_KINDS:
                draft.last_message_at = _max(draft.last_message_at, r.item.occurred_at)
            if r.item.opens_window:
                draft.last_inbound_at = _max(draft.last_inbound_at, r.item.occurred_at)
        now = datetime.now(UTC)
        found: dict[tuple[str, str], Conversation] = {}
        times = ", ".join(
            f"{col} = {later('conversations', col)}"
            for col in ("last_message_at", "last_inbound_at", "window_expires_at")
        )
        for chunk in _chunks(sorted(drafts)):
            values, params = values_list([self._conversation_row(drafts[k], now) for k in chunk])
            await self._ex.execute(
                "INSERT INTO conversations (id, tenant_id, connection_id, channel,"  # noqa: S608
                " participant_id, created_at, last_message_at, last_inbound_at,"
                f" window_expires_at) VALUES {values}"
                f" ON CONFLICT (connection_id, participant_id) DO UPDATE SET {times}",
                params,
            )
            part_sql, part_params = in_list("p", [participant_id for _, participant_id in chunk])
            for row in await self._ex.fetch(
                f"SELECT {rows.CONVERSATION_COLUMNS} FROM {rows.CONVERSATION_FROM}"  # noqa: S608
                f" WHERE c.participant_id IN {part_sql}",
                part_params,
            ):
                conv = rows.conversation_from_row(self._codec, row)
                found[(conv.connection_id, conv.participant.id)] = conv
        return found

    def _conversation_row(self, d: _ConversationDraft, now: datetime) -> Params:
        window = None if d.last_inbound_at is None else d.last_inbound_at + WINDOW
        return {
            "id": new_id("cnv"),
            "tenant_id": d.connection.tenant_id,
            "connection_id": d.connection.id,
            "channel": d.connection.channel,
            "participant_id": d.participant.id,
            "created_at": self._codec.ts(now),
            "last_message_at": rows.opt_ts(self._codec, d.last_message_at),
            "last_inbound_at": rows.opt_ts(self._codec, d.last_inbound_at),
            "window_expires_at": rows.opt_ts(self._codec, window),
        }

    # ---- messages ----

    async def _insert_messages(
        self, routed: Sequence[RoutedItem], results: list[IngestResult]
    ) -> None:
        first_of: dict[tuple[str, str], int] = {}
        drafts: list[tuple[int, Message]] = []
        for i, r in enumerate(routed):
            conv = results[i].conversation
            if r.item.kind not in MESSAGE_KINDS or conv is None:
                continue
            key = (r.connection.id, r.item.external_id)
            if r.item.external_id and key in first_of:
                results[i].duplicate = True  # a repeat within this very batch
                continue
            first_of[key] = i
            drafts.append((i, message_from_item(r.item, r.connection, conv.id, new_id("msg"))))
        drafts.sort(key=lambda d: (d[1].connection_id, d[1].external_id, d[1].id))
        now = datetime.now(UTC)
        inserted: set[str] = set()
        for chunk in _chunks(drafts):
            batch = [rows.message_params(self._codec, m, now) for _, m in chunk]
            values, params = values_list(batch)
            columns = ", ".join(batch[0])
            found = await self._ex.fetch(
                f"INSERT INTO messages ({columns}) VALUES {values}"  # noqa: S608
                " ON CONFLICT DO NOTHING RETURNING id",
                params,
            )
            inserted.update(row["id"] for row in found)
        for i, message in drafts:
            if message.id in inserted:
                results[i].message = message
                results[i].message_id = message.id
            else:
                results[i].duplicate = True

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

    async def _known_messages(
        self, routed: Sequence[RoutedItem], results: list[IngestResult]
    ) -> dict[tuple[str, str], _Known]:
        """Stored messages the items refer to (by external id), after this batch's inserts."""
        wanted: set[tuple[str, str]] = set()
        for r, result in zip(routed, results, strict=True):
            if r.item.external_id and (r.item.kind not in MESSAGE_KINDS or result.duplicate):
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
        for r, result in zip(routed, results, strict=True):
            item = r.item
            reply = known.get((r.connection.id, item.reply_to_external_id))
            if reply is not None:
                result.reply_to_message_id = reply.id
            target = known.get((r.connection.id, item.external_id))
            if target is None:
                continue
            if not result.message_id:
                result.message_id = target.id
            if item.kind == EventKind.MESSAGE_DELETED:
                deletes.add(target.id)
            elif item.kind == EventKind.MESSAGE_EDITED and item.edit_count >= target.edit_count:
                # An older edit arriving late does not overwrite a newer one.
                target.edit_count = max(item.edit_count, target.edit_count)
                edits[target.id] = {"id": target.id, "text": item.text, "n": target.edit_count}
        if edits:
            await self._ex.executemany(
                "UPDATE messages SET text = :text, edit_count = :n WHERE id = :id",
                [edits[k] for k in sorted(edits)],
            )
        if deletes:
            await self._ex.executemany(
                "UPDATE messages SET deleted = :d WHERE id = :id",
                [{"d": True, "id": k} for k in sorted(deletes)],
            )

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
