"""Statements over a batch of rows, one statement per batch on both backends.

PostgreSQL takes each column as one binary array and expands them with ``unnest``: one
statement text whatever the batch size (psycopg prepares it once), one round trip, and
no per-row statement as ``executemany`` sends. SQLite has no arrays: a VALUES list for
inserts, and ``executemany`` (one C loop in the driver's thread) for updates.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.store.rows import Params

# PostgreSQL types of the columns batched statements carry, for their array casts.
PG_TYPES = {
    "id": "text",
    "tenant_id": "text",
    "connection_id": "text",
    "conversation_id": "text",
    "participant_id": "text",
    "message_id": "text",
    "channel": "text",
    "channel_user_id": "text",
    "direction": "text",
    "status": "text",
    "external_id": "text",
    "sender_id": "text",
    "text": "text",
    "attachments": "jsonb",
    "content": "jsonb",
    "idempotency_key": "text",
    "error": "jsonb",
    "attempts": "integer",
    "number": "integer",
    "next_attempt_at": "timestamptz",
    "created_at": "timestamptz",
    "sent_at": "timestamptz",
    "confirmed_at": "timestamptz",
    "claimed_until": "timestamptz",
    "started_at": "timestamptz",
    "finished_at": "timestamptz",
    "last_message_at": "timestamptz",
    "last_inbound_at": "timestamptz",
    "window_expires_at": "timestamptz",
    "deleted": "boolean",
    "edit_count": "integer",
    "deleted_at": "timestamptz",
    "unordered": "boolean",
}


def values_list(rows_: Sequence[Params]) -> tuple[str, Params]:
    """``(:r0_a, :r0_b), (:r1_a, ...)`` and its parameters, for a multi-row VALUES."""
    if not rows_:
        return "", {}
    keys = list(rows_[0])
    # Every row of a batch has the same keys: build the names once per batch, not per row.
    parts: list[str] = []
    params: Params = {}
    for i, row in enumerate(rows_):
        names = [f"r{i}_{key}" for key in keys]
        params.update(zip(names, row.values(), strict=True))
        parts.append("(:" + ", :".join(names) + ")")
    return ", ".join(parts), params


def columns_of(rows_: Sequence[Params]) -> tuple[list[str], Params, str]:
    """The rows as PostgreSQL arrays: column names, one list per column, and the
    ``unnest`` arguments with their casts."""
    columns = list(rows_[0])
    params = {c: [r[c] for r in rows_] for c in columns}
    arrays = ", ".join(f":{c}::{PG_TYPES[c]}[]" for c in columns)
    return columns, params, arrays


def insert(table: str, rows_: Sequence[Params], suffix: str, *, arrays: bool) -> tuple[str, Params]:
    """A multi-row INSERT of rows with the same keys, ``suffix`` after the rows."""
    if arrays:
        columns, params, unnest = columns_of(rows_)
        names = ", ".join(columns)
        source = f"SELECT * FROM unnest({unnest})"  # noqa: S608 - names are ours
        return f"INSERT INTO {table} ({names}) {source} {suffix}", params
    names = ", ".join(rows_[0])
    values, params = values_list(rows_)
    return f"INSERT INTO {table} ({names}) VALUES {values} {suffix}", params  # noqa: S608


def update_by_key(table: str, key: str, rows_: Sequence[Params]) -> tuple[str, Params]:
    """PostgreSQL only: one UPDATE setting each row's other columns where ``key`` matches."""
    columns, params, unnest = columns_of(rows_)
    sets = ", ".join(f"{c} = u.{c}" for c in columns if c != key)
    return (
        f"UPDATE {table} SET {sets} FROM unnest({unnest}) AS u ({', '.join(columns)})"  # noqa: S608
        f" WHERE {table}.{key} = u.{key}",
        params,
    )
