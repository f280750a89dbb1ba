"""Per-account send rate limits: a token bucket per account and category, and pauses.

A bucket refills at ``rate`` tokens per second up to one second's worth, and at least one
token (a rate below one a second would otherwise never fill it enough for a send); each
send takes a token. A pause (Meta said the account is throttled until a time) stops every
category of the account until then. :class:`RedisRateLimiter` shares buckets and pauses across
replicas with one atomic script per decision (on one Redis or a Redis Cluster: an
account's keys share a hash tag, so each script stays within one slot);
:class:`MemoryRateLimiter` is the embedded default's in-process equivalent. Times come
from the caller (``now``), so both behave the same under a test's clock and replicas
agree as far as their clocks do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from redis.exceptions import NoScriptError

from gateway.domain.errors import Unavailable
from gateway.domain.outbound import RateCategory
from gateway.redis_client import REDIS_ERRORS, RedisClient, open_redis
from gateway.services.ingest_batcher import GroupCommitter


@dataclass(frozen=True, slots=True)
class Admission:
    """``ok``: a token was taken. Otherwise wait ``wait_s``; ``paused_until`` is set when
    the account is paused (rather than merely out of tokens)."""

    ok: bool
    wait_s: float = 0.0
    paused_until: datetime | None = None


class RateLimiter(Protocol):
    async def acquire(
        self, account: str, category: RateCategory, now: datetime, *, take: bool = True
    ) -> Admission:
        """Takes a token when one is available; with ``take`` False only says whether one
        is, taking nothing. Raises Unavailable when undecidable."""

    async def pause(self, account: str, until: datetime) -> None:
        """Holds every send of the account until ``until`` (a later pause wins)."""

    async def aclose(self) -> None: ...


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def _from_ms(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC)


def _capacity(rate: float) -> float:
    """What a bucket holds when full: one second's worth, and never less than a send."""
    return max(rate, 1.0)


class MemoryRateLimiter:
    def __init__(self, rates: Mapping[RateCategory, float]) -> None:
        self._rates = dict(rates)
        self._buckets: dict[tuple[str, RateCategory], tuple[float, float]] = {}
        self._paused: dict[str, datetime] = {}

    async def acquire(
        self, account: str, category: RateCategory, now: datetime, *, take: bool = True
    ) -> Admission:
        paused = self._paused.get(account)
        if paused is not None:
            if paused > now:
                return Admission(False, (paused - now).total_seconds(), paused)
            del self._paused[account]
        rate = self._rates[category]
        capacity = _capacity(rate)
        now_s = now.timestamp()
        tokens, at = self._buckets.get((account, category), (capacity, now_s))
        tokens = min(capacity, tokens + max(0.0, now_s - at) * rate)
        if tokens >= 1:
            if take:
                self._buckets[(account, category)] = (tokens - 1, max(at, now_s))
            return Admission(True)
        if take:
            self._buckets[(account, category)] = (tokens, max(at, now_s))
        return Admission(False, (1 - tokens) / rate)

    async def pause(self, account: str, until: datetime) -> None:
        current = self._paused.get(account)
        if current is None or until > current:
            self._paused[account] = until

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class RateLimitKeys:
    """Every Redis key of the rate limiter. An account's keys share a hash tag, so one
    script can touch them all on Redis Cluster."""

    prefix: str

    def _tag(self, account: str) -> str:
        return f"{{{self.prefix}ratelimit:{account}}}"

    def bucket(self, account: str, category: RateCategory) -> str:
        return f"{self._tag(account)}:bucket:{category.value}"

    def pause(self, account: str) -> str:
        return f"{self._tag(account)}:pause"


# KEYS: bucket, pause. ARGV: rate (tokens/s), then a (now (ms), take) pair per decision,
# take 1 to take a token, 0 only to look. The decisions are made one after the other, as
# separate calls would make them: a take leaves the bucket as the next one finds it. One
# call for every decision a batch asks of one bucket: a command to encode, run and parse
# per batch and bucket, not per send. Returns {ok, wait_ms, paused_until_ms} per
# decision, flattened.
_ACQUIRE = """
local rate = tonumber(ARGV[1])
local cap = math.max(rate, 1)
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
local b = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(b[1]) or cap
local ts = tonumber(b[2])
local taken = false
local out = {}
for i = 2, #ARGV, 2 do
  local now = tonumber(ARGV[i])
  if paused > now then
    out[#out + 1] = 0
    out[#out + 1] = paused - now
    out[#out + 1] = paused
  else
    local t, at = tokens, ts or now
    if now > at then
      t = math.min(cap, t + (now - at) * rate / 1000)
      at = now
    end
    local ok, wait = 0, 0
    if t >= 1 then
      t = t - 1
      ok = 1
    else
      wait = math.ceil((1 - t) * 1000 / rate)
    end
    if ARGV[i + 1] == '1' then
      tokens, ts, taken = t, at, true
    end
    out[#out + 1] = ok
    out[#out + 1] = wait
    out[#out + 1] = 0
  end
end
if taken then
  redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(ts))
  -- Kept at least until it would be full again: a bucket that vanished would be full.
  redis.call('PEXPIRE', KEYS[1], math.max(2000, math.ceil(cap * 1000 / rate)))
end
return out
"""

