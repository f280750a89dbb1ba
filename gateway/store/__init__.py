"""The store adapters: PostgreSQL (production) and SQLite (the embedded default).

``open_store(url)`` picks the backend from the URL; both implement
:class:`gateway.domain.store.Store`::

    async with open_store("sqlite:///./var/switchboard.db") as store:
        await store.migrate()
"""

from __future__ import annotations

from gateway.domain.errors import ConfigError
from gateway.domain.store import Store
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import MEMORY, SqliteStore

__all__ = ["PostgresStore", "SqliteStore", "open_store", "sqlite_path"]

_SQLITE = "sqlite://"


def sqlite_path(url: str) -> str:
    """``sqlite:///rel/path`` -> ``rel/path``, ``sqlite:////abs/path`` -> ``/abs/path``,
    ``sqlite://:memory:`` -> ``:memory:``."""
    rest = url.removeprefix(_SQLITE)
    if rest in (MEMORY, "/" + MEMORY):
        return MEMORY
    path = rest.removeprefix("/")
    if not rest.startswith("/") or not path or "?" in path:
        raise ConfigError(
            [
                "SWITCHBOARD_DATABASE_URL: a SQLite URL is sqlite:///relative/path, "
                "sqlite:////absolute/path or sqlite://:memory:"
            ]
        )
    return path


def open_store(url: str, *, pool_size: int = 10) -> Store:
    """A store for ``url``, not yet open: use ``async with`` or call ``open()``.
    ``pool_size``: the PostgreSQL connections it may hold at once (SQLite has one)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(url, max_size=pool_size)
    if scheme == "sqlite":
        return SqliteStore(sqlite_path(url))
    # Only the scheme is echoed: the rest of a database URL may hold a password.
    raise ConfigError(
        [
            f"SWITCHBOARD_DATABASE_URL: unsupported scheme {scheme or '(none)'!r}; "
            "use postgresql://... or sqlite:///path"
        ]
    )
