"""The retry schedule: exponential backoff with jitter, and the wait for an echo after an
attempt that heard no answer."""

from __future__ import annotations

from datetime import timedelta

from gateway.services.outbound_delivery import DeliveryPolicy


def test_backoff_doubles_with_jitter_over_its_upper_half_and_is_capped() -> None:
    policy = DeliveryPolicy(retry_base_s=1.0, retry_max_s=8.0)
    for attempts, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        for _ in range(50):
            wait = policy.backoff(attempts).total_seconds()
            assert ceiling / 2 <= wait <= ceiling


def test_a_retry_after_an_unanswered_attempt_waits_for_the_echo_at_least() -> None:
    policy = DeliveryPolicy(retry_base_s=1.0, unanswered_wait_s=10.0)
    assert policy.retry_after(1, maybe_delivered=True) == timedelta(seconds=10)
    assert policy.retry_after(1, maybe_delivered=False) <= timedelta(seconds=1)
    # A backoff longer than the wait is kept.
    slow = DeliveryPolicy(retry_base_s=60.0, unanswered_wait_s=10.0)
    assert slow.retry_after(1, maybe_delivered=True) >= timedelta(seconds=30)
