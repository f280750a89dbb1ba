"""Process-wide settings of a serving process (``switchboard serve`` and the benchmarks
that stand in for it)."""

from __future__ import annotations

import gc

# Python collects the youngest generation every 700 net allocations. A gateway under load
# allocates that many objects in a handful of requests, almost all freed by reference
# counting alone, so most collections find nothing: measured here, collecting 70 times
# less often (50,000) took 8-10 % off the CPU per webhook event. But a collection stops the
# process for as long as it takes to walk the young objects still alive, mostly those of
# the requests in flight: at 50,000 that took 15-46 ms here, and the p99 time to answer a
# webhook at 500 a second was over 20 ms in 4 of 5 runs of the inbound bench (18-285 ms).
# At 10,000 the pauses took 3-13 ms, the p99 was 14-20 ms in 6 of 7 runs (24 ms in the
# last, where a stall of the shared machine decided it), and the rate did not move beyond
# the runs' noise.
SERVING_GC_THRESHOLDS = (10_000, 50, 100)


def tune_gc_for_serving() -> None:
    gc.set_threshold(*SERVING_GC_THRESHOLDS)
