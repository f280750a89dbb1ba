"""Ids: the layout pagination and the wire rely on (prefix, 10 time digits, 16 random)."""

from __future__ import annotations

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
        patch.setattr(ids.os, "urandom", lambda n: rand[:n])
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
