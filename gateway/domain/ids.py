"""Identifiers: time-ordered, URL-safe, prefixed by what they name.

Every stored row and event gets one (three per inbound message), so minting is on the
hot path: random bits come from the OS in blocks rather than a system call per id, and
digits from a table of digit pairs rather than a loop per digit.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
# Every pair of digits, indexed by the 10 bits they spell.
_PAIRS = tuple(a + b for a in _ALPHABET for b in _ALPHABET)
# 80-bit random numbers drawn per system call.
_BLOCK = 256


class _RandomBits:
    """80-bit numbers from the OS's random source, drawn ``_BLOCK`` at a time.

    ``next`` on a list iterator is one step under the GIL, so threads never share a
    number; a forked child starts a block of its own (``os.register_at_fork``), so parent
    and child never mint the same bits either.
    """

    def __init__(self) -> None:
        self._numbers: Iterator[int] = iter(())

    def __call__(self) -> int:
        number: int | None = next(self._numbers, None)
        while number is None:
            block = os.urandom(10 * _BLOCK)
            self._numbers = iter(
                [int.from_bytes(block[i : i + 10], "big") for i in range(0, len(block), 10)]
            )
            number = next(self._numbers, None)
        return number

    def forget(self) -> None:
        self._numbers = iter(())


_random80 = _RandomBits()
os.register_at_fork(after_in_child=_random80.forget)

# The time digits of the last millisecond an id was minted in: ids minted together share them.
_last_time: tuple[int, str] = (-1, "")


def _time_digits(millis: int) -> str:
    global _last_time
    last = _last_time
    if last[0] == millis:
        return last[1]
    p = _PAIRS
    digits = (
        p[(millis >> 40) & 1023]
        + p[(millis >> 30) & 1023]
        + p[(millis >> 20) & 1023]
        + p[(millis >> 10) & 1023]
        + p[millis & 1023]
    )
    _last_time = (millis, digits)
    return digits


def new_id(prefix: str) -> str:
    """A ULID-style id (48-bit millisecond time + 80 random bits) such as ``conn_01j...``:
    the prefix, 10 digits of time and 16 of randomness in Crockford base 32.

    Ids of one prefix sort by creation time, which keyset pagination relies on.
    """
    r = _random80()
    p = _PAIRS
    return (
        f"{prefix}_{_time_digits(time.time_ns() // 1_000_000)}"
        f"{p[r >> 70]}{p[(r >> 60) & 1023]}{p[(r >> 50) & 1023]}{p[(r >> 40) & 1023]}"
        f"{p[(r >> 30) & 1023]}{p[(r >> 20) & 1023]}{p[(r >> 10) & 1023]}{p[r & 1023]}"
    )


# Lower-case RFC 4648 base 32, the digits ``derived_id`` has always used: event ids must not
# change across versions, or a redelivery after an upgrade would look like a new event.
_RFC4648 = "abcdefghijklmnopqrstuvwxyz234567"
_RFC_PAIRS = tuple(a + b for a in _RFC4648 for b in _RFC4648)


def derived_id(prefix: str, *parts: str) -> str:
    """An id that is a function of ``parts`` (a 128-bit BLAKE2b digest in 26 base-32
    digits): the same happening always gets the same id, so its copies dedupe."""
    digest = hashlib.blake2b(
        "\x00".join(parts).encode("utf-8", "surrogatepass"), digest_size=16
    ).digest()
    # 128 bits read as 26 digits of 5 bits, the last one padded with two zero bits.
    v = int.from_bytes(digest, "big") << 2
    p = _RFC_PAIRS
    return prefix + "_" + "".join([p[(v >> shift) & 1023] for shift in range(120, -1, -10)])
