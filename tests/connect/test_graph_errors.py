"""Meta's error bodies become the gateway's channel errors (INSTAGRAM.md §6)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from channels.instagram.graph_client import error_from_body
from gateway.domain.errors import (
    ChannelAuthError,
    ChannelError,
    ChannelRateLimited,
    ChannelRequestError,
    ChannelTransientError,
)


def graph(code: int, subcode: int | None = None, **extra: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"message": f"(#{code}) test", "type": "OAuthException", "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    return {"error": {**error, **extra, "fbtrace_id": "Abc"}}


@pytest.mark.parametrize(
    ("status", "body", "kind", "reason"),
    [
        (400, graph(190, 460), ChannelAuthError, "NEEDS_REAUTH"),
        (400, graph(190, 463), ChannelAuthError, "NEEDS_REAUTH"),
        (403, graph(10), ChannelAuthError, "PERMISSION_MISSING"),
        (403, graph(200), ChannelAuthError, "PERMISSION_MISSING"),
        (403, graph(10, 2018278), ChannelRequestError, "OUTSIDE_MESSAGING_WINDOW"),
        (403, graph(10, 2018065), ChannelRequestError, "OUTSIDE_MESSAGING_WINDOW"),
        # One customer who does not take the business's messages: not the account's login.
        (403, graph(10, 2018108), ChannelRequestError, "RECIPIENT_UNAVAILABLE"),
        (403, graph(200, 1545041), ChannelRequestError, "RECIPIENT_UNAVAILABLE"),
        # A recipient outside an unreviewed app's testers: a new login would not help.
        (403, graph(200, 2018028), ChannelRequestError, "CHANNEL_REQUEST_INVALID"),
        (403, graph(200, 2018001), ChannelAuthError, "PERMISSION_MISSING"),
        (403, graph(10, 2534022), ChannelRequestError, "OUTSIDE_MESSAGING_WINDOW"),
        (400, graph(2534022), ChannelRequestError, "OUTSIDE_MESSAGING_WINDOW"),
        (500, graph(1), ChannelTransientError, "CHANNEL_TRANSIENT"),
        (500, graph(2), ChannelTransientError, "CHANNEL_TRANSIENT"),
        (400, graph(1200), ChannelTransientError, "CHANNEL_TRANSIENT"),
        (400, graph(100, is_transient=True), ChannelTransientError, "CHANNEL_TRANSIENT"),
        (400, graph(4), ChannelRateLimited, "CHANNEL_RATE_LIMITED"),
        (400, graph(80002), ChannelRateLimited, "CHANNEL_RATE_LIMITED"),
        (400, graph(368), ChannelRateLimited, "POLICY_BLOCKED"),
        (400, graph(551, 1545041), ChannelRequestError, "RECIPIENT_UNAVAILABLE"),
        (400, graph(100, 2018001), ChannelRequestError, "CHANNEL_REQUEST_INVALID"),
        (
            400,
            {"error_type": "OAuthException", "code": 400, "error_message": "Invalid code"},
            ChannelRequestError,
            "CHANNEL_REQUEST_INVALID",
        ),
        (502, None, ChannelTransientError, "CHANNEL_TRANSIENT"),
        (429, None, ChannelRateLimited, "CHANNEL_RATE_LIMITED"),
        (429, graph(100), ChannelRateLimited, "CHANNEL_RATE_LIMITED"),
        (429, graph(190, 460), ChannelAuthError, "NEEDS_REAUTH"),
        (404, None, ChannelRequestError, "CHANNEL_REQUEST_INVALID"),
    ],
)
def test_meta_errors_map_to_channel_errors(
    status: int, body: dict[str, Any] | None, kind: type[ChannelError], reason: str
) -> None:
    error = error_from_body(status, body, {})
    assert type(error) is kind
    assert error.reason == reason


def test_codes_land_in_the_metadata() -> None:
    error = error_from_body(400, graph(190, 460), {})
    assert (error.code, error.subcode) == (190, 460)
    assert error.metadata == {"channel_code": "190", "channel_subcode": "460"}


def test_throttling_waits_for_metas_estimate() -> None:
    usage = '{"17841": [{"type": "instagram", "estimated_time_to_regain_access": 7}]}'
    error = error_from_body(400, graph(80002), {"x-business-use-case-usage": usage})
    assert isinstance(error, ChannelRateLimited)
    wait = error.retry_at - datetime.now(UTC)
    assert timedelta(minutes=6) < wait <= timedelta(minutes=7)


@pytest.mark.parametrize(
    ("retry_after", "minutes"),
    [("180", 3), ("86400000", 24 * 60)],
)
def test_a_429_waits_for_its_retry_after(retry_after: str, minutes: int) -> None:
    error = error_from_body(429, None, {"retry-after": retry_after})
    assert isinstance(error, ChannelRateLimited)
    wait = error.retry_at - datetime.now(UTC)
    assert timedelta(minutes=minutes) - timedelta(seconds=5) < wait <= timedelta(minutes=minutes)


def test_a_retry_after_date_counts_and_the_later_of_two_waits_wins() -> None:
    at = datetime.now(UTC) + timedelta(minutes=10)
    usage = '{"17841": [{"type": "instagram", "estimated_time_to_regain_access": 3}]}'
    headers = {
        "retry-after": at.strftime("%a, %d %b %Y %H:%M:%S GMT"),
        "x-business-use-case-usage": usage,
    }
    error = error_from_body(429, graph(4), headers)
    assert isinstance(error, ChannelRateLimited)
    assert abs((error.retry_at - at).total_seconds()) < 1.5


@pytest.mark.parametrize(
    "retry_after", ["soon", "", "-5", "\u00b2", "Thu, 99 Foo 2026 25:00:00 GMT"]
)
def test_an_unreadable_retry_after_falls_back_to_the_default(retry_after: str) -> None:
    error = error_from_body(429, None, {"retry-after": retry_after})
    assert isinstance(error, ChannelRateLimited)
    wait = error.retry_at - datetime.now(UTC)
    assert timedelta(seconds=55) < wait <= timedelta(minutes=1)
