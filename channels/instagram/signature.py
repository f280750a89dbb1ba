"""Meta's webhook signature: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>``."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

HEADER = "X-Hub-Signature-256"
_PREFIX = "sha256="


def sign(body: bytes, secret: bytes) -> str:
    return _PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def check_signature(body: bytes, header: str | None, secrets: Iterable[bytes]) -> str:
    """``"ok"`` or why not (``"missing"``, ``"malformed"``, ``"mismatch"``), for metrics.

    Checked on the raw bytes, never on re-serialized JSON, in constant time per secret.
    """
    if not header:
        return "missing"
    if not header.startswith(_PREFIX) or len(header) != len(_PREFIX) + 64:
        return "malformed"
    given = header[len(_PREFIX) :].lower().encode()
    matched = False
    for secret in secrets:
        expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
        matched |= hmac.compare_digest(expected, given)
    return "ok" if matched else "mismatch"
