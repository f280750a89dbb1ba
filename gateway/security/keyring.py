"""AES-256-GCM encryption of credentials with a key ring that supports rotation.

``SWITCHBOARD_ENCRYPTION_KEYS`` is ``id:base64key[,id:base64key...]``: every key decrypts,
the first one encrypts. Each ciphertext is a versioned envelope that names its key::

    b"\\x01" | len(key_id) | key_id | nonce (12 bytes) | AES-GCM ciphertext + tag

The caller passes the row's identity (the connection id) as associated data, so a
ciphertext copied onto another row does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.domain.errors import ConfigError, SwitchboardError

log = logging.getLogger(__name__)

ENVELOPE_VERSION = 1
_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
KEY_FILE_NAME = "encryption.keys"


class DecryptionError(SwitchboardError):
    """A ciphertext could not be opened (unknown key, tampered, or wrong row)."""

    reason = "DECRYPTION_FAILED"


@dataclass(frozen=True, slots=True)
class Sealed:
    key_id: str
    data: bytes


def _parse_spec(spec: str) -> tuple[list[tuple[str, bytes]], list[str]]:
    keys: list[tuple[str, bytes]] = []
    problems: list[str] = []
    seen: set[str] = set()
    for position, item in enumerate(filter(None, (p.strip() for p in spec.split(","))), 1):
        key_id, sep, encoded = item.partition(":")
        where = f"SWITCHBOARD_ENCRYPTION_KEYS: key #{position}"
        if not sep or not _KEY_ID.match(key_id):
            problems.append(f"{where}: expected id:base64key with an id of [A-Za-z0-9_.-]")
            continue
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            problems.append(f"{where} ({key_id}): the key is not valid base64")
            continue
        if len(raw) != 32:
            problems.append(f"{where} ({key_id}): the key is {len(raw)} bytes, AES-256 needs 32")
            continue
        if key_id in seen:
            problems.append(f"{where}: the id {key_id!r} appears twice")
            continue
        seen.add(key_id)
        keys.append((key_id, raw))
    return keys, problems


def validate_key_ring_spec(spec: str) -> list[str]:
    """One line per problem in an ``SWITCHBOARD_ENCRYPTION_KEYS`` value (empty is fine)."""
    return _parse_spec(spec)[1] if spec else []


def generate_key_spec(key_id: str = "k1") -> str:
    return f"{key_id}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"


class KeyRing:
    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ConfigError(["SWITCHBOARD_ENCRYPTION_KEYS: no key given"])
        self._primary = keys[0][0]
        self._keys = {key_id: AESGCM(raw) for key_id, raw in keys}

    @classmethod
    def from_spec(cls, spec: str) -> KeyRing:
        keys, problems = _parse_spec(spec)
        if problems:
            raise ConfigError(problems)
        return cls(keys)

    @classmethod
    def load(cls, spec: str, *, data_dir: str, allow_generate: bool) -> KeyRing:
        """From the spec; else from (or, embedded only, into) the key file in data_dir."""
        if spec:
            return cls.from_spec(spec)
        path = Path(data_dir) / KEY_FILE_NAME
        if path.exists():
            return cls.from_spec(path.read_text().strip())
        if not allow_generate:
            raise ConfigError(
                [
                    "SWITCHBOARD_ENCRYPTION_KEYS: required outside the embedded default "
                    "(id:base64key, 32-byte keys)"
                ]
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two processes starting at once must not write two different keys.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls.from_spec(path.read_text().strip())
        with os.fdopen(fd, "w") as handle:
            handle.write(generate_key_spec() + "\n")
        log.warning(
            "generated an encryption key file; keep it with the database and back it up",
            extra={"path": str(path)},
        )
        return cls.from_spec(path.read_text().strip())

    @property
    def primary_key_id(self) -> str:
        return self._primary

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> Sealed:
        key_id = self._primary
        nonce = os.urandom(12)
        body = self._keys[key_id].encrypt(nonce, plaintext, associated_data)
        header = bytes([ENVELOPE_VERSION, len(key_id)]) + key_id.encode()
        return Sealed(key_id=key_id, data=header + nonce + body)

    def decrypt(self, envelope: bytes, associated_data: bytes) -> bytes:
        if len(envelope) < 2 or envelope[0] != ENVELOPE_VERSION:
            raise DecryptionError("unknown envelope version")
        id_len = envelope[1]
        key_id = envelope[2 : 2 + id_len].decode(errors="replace")
        key = self._keys.get(key_id)
        if key is None:
            raise DecryptionError(f"no key {key_id!r} in the key ring")
        nonce = envelope[2 + id_len : 14 + id_len]
        try:
            return key.decrypt(nonce, envelope[14 + id_len :], associated_data)
        except InvalidTag as exc:
            raise DecryptionError("the ciphertext does not open with its key") from exc

    def needs_rotation(self, envelope: bytes) -> bool:
        return len(envelope) < 2 or envelope[2 : 2 + envelope[1]].decode(errors="replace") != (
            self._primary
        )
