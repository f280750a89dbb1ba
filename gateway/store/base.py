"""What both SQL stores share above the driver: the unit of work and the outbox/bus side."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

from gateway.domain.store import BusState, OutboxEntry, Tx
from gateway.store import rows
from gateway.store.migrate import SCHEMA_TABLE, Migration, load_migrations, pending
from gateway.store.rows import Codec, Params
from gateway.store.sqltx import Executor, SqlTx, any_of

# Keeps IN-lists well under SQLite's bound on host parameters.
_CHUNK = 500


def _chunks(values: Sequence[int]) -> list[list[int]]:
    unique = sorted(set(values))
    return [unique[i : i + _CHUNK] for i in range(0, len(unique), _CHUNK)]


class SqlStore(abc.ABC):
    """Implements the driver-independent half of :class:`gateway.domain.store.Store`."""

    backend: str
    codec: Codec
    lock_clause: str
    timestamp_type: str
    tx_class: type[SqlTx] = SqlTx

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    @abc.abstractmethod
    def _session(self) -> AbstractAsyncContextManager[Executor]:
        """An executor inside a fresh transaction, committed when the block succeeds. It
        also runs a migration's script of several statements."""

    def _pipelined_session(self) -> AbstractAsyncContextManager[Executor]:
        """A session whose statements may go out without waiting for each other's rows."""
        return self._session()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @abc.abstractmethod
    async def _lock_migrations(self, ex: Executor) -> None:
        """Keeps other processes from migrating until this transaction ends."""

    @abc.abstractmethod
    async def _run_migration(self, ex: Executor, migration: Migration) -> None: ...

    @abc.abstractmethod
    async def _schema_table_exists(self, ex: Executor) -> bool: ...

    async def ping(self) -> None:
        async with self._session() as ex:
            await ex.fetch("SELECT 1 AS one")

    async def migrate(self) -> list[str]:
        applied_now: list[str] = []
        for migration in load_migrations(self.backend):
            # One transaction per migration; the applied set is re-read under the lock
            # because another process may have migrated while this one waited.
            async with self._session() as ex:
                await self._lock_migrations(ex)
                await ex.execute(
                    f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} ("
                    f" version TEXT PRIMARY KEY, applied_at {self.timestamp_type} NOT NULL)"
                )
                found = await ex.fetch(f"SELECT version FROM {SCHEMA_TABLE}")  # noqa: S608
                if not pending([migration], {r["version"] for r in found}):
                    continue
                await self._run_migration(ex, migration)
                await ex.execute(
                    f"INSERT INTO {SCHEMA_TABLE} (version, applied_at) VALUES (:v, :now)",  # noqa: S608
                    {"v": migration.version, "now": self.codec.ts(datetime.now(UTC))},
                )
            applied_now.append(migration.version)
        return applied_now

    async def applied_migrations(self) -> list[str]:
        async with self._session() as ex:
            if not await self._schema_table_exists(ex):
                return []
            found = await ex.fetch(f"SELECT version FROM {SCHEMA_TABLE} ORDER BY version")  # noqa: S608
        return [r["version"] for r in found]

    @asynccontextmanager
    async def transaction(self, *, pipelined: bool = False) -> AsyncIterator[Tx]:
        session = self._pipelined_session() if pipelined else self._session()
        async with session as executor:
            yield self.tx_class(executor, self.codec, lock_clause=self.lock_clause)

    # ---- the outbox relay's side ----

    async def claim_outbox(
        self, *, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxEntry]:
        """Each claim counts as an attempt: the first claim returns attempts == 1."""
        async with self._session() as ex:
            found = await ex.fetch(
                "UPDATE outbox SET claimed_until = :lease, attempts = attempts + 1"  # noqa: S608
                " WHERE seq IN (SELECT seq FROM outbox WHERE published_at IS NULL"
                " AND (claimed_until IS NULL OR claimed_until <= :now)"
                f" ORDER BY seq LIMIT :limit{self.lock_clause})"
                " RETURNING seq, event, attempts",
                {
                    "lease": self.codec.ts(rows.utc(lease_until)),
                    "now": self.codec.ts(rows.utc(now)),
                    "limit": limit,
                },
            )
        entries = [rows.outbox_entry_from_row(self.codec, r) for r in found]
        return sorted(entries, key=lambda e: e.seq)

    async def extend_outbox_claims(
        self, seqs: Sequence[int], *, now: datetime, lease_until: datetime
    ) -> None:
        await self._by_seqs(
            "UPDATE outbox SET claimed_until = :lease"
            " WHERE {seqs} AND published_at IS NULL AND claimed_until > :now",
            seqs,
            {"lease": self.codec.ts(rows.utc(lease_until)), "now": self.codec.ts(rows.utc(now))},
        )

    async def mark_published(self, seqs: Sequence[int], now: datetime) -> None:
        await self._by_seqs(
            "UPDATE outbox SET published_at = :now, claimed_until = NULL"
            " WHERE {seqs} AND published_at IS NULL",
            seqs,
            {"now": self.codec.ts(rows.utc(now))},
        )

    async def delete_published(self, seqs: Sequence[int]) -> None:
        await self._by_seqs("DELETE FROM outbox WHERE {seqs}", seqs)

    async def hold_published(self, seqs: Sequence[int], appended_at: datetime) -> None:
        await self._by_seqs(
            "UPDATE outbox SET published_at = :at, claimed_until = NULL, held = TRUE"
            " WHERE {seqs} AND published_at IS NULL",
            seqs,
            {"at": self.codec.ts(rows.utc(appended_at))},
        )

    async def release_held(self, before: datetime, drop_kinds: Collection[str]) -> int:
        # The predicate spelled as the partial index's (``WHERE held``), so that both
        # statements read the few held entries only, never the published ones kept.
        kind = "event->>'kind'" if self.backend == "postgres" else "json_extract(event, '$.kind')"
        where, params = any_of(kind, "k", sorted(drop_kinds), arrays=self.backend == "postgres")
        before_ts = self.codec.ts(rows.utc(before))
        async with self._session() as ex:
            dropped = await ex.execute(
                f"DELETE FROM outbox WHERE held AND published_at < :before AND {where}",  # noqa: S608
                {"before": before_ts, **params},
            )
            kept = await ex.execute(
                "UPDATE outbox SET held = FALSE WHERE held AND published_at < :before",
                {"before": before_ts},
            )
        return dropped + kept

    async def reclaim_held(self, now: datetime) -> int:
        async with self._session() as ex:
            return await ex.execute(
                "UPDATE outbox SET published_at = NULL, claimed_until = :now, held = FALSE"
                " WHERE held",
                {"now": self.codec.ts(rows.utc(now))},
            )

    async def _by_seqs(self, sql: str, seqs: Sequence[int], params: Params | None = None) -> None:
        """Runs ``sql`` on the outbox entries ``seqs``, its ``{seqs}`` the condition on them,
        in chunks that keep SQLite's IN-lists within bounds, in one session."""
        if not seqs:
            return
        async with self._session() as ex:
            for chunk in _chunks(seqs):
                where, chunk_params = any_of("seq", "q", chunk, arrays=self.backend == "postgres")
                await ex.execute(sql.format(seqs=where), {**(params or {}), **chunk_params})

    async def purge_published(self, before: datetime) -> int:
        params = {"before": self.codec.ts(rows.utc(before))}
        async with self._session() as ex:
            purged = await ex.execute(
                "DELETE FROM outbox WHERE published_at IS NOT NULL AND published_at < :before",
                params,
            )
            # Every ack and attempt whose entry is gone, including those written after it
            # was purged (an ack for an entry delivered before a restart lands whenever it
            # lands).
            for table in ("bus_acks", "bus_attempts"):
                await ex.execute(
                    f"DELETE FROM {table} WHERE NOT EXISTS"  # noqa: S608 - our table names
                    f" (SELECT 1 FROM outbox o WHERE o.seq = {table}.seq)"
                )
            return purged

    async def purge_tombstones(self, before: datetime) -> int:
        """Tombstones and early edits alike: both wait for a message that may never come."""
        params = {"before": self.codec.ts(rows.utc(before))}
        async with self._session() as ex:
            unsends = await ex.execute(
                "DELETE FROM message_tombstones WHERE created_at < :before", params
            )
            edits = await ex.execute(
                "DELETE FROM message_early_edits WHERE created_at < :before", params
            )
        return unsends + edits

    # ---- the in-process bus's durable state ----

    async def bus_load(self, *, since: datetime) -> BusState:
        params = {"since": self.codec.ts(rows.utc(since))}
        async with self._session() as ex:
            found = await ex.fetch(
                "SELECT seq, event, attempts, published_at FROM outbox"
                " WHERE published_at >= :since ORDER BY seq",
                params,
            )
            groups = await ex.fetch("SELECT group_name FROM bus_groups")
            acks = await ex.fetch(
                "SELECT a.group_name, a.seq FROM bus_acks a JOIN outbox o ON o.seq = a.seq"
                " WHERE o.published_at >= :since",
                params,
            )
            tried = await ex.fetch(
                "SELECT t.group_name, t.seq, t.attempts FROM bus_attempts t"
                " JOIN outbox o ON o.seq = t.seq WHERE o.published_at >= :since",
                params,
            )
        acked: dict[str, set[int]] = {r["group_name"]: set() for r in groups}
        for r in acks:
            acked.setdefault(r["group_name"], set()).add(int(r["seq"]))
        attempts: dict[str, dict[int, int]] = {}
        for r in tried:
            attempts.setdefault(r["group_name"], {})[int(r["seq"])] = int(r["attempts"])
        entries = [rows.outbox_entry_from_row(self.codec, r) for r in found]
        return BusState(entries, acked, attempts)

    async def bus_add_group(self, group: str, now: datetime) -> None:
        async with self._session() as ex:
            await ex.execute(
                "INSERT INTO bus_groups (group_name, created_at) VALUES (:g, :now)"
                " ON CONFLICT (group_name) DO NOTHING",
                {"g": group, "now": self.codec.ts(rows.utc(now))},
            )

    async def bus_ack(self, group: str, seqs: Sequence[int]) -> None:
        if not seqs:
            return
        async with self._session() as ex:
            await ex.executemany(
                "INSERT INTO bus_acks (group_name, seq) VALUES (:g, :seq)"
                " ON CONFLICT (group_name, seq) DO NOTHING",
                [{"g": group, "seq": s} for s in sorted(set(seqs))],
            )

    async def bus_record_attempts(self, group: str, attempts: Mapping[int, int]) -> None:
        if not attempts:
            return
        async with self._session() as ex:
            await ex.executemany(
                "INSERT INTO bus_attempts (group_name, seq, attempts) VALUES (:g, :seq, :n)"
                " ON CONFLICT (group_name, seq) DO UPDATE SET attempts = excluded.attempts"
                " WHERE excluded.attempts > bus_attempts.attempts",
                [{"g": group, "seq": s, "n": n} for s, n in sorted(attempts.items())],
            )
