"""bench.cpu: the CPU the benchmarks attribute to each process."""

from __future__ import annotations

import os
import sys
import time

import pytest

from bench.cpu import CpuSnapshot, median_by_role, ms_per, process_cpu_s

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc, which only Linux has"
)


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_process_cpu_grows_with_the_work_it_does() -> None:
    before = process_cpu_s(os.getpid())
    assert before is not None
    _spin(0.2)
    after = process_cpu_s(os.getpid())
    assert after is not None
    # The kernel counts in ticks (10 ms here): allow one either side.
    assert 0.2 - 0.02 <= after - before <= 0.2 + 0.1


def test_a_process_that_is_not_there_reads_as_unknown() -> None:
    # Above any pid_max the kernel allows (2**22).
    assert process_cpu_s(2**23) is None


def test_a_snapshot_leaves_out_what_it_cannot_read() -> None:
    own = os.getpid()
    pids = {"self": [own], "gone": [2**23]}
    before = CpuSnapshot.of(pids, {"redis": 1.0, "remote": None})
    _spin(0.05)
    spent = CpuSnapshot.of(pids, {"redis": 1.5, "remote": None}).since(before)
    assert set(spent) == {"self", "redis"}
    assert spent["self"] >= 0.05 - 0.02
    assert spent["redis"] == pytest.approx(0.5)


def test_a_process_that_started_in_between_counts_whole() -> None:
    before = CpuSnapshot({"pool": {1: 5.0}}, {})
    after = CpuSnapshot({"pool": {1: 5.5, 2: 0.25}}, {})
    assert after.since(before) == {"pool": pytest.approx(0.75)}


def test_runs_combine_per_role_over_the_runs_that_read_it() -> None:
    runs = [
        ms_per({"webhook": 1.0, "redis": 0.2}, 1000),
        ms_per({"webhook": 3.0}, 1000),
        ms_per({"webhook": 2.0, "redis": 0.4}, 1000),
    ]
    assert median_by_role(runs) == {
        "redis": pytest.approx(0.3),
        "webhook": pytest.approx(2.0),
    }
