"""Small helpers shared by the tests."""

from __future__ import annotations

import contextlib
import secrets
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it, so runs never collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying an API token."""
    return (("authorization", f"Bearer {token}"),)


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database of the same server."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@contextlib.contextmanager
def fresh_database(admin_url: str, label: str) -> Iterator[str]:
    """A PostgreSQL database of its own, dropped afterwards even if a test blocked
    connections to it (the store-down tests do)."""
    name = f"switchboard_{label}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
