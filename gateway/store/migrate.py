"""Versioned schema migrations shipped as package data.

``migrations/<backend>/NNNN_name.sql`` files are applied in version order, each in its
own transaction, and recorded in ``schema_migrations``. The backends run them (locking
differs); this module only finds and splits them.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from gateway.domain.errors import ConfigError

if TYPE_CHECKING:
    from gateway.domain.store import Store

SCHEMA_TABLE = "schema_migrations"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Migration:
    version: str  # the file name without ".sql", e.g. "0001_init"
    sql: str

    def statements(self) -> list[str]:
        """The script split into statements (SQLite executes one at a time)."""
        out: list[str] = []
        pending = ""
        for line in self.sql.splitlines(keepends=True):
            pending += line
            # complete_statement understands quotes and CREATE TRIGGER bodies.
            if sqlite3.complete_statement(pending):
                if _has_code(pending):
                    out.append(pending.strip())
                pending = ""
        if _has_code(pending):
            out.append(pending.strip())
        return out


def _has_code(sql: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in sql.splitlines())


def load_migrations(backend: str) -> list[Migration]:
    folder = resources.files("gateway.store").joinpath("migrations", backend)
    found = [
        Migration(version=entry.name.removesuffix(".sql"), sql=entry.read_text("utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found, key=lambda m: m.version)


def pending(migrations: list[Migration], applied: set[str]) -> list[Migration]:
    return [m for m in migrations if m.version not in applied]


async def ensure_schema(store: Store) -> None:
    """The schema a process needs before it uses the store: SQLite (the embedded default)
    migrates itself; PostgreSQL must have been migrated, a deploy step, so a schema behind
    this code stops the process with the command that fixes it."""
    if store.backend == "sqlite":
        applied = await store.migrate()
        if applied:
            log.info("applied migrations", extra={"versions": ",".join(applied)})
        return
    done = set(await store.applied_migrations())
    behind = [m.version for m in pending(load_migrations(store.backend), done)]
    if not behind:
        return
    if not done:
        raise ConfigError(["the database is not migrated: run `switchboard migrate`"])
    raise ConfigError(
        [f"the database schema is behind ({', '.join(behind)} pending): run `switchboard migrate`"]
    )
