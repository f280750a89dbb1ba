"""Versioned schema migrations shipped as package data.

``migrations/<backend>/NNNN_name.sql`` files are applied in version order, each in its
own transaction, and recorded in ``schema_migrations``. The backends run them (locking
differs); this module only finds and splits them.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from importlib import resources

SCHEMA_TABLE = "schema_migrations"


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
