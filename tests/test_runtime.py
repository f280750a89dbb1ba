import gc
from collections.abc import Iterator

import pytest

from gateway.runtime import SERVING_GC_THRESHOLDS, tune_gc_for_serving


@pytest.fixture
def restored_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


@pytest.mark.usefixtures("restored_gc")
def test_serving_collects_the_young_generation_far_less_often_but_in_short_pauses() -> None:
    gc.set_threshold(700, 10, 10)
    tune_gc_for_serving()
    assert gc.get_threshold() == SERVING_GC_THRESHOLDS
    assert 10 * 700 <= SERVING_GC_THRESHOLDS[0] <= 20_000
