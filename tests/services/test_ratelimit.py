"""The rate limiters, in-process and on one Redis: a look at the bucket (``take=False``)
answers as a take would, takes nothing, and sees pauses; decisions asked together travel
together (on Redis, one script call per bucket and batch) and are still made one after
the other, as separate calls would be."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from gateway.domain.outbound import RateCategory
from gateway.services.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter

RATES = {RateCategory.TEXT: 2.0, RateCategory.MEDIA: 1.0}


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    if request.param == "memory":
        yield MemoryRateLimiter(RATES)
        return
    url = str(request.getfixturevalue("redis_url"))
    prefix = f"{request.getfixturevalue('redis_prefix')}rl:{secrets.token_hex(3)}:"
    shared = RedisRateLimiter(url, RATES, prefix=prefix)
    try:
        yield shared
    finally:
        await shared.aclose()


def now() -> datetime:
    # Real time: the Redis buckets expire by Redis's clock.
    return datetime.now(UTC)


async def test_a_look_takes_no_token(limiter: RateLimiter) -> None:
    at = now()
    for _ in range(5):
        assert (await limiter.acquire("a1", RateCategory.TEXT, at, take=False)).ok
    # Both tokens are still there for the takes.
    assert (await limiter.acquire("a1", RateCategory.TEXT, at)).ok
    assert (await limiter.acquire("a1", RateCategory.TEXT, at)).ok
    empty = await limiter.acquire("a1", RateCategory.TEXT, at, take=False)
    assert not empty.ok
    assert empty.wait_s == pytest.approx(0.5, abs=0.01)
    assert empty.paused_until is None
    assert not (await limiter.acquire("a1", RateCategory.TEXT, at)).ok
    # The bucket refills as before; the looks changed nothing.
    later = at + timedelta(seconds=0.5)
    assert (await limiter.acquire("a1", RateCategory.TEXT, later, take=False)).ok
    assert (await limiter.acquire("a1", RateCategory.TEXT, later)).ok
    assert not (await limiter.acquire("a1", RateCategory.TEXT, later)).ok


async def test_a_look_sees_the_accounts_pause(limiter: RateLimiter) -> None:
    at = now()
    until = at + timedelta(minutes=2)
    await limiter.pause("a2", until)
    looked = await limiter.acquire("a2", RateCategory.MEDIA, at, take=False)
    assert not looked.ok
    assert looked.paused_until is not None
    assert abs((looked.paused_until - until).total_seconds()) < 0.01
    # Another account is not paused, and its look leaves its bucket whole.
    assert (await limiter.acquire("a3", RateCategory.MEDIA, at, take=False)).ok
    assert (await limiter.acquire("a3", RateCategory.MEDIA, at)).ok


async def test_decisions_asked_together_are_made_in_turn_per_bucket(
    limiter: RateLimiter,
) -> None:
    # Real time: the Redis buckets expire by Redis's clock.
    at = datetime.now(UTC)
    asked = [
        limiter.acquire("a1", RateCategory.TEXT, at),
        limiter.acquire("a1", RateCategory.TEXT, at, take=False),
        limiter.acquire("a1", RateCategory.MEDIA, at),
        limiter.acquire("a1", RateCategory.TEXT, at),
        limiter.acquire("a1", RateCategory.TEXT, at, take=False),
        limiter.acquire("a1", RateCategory.TEXT, at),
        limiter.acquire("a2", RateCategory.TEXT, at),
    ]
    answers = await asyncio.gather(*asked)
    assert [a.ok for a in answers] == [True, True, True, True, False, False, True]
    assert answers[4].wait_s == pytest.approx(0.5, abs=0.01)
    assert answers[5].wait_s == pytest.approx(0.5, abs=0.01)
    # The refused take left the bucket as it found it: half a second refills a token.
    assert (await limiter.acquire("a1", RateCategory.TEXT, at + timedelta(seconds=0.5))).ok


async def test_a_paused_account_refuses_every_decision_of_a_batch(limiter: RateLimiter) -> None:
    at = datetime.now(UTC)
    until = at + timedelta(minutes=1)
    await limiter.pause("a3", until)
    answers = await asyncio.gather(
        *(limiter.acquire("a3", c, at) for c in (RateCategory.TEXT, RateCategory.MEDIA) * 2)
    )
    assert not any(a.ok for a in answers)
    for answer in answers:
        assert answer.paused_until is not None
        assert abs((answer.paused_until - until).total_seconds()) < 0.01
    # The pause took no token: once it is over, the bucket is full.
    later = until + timedelta(seconds=1)
    assert (await limiter.acquire("a3", RateCategory.TEXT, later)).ok
    assert (await limiter.acquire("a3", RateCategory.TEXT, later)).ok
