"""Connection status changes and the ``ConnectionChanged`` event that announces each one.

Every change of a connection's status is saved together with its event in one
transaction, so subscribers learn of exactly the changes that happened. Any path that
meets a dead token (refresh, send) calls :func:`mark_needs_reauth`. After the commit the
caller's ``notify`` (the outbox relay of its process, when it runs one) publishes the
event at once rather than at the relay's next sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from gateway.domain.events import Event, EventKind, new_event
from gateway.domain.models import Connection, ConnectionStatus
from gateway.domain.store import Store, Tx

log = logging.getLogger(__name__)

# Called after a transaction that added events committed.
Notify = Callable[[], None]


def nothing() -> None:
    """A ``Notify`` for processes without a relay: the sweep of another one publishes."""


def _ts(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def status_name(status: ConnectionStatus | None) -> str:
    return f"CONNECTION_STATUS_{status.value}" if status else "CONNECTION_STATUS_UNSPECIFIED"


def connection_json(conn: Connection) -> dict[str, Any]:
    """``switchboard.v1.Connection`` in the protobuf JSON mapping (proto field names);
    empty fields are left out, as the mapping does."""
    account = {
        "external_id": conn.account.external_id,
        "username": conn.account.username,
        "display_name": conn.account.display_name,
        "picture_url": conn.account.picture_url,
        "page_id": conn.account.page_id,
    }
    data: dict[str, Any] = {
        "id": conn.id,
        "tenant_id": conn.tenant_id,
        "channel": conn.channel,
        "status": status_name(conn.status),
        "account": {k: v for k, v in account.items() if v},
        "scopes": list(conn.scopes),
        "token_expires_at": _ts(conn.token_expires_at),
        "connected_at": _ts(conn.connected_at),
        "last_event_at": _ts(conn.last_event_at),
        "last_error": conn.last_error,
        "login_flow": conn.login_flow,
        "created_at": _ts(conn.created_at),
        "updated_at": _ts(conn.updated_at),
    }
    return {k: v for k, v in data.items() if v not in (None, "", [])}


def connection_changed(
    conn: Connection, previous: ConnectionStatus | None, reason: str, now: datetime
) -> Event:
    payload: dict[str, Any] = {
        "connection": connection_json(conn),
        "previous_status": status_name(previous),
    }
    if reason:
        payload["reason"] = reason
    return new_event(
        tenant_id=conn.tenant_id,
        connection_id=conn.id,
        channel=conn.channel,
        kind=EventKind.CONNECTION_CHANGED,
        occurred_at=now,
        received_at=now,
        payload=payload,
    )


async def change_status(
    tx: Tx, conn: Connection, status: ConnectionStatus, reason: str, now: datetime
) -> Connection:
    """Saves ``conn`` with its new status and adds the event, in the caller's transaction."""
    previous = conn.status
    conn.status = status
    await tx.save_connection(conn)
    await tx.add_events([connection_changed(conn, previous, reason, now)])
    return conn


async def mark_needs_reauth(
    store: Store, connection_id: str, reason: str, *, notify: Notify = nothing
) -> Connection | None:
    """CONNECTED → NEEDS_REAUTH with ``reason`` (never a secret) and its event; None when
    the connection is gone or no longer CONNECTED (nothing changes then)."""
    now = datetime.now(UTC)
    async with store.transaction() as tx:
        conn = await tx.get_connection(connection_id, for_update=True)
        if conn is None or conn.status is not ConnectionStatus.CONNECTED:
            return None
        conn.last_error = reason
        await change_status(tx, conn, ConnectionStatus.NEEDS_REAUTH, reason, now)
    notify()
    log.warning(
        "connection needs re-authorization",
        extra={"connection_id": conn.id, "tenant_id": conn.tenant_id, "channel": conn.channel},
    )
    return conn
