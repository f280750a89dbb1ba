"""Ids: the layout pagination and the wire rely on (prefix, 10 time digits, 16 random)."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.domain import ids

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def digits(value: int, length: int) -> str:
    """The reference: ``value`` in Crockford base 32, ``length`` digits, most significant
    first."""
    out = ""
    for _ in range(length):
        out = ALPHABET[value & 31] + out
        value >>= 5
    return out


@given(millis=st.integers(0, 2**48 - 1), rand=st.binary(min_size=10, max_size=10))
def test_an_id_is_its_time_then_its_random_bits_in_crockford_base32(
    millis: int, rand: bytes
) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ids.time, "time_ns", lambda: millis * 1_000_000 + 999_999)
        patch.setattr(ids, "_random80", lambda: int.from_bytes(rand, "big"))
        made = ids.new_id("msg")
    assert made == "msg_" + digits(millis, 10) + digits(int.from_bytes(rand, "big"), 16)


def test_ids_of_one_prefix_sort_by_creation_time(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    for millis in (1, 31, 32, 1_700_000_000_000, 1_700_000_000_001, 2**48 - 1):
        monkeypatch.setattr(ids.time, "time_ns", lambda m=millis: m * 1_000_000)
        made.append(ids.new_id("evt"))
    assert made == sorted(made)
    assert len({len(m) for m in made}) == 1


def test_fresh_ids_are_distinct_and_url_safe() -> None:
    made = {ids.new_id("conn") for _ in range(1000)}
    assert len(made) == 1000
    assert all(m.startswith("conn_") and set(m[5:]) <= set(ALPHABET) for m in made)


def test_random_bits_come_from_the_os_a_block_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = ids.os.urandom

    def urandom(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(ids.os, "urandom", urandom)
    source = ids._RandomBits()
    drawn = [source() for _ in range(2 * ids._BLOCK + 1)]
    assert calls == [10 * ids._BLOCK] * 3
    assert len(set(drawn)) == len(drawn)
    assert all(0 <= n < 2**80 for n in drawn)


def test_a_forked_child_mints_random_bits_of_its_own() -> None:
    ids.new_id("msg")  # the parent holds a block
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the next id's random digits and leave at once
        os.write(write, ids.new_id("msg")[-16:].encode())
        os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 64).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert len(child) == 16
    assert child != ids.new_id("msg")[-16:]


@given(parts=st.lists(st.text(), min_size=1, max_size=3))
def test_a_derived_id_is_the_base32_of_the_parts_digest(parts: list[str]) -> None:
    """The layout event ids have always had: an upgrade must not change them, or Meta's
    retry of a delivery made before it would become a new event."""
    joined = "\x00".join(parts).encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(joined, digest_size=16).digest()
    expected = "evt_" + base64.b32encode(digest).decode().rstrip("=").lower()
    assert ids.derived_id("evt", *parts) == expected
