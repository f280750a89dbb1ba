"""The outbound side of the store (``Tx`` methods of gateway.services.outbound), in SQL both
backends understand.

An outbound message is inserted already leased to the process that will make its first
attempt, so the retry worker never claims it while that attempt runs; recording an
attempt's outcome releases the lease. An echo webhook may overtake the Send API's answer
and be stored first as a message of its own: recording the answer folds it into ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from gateway.domain.models import Conversation, DeliveryError, Message
from gateway.domain.outbound import DeliveryAttempt
from gateway.store import rows
from gateway.store.rows import Codec
from gateway.store.sqltx import Executor

_SENT_FIELDS = (
    "status",
    "external_id",
    "error",
    "attempts",
    "next_attempt_at",
    "sent_at",
    "confirmed_at",
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
        if message.external_id:
            echoed = await self._ex.fetch(
                "DELETE FROM messages WHERE connection_id = :conn AND external_id = :ext"
                " AND id <> :id AND direction = 'OUTBOUND' AND sent_at IS NULL"
                " RETURNING created_at",
                {"conn": message.connection_id, "ext": message.external_id, "id": message.id},
            )
            if echoed and message.confirmed_at is None:
                message.confirmed_at = self._codec.ts_in(echoed[0]["created_at"])
        params = rows.message_params(self._codec, message, datetime.now(UTC))
        sets = ", ".join(f"{col} = :{col}" for col in _SENT_FIELDS)
        await self._ex.execute(
            f"UPDATE messages SET {sets}, claimed_until = :lease WHERE id = :id",  # noqa: S608
            {
                **{col: params[col] for col in _SENT_FIELDS},
                "lease": rows.opt_ts(self._codec, lease_until),
                "id": message.id,
            },
        )
        if attempt is not None:
            await self._ex.execute(
                "INSERT INTO message_attempts (message_id, number, started_at, finished_at, error)"
                " VALUES (:id, :n, :started, :finished, :error)"
                " ON CONFLICT (message_id, number) DO NOTHING",
                {
                    "id": message.id,
                    "n": attempt.number,
                    "started": self._codec.ts(rows.utc(attempt.started_at)),
                    "finished": self._codec.ts(rows.utc(attempt.finished_at)),
                    "error": None
                    if attempt.error is None
                    else self._codec.json(_error_json(attempt.error)),
                },
            )
        return message

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
