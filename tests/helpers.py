"""Small helpers shared by the tests."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it, so runs never collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying an API token."""
    return (("authorization", f"Bearer {token}"),)