# KEYS: pause. ARGV: until (ms), now (ms). Keeps the later of the two pauses.
_PAUSE = """
local untl = tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if untl > cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', math.max(1, untl - tonumber(ARGV[2])))
end
return 1
"""


_Decision = tuple[str, RateCategory, datetime, bool]


class RedisRateLimiter:
    def __init__(self, url: str, rates: Mapping[RateCategory, float], *, prefix: str) -> None:
        self._client: RedisClient = open_redis(url)
        self._rates = dict(rates)
        self.keys = RateLimitKeys(prefix)
        self._acquire: Any = self._client.register_script(_ACQUIRE)
        self._pause: Any = self._client.register_script(_PAUSE)
        # The decisions asked while the previous pipeline was out travel in one: a round
        # trip per batch of sends, not per send, and one script call per bucket.
        self._decisions: GroupCommitter[_Decision, Any] = GroupCommitter(
            self._decide, max_items=100, max_wait_s=0.0, name="rate-limit"
        )
        self._started = False

    async def acquire(
        self, account: str, category: RateCategory, now: datetime, *, take: bool = True
    ) -> Admission:
        if not self._started:
            self._started = True
            await self._decisions.start()
        ok, wait_ms, paused_ms = await self._decisions.submit((account, category, now, take))
        if int(ok):
            return Admission(True)
        paused = _from_ms(int(paused_ms)) if int(paused_ms) else None
        return Admission(False, int(wait_ms) / 1000, paused)

    async def _decide(self, decisions: Sequence[_Decision]) -> list[Any]:
        buckets: dict[tuple[str, RateCategory], list[int]] = {}
        for i, (account, category, _, _) in enumerate(decisions):
            buckets.setdefault((account, category), []).append(i)
        batches = list(buckets.items())
        try:
            answers = await self._run_decisions(decisions, batches)
            missing = [n for n, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
            if missing:
                # Redis restarted or was flushed, or (on a cluster) a node joined or took
                # over: load the script (on every primary), then ask again for those
                # buckets only. The others already took their tokens.
                await self._client.script_load(_ACQUIRE)
                again = await self._run_decisions(decisions, [batches[n] for n in missing])
                for n, answer in zip(missing, again, strict=True):
                    answers[n] = answer
            for answer in answers:
                if isinstance(answer, Exception):
                    raise answer
        except REDIS_ERRORS as exc:
            raise Unavailable(
                f"Redis cannot decide the rate limit ({type(exc).__name__})",
                reason="RATE_LIMITER_UNAVAILABLE",
            ) from None
        results: list[Any] = [None] * len(decisions)
        for (_, indexes), answer in zip(batches, answers, strict=True):
            for k, i in enumerate(indexes):
                results[i] = answer[3 * k : 3 * k + 3]
        return results

    async def _run_decisions(
        self,
        decisions: Sequence[_Decision],
        batches: Sequence[tuple[tuple[str, RateCategory], list[int]]],
    ) -> list[Any]:
        """One script call per bucket, all in one pipeline; each call's answer (or error)
        in the order of ``batches``."""
        # EVALSHA straight into the pipeline: a registered script would make every
        # execute ask SCRIPT EXISTS first, a second round trip. Through execute_command
        # because redis-py refuses pipe.evalsha on a cluster (for fear of NOSCRIPT, which
        # _decide handles). Errors come back in place, so that a script missing on one
        # cluster node fails only the buckets it holds.
        pipe = self._client.pipeline(transaction=False)
        for (account, category), indexes in batches:
            args: list[float] = [self._rates[category]]
            for i in indexes:
                _, _, now, take = decisions[i]
                args += (_ms(now), 1 if take else 0)
            pipe.execute_command(
                "EVALSHA",
                self._acquire.sha,
                2,
                self.keys.bucket(account, category),
                self.keys.pause(account),
                *args,
            )
        answers: list[Any] = await pipe.execute(raise_on_error=False)
        return answers

    async def pause(self, account: str, until: datetime) -> None:
        now = datetime.now(UTC)
        if until <= now:
            return
        try:
            await self._pause(keys=[self.keys.pause(account)], args=[_ms(until), _ms(now)])
        except REDIS_ERRORS as exc:
            raise Unavailable(
                f"Redis cannot record the pause ({type(exc).__name__})",
                reason="RATE_LIMITER_UNAVAILABLE",
            ) from None

    async def aclose(self) -> None:
        await self._decisions.aclose()
        await self._client.aclose()


def open_rate_limiter(
    redis_url: str | None, rates: Mapping[RateCategory, float], *, prefix: str
) -> RateLimiter:
    if redis_url:
        return RedisRateLimiter(redis_url, rates, prefix=prefix)
    return MemoryRateLimiter(rates)
