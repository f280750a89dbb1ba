from __future__ import annotations

from pathlib import Path

import pytest

from gateway.domain.errors import ConfigError
from gateway.security.keyring import DecryptionError, KeyRing, generate_key_spec


def test_round_trip_binds_the_ciphertext_to_its_row() -> None:
    ring = KeyRing.from_spec(generate_key_spec("k1"))
    sealed = ring.encrypt(b"IGAAtoken", b"conn_1")
    assert sealed.key_id == "k1"
    assert b"IGAAtoken" not in sealed.data
    assert ring.decrypt(sealed.data, b"conn_1") == b"IGAAtoken"
    with pytest.raises(DecryptionError):
        ring.decrypt(sealed.data, b"conn_2")


def test_old_keys_decrypt_and_the_first_key_encrypts() -> None:
    old = generate_key_spec("old")
    new = generate_key_spec("new")
    sealed_old = KeyRing.from_spec(old).encrypt(b"secret", b"row")
    ring = KeyRing.from_spec(f"{new},{old}")
    assert ring.decrypt(sealed_old.data, b"row") == b"secret"
    assert ring.needs_rotation(sealed_old.data)
    sealed_new = ring.encrypt(b"secret", b"row")
    assert sealed_new.key_id == "new"
    assert not ring.needs_rotation(sealed_new.data)


def test_tampered_ciphertext_does_not_open() -> None:
    ring = KeyRing.from_spec(generate_key_spec())
    data = bytearray(ring.encrypt(b"secret", b"row").data)
    data[-1] ^= 1
    with pytest.raises(DecryptionError):
        ring.decrypt(bytes(data), b"row")


def test_malformed_key_specs_name_each_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        KeyRing.from_spec("k1:c2hvcnQ=,bad id:xx,k1:" + "A" * 44)
    assert len(caught.value.problems) == 3


def test_embedded_default_generates_a_private_key_file_once(tmp_path: Path) -> None:
    first = KeyRing.load("", data_dir=str(tmp_path), allow_generate=True)
    path = tmp_path / "encryption.keys"
    assert path.stat().st_mode & 0o777 == 0o600
    second = KeyRing.load("", data_dir=str(tmp_path), allow_generate=True)
    assert second.decrypt(first.encrypt(b"x", b"r").data, b"r") == b"x"


def test_keys_are_required_outside_the_embedded_default(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SWITCHBOARD_ENCRYPTION_KEYS"):
        KeyRing.load("", data_dir=str(tmp_path), allow_generate=False)
