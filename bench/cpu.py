"""CPU time by process over a phase of a benchmark: where a figure's cost goes.

Every process of a run shares the machine's cores, so a rate or a p99 is decided by the
CPU each event costs in all of them together. This reads what each one spent (Linux
``/proc``; PostgreSQL's backends only when the server runs on this machine, Redis from its
own ``INFO cpu``); where that cannot be read, the process is left out rather than guessed.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds a local process has spent; None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ")".
    fields = raw[raw.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""


async def postgres_backends(admin_url: str, database: str) -> list[int]:
    """The pids of the backends serving ``database``, if they are processes of this machine
    (a remote server's pids would name unrelated local processes, or none)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as admin:
        cur = await admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,)
        )
        pids = [int(row[0]) for row in await cur.fetchall()]
    return [pid for pid in pids if _comm(pid).startswith("postgres")]


async def redis_cpu_s(url: str) -> float | None:
    """CPU seconds the Redis server has spent (its own count: also right when remote)."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    client = aioredis.Redis.from_url(url)
    try:
        info = await client.info("cpu")
    except RedisError:
        # A managed Redis may refuse INFO: its figure is left out, the rest still stands.
        return None
    finally:
        await client.aclose()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def snapshot(
    pids: Mapping[str, Sequence[int]],
    *,
    postgres: tuple[str, str] | None = None,
    redis_url: str | None = None,
) -> CpuSnapshot:
    """The processes of ``pids`` by role; with ``postgres`` (an admin URL and the database),
    the backends serving it, asked anew each time so that a connection the pool opened
    since counts too; with ``redis_url``, that server's own count."""
    roles = dict(pids)
    if postgres is not None:
        roles["postgres"] = await postgres_backends(*postgres)
    totals = {"redis": await redis_cpu_s(redis_url)} if redis_url is not None else {}
    return CpuSnapshot.of(roles, totals)


def ms_per(spent: Mapping[str, float], count: int) -> dict[str, float]:
    """CPU seconds by role -> milliseconds per one of ``count`` (events, messages)."""
    return {role: s * 1000 / max(count, 1) for role, s in spent.items()}


def median_by_role(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each role's median over the runs that could read it, in role order."""
    roles = sorted({role for run in runs for role in run})
    return {role: statistics.median(run[role] for run in runs if role in run) for role in roles}


class CpuSnapshot:
    """CPU seconds per process of each role at one moment, and of the roles read as one
    figure (Redis); ``since`` gives what each role spent after another snapshot."""

    def __init__(
        self, by_pid: Mapping[str, Mapping[int, float]], totals: Mapping[str, float]
    ) -> None:
        self.by_pid = {role: dict(readings) for role, readings in by_pid.items()}
        self.totals = dict(totals)

    @classmethod
    def of(
        cls, pids: Mapping[str, Sequence[int]], totals: Mapping[str, float | None] | None = None
    ) -> CpuSnapshot:
        """The processes of ``pids`` by role, read now; ``totals``: roles read as one figure
        by their own means (None where they could not be read)."""
        by_pid: dict[str, dict[int, float]] = {}
        for role, members in pids.items():
            readings = {pid: process_cpu_s(pid) for pid in members}
            known = {pid: r for pid, r in readings.items() if r is not None}
            if known:
                by_pid[role] = known
        known_totals = {role: t for role, t in (totals or {}).items() if t is not None}
        return cls(by_pid, known_totals)

    def since(self, before: CpuSnapshot) -> dict[str, float]:
        """Per role: what its processes spent after ``before``. One that started meanwhile
        (a pool's new connection) counts whole; a role that could not be read at either
        end is left out."""
        spent: dict[str, float] = {}
        for role, readings in self.by_pid.items():
            if role in before.by_pid:
                earlier = before.by_pid[role]
                spent[role] = sum(r - earlier.get(pid, 0.0) for pid, r in readings.items())
        for role, total in self.totals.items():
            if role in before.totals:
                spent[role] = total - before.totals[role]
        return spent
