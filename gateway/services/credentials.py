"""Sealing access tokens into credentials, opening them, and re-encrypting after rotation.

The sealed payload is a small JSON document (the token and its schedule), encrypted by the
key ring with the connection id as associated data: a ciphertext copied onto another row
does not open.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from gateway.config import Secret
from gateway.domain.connect import AccessToken
from gateway.domain.models import Credential
from gateway.domain.store import Store
from gateway.security.keyring import DecryptionError, KeyRing

log = logging.getLogger(__name__)

PAYLOAD_VERSION = 1
_ROTATE_BATCH = 200


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _parse_ts(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


def seal(keyring: KeyRing, connection_id: str, token: AccessToken) -> Credential:
    payload = orjson.dumps(
        {
            "v": PAYLOAD_VERSION,
            "access_token": token.value.reveal(),
            "issued_at": _ts(token.issued_at),
            "expires_at": _ts(token.expires_at),
            "refreshable_after": _ts(token.refreshable_after),
        }
    )
    sealed = keyring.encrypt(payload, connection_id.encode())
    return Credential(connection_id=connection_id, key_id=sealed.key_id, ciphertext=sealed.data)


def unseal(keyring: KeyRing, credential: Credential) -> AccessToken:
    """Raises DecryptionError when the credential does not open (or is not ours)."""
    raw = keyring.decrypt(credential.ciphertext, credential.connection_id.encode())
    try:
        data = orjson.loads(raw)
        issued_at = _parse_ts(data["issued_at"])
        value = data["access_token"]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise DecryptionError("the credential's payload is malformed") from None
    if issued_at is None or not isinstance(value, str):
        raise DecryptionError("the credential's payload is malformed")
    return AccessToken(
        value=Secret(value),
        issued_at=issued_at,
        expires_at=_parse_ts(data.get("expires_at")),
        refreshable_after=_parse_ts(data.get("refreshable_after")),
    )


@dataclass(frozen=True, slots=True)
class RotationReport:
    total: int
    rotated: int
    current: int
    failed: int


async def rotate_credentials(store: Store, keyring: KeyRing) -> RotationReport:
    """Re-encrypts every credential not sealed with the primary key; one that does not
    open with any key of the ring is counted as failed and left as it is."""
    total = rotated = current = failed = 0
    after = ""
    while True:
        async with store.transaction() as tx:
            batch = await tx.list_credentials(after_connection_id=after, limit=_ROTATE_BATCH)
            for credential in batch:
                total += 1
                if not keyring.needs_rotation(credential.ciphertext):
                    current += 1
                    continue
                aad = credential.connection_id.encode()
                try:
                    plaintext = keyring.decrypt(credential.ciphertext, aad)
                except DecryptionError as exc:
                    failed += 1
                    log.error(
                        "a credential does not open with the key ring",
                        extra={"connection_id": credential.connection_id, "error": exc.message},
                    )
                    continue
                sealed = keyring.encrypt(plaintext, aad)
                await tx.put_credential(
                    Credential(
                        connection_id=credential.connection_id,
                        key_id=sealed.key_id,
                        ciphertext=sealed.data,
                        created_at=credential.created_at,
                    )
                )
                rotated += 1
        if len(batch) < _ROTATE_BATCH:
            return RotationReport(total=total, rotated=rotated, current=current, failed=failed)
        after = batch[-1].connection_id
