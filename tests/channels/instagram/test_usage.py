"""Meta's usage headers (INSTAGRAM.md §6) and the pause they put on an account."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from channels.instagram.graph_client import error_from_body
from channels.instagram.sandbox import SandboxSettings
from channels.instagram.sandbox.common import usage_headers
from channels.instagram.sandbox.state import SandboxState
from channels.instagram.usage import (
    DEFAULT_THROTTLE,
    MAX_REGAIN,
    Usage,
    parse_usage,
    regain_at,
    resume_at,
)
from gateway.domain.errors import ChannelRateLimited

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def app(**fields: Any) -> str:
    return json.dumps(fields)


def business(*buckets: dict[str, Any], account: str = "17841400000000001") -> str:
    return json.dumps({account: [{"type": "instagram", **b} for b in buckets]})


def headers(app_usage: str | None = None, business_usage: str | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    if app_usage is not None:
        out["x-app-usage"] = app_usage
    if business_usage is not None:
        out["x-business-use-case-usage"] = business_usage
    return out


def test_a_pages_usage_header_counts_too() -> None:
    """Facebook Login sends with a Page token, whose limit Meta reports in x-page-usage."""
    at_limit = {"x-page-usage": app(call_count=100, total_time=40, total_cputime=30)}
    assert parse_usage(at_limit) == Usage(percent=100.0)
    assert resume_at(parse_usage(at_limit), NOW) == NOW + DEFAULT_THROTTLE
    estimated = {"x-page-usage": app(call_count=97, estimated_time_to_regain_access=30)}
    assert resume_at(parse_usage(estimated), NOW) == NOW + timedelta(minutes=30)
    assert parse_usage({"x-page-usage": "not json"}) == Usage()


def test_metas_documented_example_is_read_from_both_headers() -> None:
    usage = parse_usage(
        headers(
            app(call_count=28, total_time=25, total_cputime=25),
            business(
                {
                    "call_count": 31,
                    "total_cputime": 40,
                    "total_time": 12,
                    "estimated_time_to_regain_access": 0,
                }
            ),
        )
    )
    assert usage == Usage(percent=40, regain_minutes=0)
    assert not usage.at_limit
    assert resume_at(usage, NOW) is None


def test_the_highest_percentage_of_either_header_counts() -> None:
    assert parse_usage(headers(app(call_count=3, total_time=77, total_cputime=5))).percent == 77
    assert parse_usage(headers(None, business({"total_cputime": 64}))).percent == 64
    both = headers(app(call_count=90), business({"call_count": 12}, {"total_time": 95}))
    assert parse_usage(both).percent == 95


@pytest.mark.parametrize(
    ("app_usage", "business_usage"),
    [
        (app(call_count=100, total_time=1, total_cputime=1), None),
        (app(call_count=1, total_time=1, total_cputime=100), None),
        (app(call_count=140), None),
        (None, business({"call_count": 5, "total_time": 100})),
        (app(call_count=10), business({"call_count": 10}, {"total_cputime": 100})),
    ],
)
def test_an_account_at_100_percent_in_either_header_pauses_for_the_default(
    app_usage: str | None, business_usage: str | None
) -> None:
    usage = parse_usage(headers(app_usage, business_usage))
    assert usage.at_limit
    assert resume_at(usage, NOW) == NOW + DEFAULT_THROTTLE


@pytest.mark.parametrize("percent", [99, 99.9])
def test_just_below_100_percent_does_not_pause(percent: float) -> None:
    usage = parse_usage(
        headers(
            app(call_count=percent, total_time=percent, total_cputime=percent),
            business({"call_count": percent, "estimated_time_to_regain_access": 0}),
        )
    )
    assert usage.percent == percent
    assert resume_at(usage, NOW) is None


def test_metas_estimate_wins_over_the_default_even_below_the_limit() -> None:
    usage = parse_usage(
        headers(app(call_count=100), business({"estimated_time_to_regain_access": 7}))
    )
    assert resume_at(usage, NOW) == NOW + timedelta(minutes=7)
    quiet = parse_usage(
        headers(None, business({"call_count": 2, "estimated_time_to_regain_access": 3}))
    )
    assert resume_at(quiet, NOW) == NOW + timedelta(minutes=3)


def test_the_largest_estimate_of_any_id_and_any_bucket_wins() -> None:
    value = json.dumps(
        {
            "111": [
                {"type": "instagram", "estimated_time_to_regain_access": 4},
                {"type": "pages", "estimated_time_to_regain_access": 12},
            ],
            "222": [{"type": "instagram", "estimated_time_to_regain_access": 9}],
            "333": [],
        }
    )
    usage = parse_usage(headers(None, value))
    assert usage.regain_minutes == 12
    assert resume_at(usage, NOW) == NOW + timedelta(minutes=12)
    assert regain_at(usage, NOW) == NOW + timedelta(minutes=12)


def test_a_fractional_estimate_is_kept_and_an_absurd_one_is_capped() -> None:
    half = parse_usage(headers(None, business({"estimated_time_to_regain_access": 0.5})))
    assert resume_at(half, NOW) == NOW + timedelta(seconds=30)
    absurd = parse_usage(headers(None, business({"estimated_time_to_regain_access": 1e20})))
    assert resume_at(absurd, NOW) == NOW + MAX_REGAIN


@pytest.mark.parametrize(
    "value",
    [
        "",
        "not json",
        "{",
        "null",
        "[]",
        '"100"',
        "100",
        '{"call_count": "100"}',
        '{"call_count": true}',
        '{"call_count": null, "total_time": [100], "total_cputime": {"x": 100}}',
        '{"call_count": -100}',
        '{"call_count": NaN}',
    ],
)
def test_a_garbled_app_header_says_nothing(value: str) -> None:
    usage = parse_usage(headers(value))
    assert usage == Usage()
    assert resume_at(usage, NOW) is None


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        "[]",
        "null",
        '{"1": null}',
        '{"1": "x"}',
        '{"1": {"estimated_time_to_regain_access": 5, "call_count": 100}}',
        '{"1": [null, 3, "x", []]}',
        '{"1": [{"estimated_time_to_regain_access": "5", "call_count": "100"}]}',
        '{"1": [{"estimated_time_to_regain_access": true, "call_count": false}]}',
        '{"1": [{"estimated_time_to_regain_access": -5, "call_count": -1}]}',
    ],
)
def test_a_garbled_business_header_says_nothing(value: str) -> None:
    usage = parse_usage(headers(None, value))
    assert usage == Usage()
    assert resume_at(usage, NOW) is None
    # A throttling error with nothing better to go on still waits the default.
    assert regain_at(usage, NOW) == NOW + DEFAULT_THROTTLE


def test_one_garbled_header_does_not_hide_the_other() -> None:
    usage = parse_usage(headers("not json", business({"call_count": 100})))
    assert usage.at_limit
    usage = parse_usage(headers(app(total_time=100), "not json"))
    assert resume_at(usage, NOW) == NOW + DEFAULT_THROTTLE


def test_no_headers_no_pause() -> None:
    assert parse_usage({}) == Usage()
    assert resume_at(parse_usage({}), NOW) is None
    assert regain_at(parse_usage({}), NOW) == NOW + DEFAULT_THROTTLE


def test_header_names_match_whatever_their_case_on_aiohttps_headers() -> None:
    raw: CIMultiDict[str] = CIMultiDict()
    raw["X-App-Usage"] = app(call_count=100)
    raw["X-Business-Use-Case-Usage"] = business({"estimated_time_to_regain_access": 2})
    usage = parse_usage(CIMultiDictProxy(raw))
    assert usage == Usage(percent=100, regain_minutes=2)


@pytest.mark.parametrize("code", [4, 17, 32, 613, 80002, 80006])
def test_a_throttling_error_waits_for_the_estimate_else_the_default(code: int) -> None:
    body = {"error": {"message": "(#4) throttled", "type": "OAuthException", "code": code}}
    estimate = business({"call_count": 100, "estimated_time_to_regain_access": 7})
    before = datetime.now(UTC)
    error = error_from_body(400, body, headers(app(call_count=100), estimate))
    assert isinstance(error, ChannelRateLimited)
    assert (
        before + timedelta(minutes=7) <= error.retry_at <= datetime.now(UTC) + timedelta(minutes=7)
    )
    before = datetime.now(UTC)
    error = error_from_body(400, body, headers(app(call_count=100)))
    assert isinstance(error, ChannelRateLimited)
    assert before + DEFAULT_THROTTLE <= error.retry_at <= datetime.now(UTC) + DEFAULT_THROTTLE
    before = datetime.now(UTC)
    error = error_from_body(400, body, {})
    assert isinstance(error, ChannelRateLimited)
    assert before + DEFAULT_THROTTLE <= error.retry_at <= datetime.now(UTC) + DEFAULT_THROTTLE


def test_the_sandboxs_own_count_never_reports_a_busy_account_at_the_limit() -> None:
    # Benchmarks send thousands of messages an hour to one sandbox account; only a test's
    # POST /_sandbox/usage (or an injected throttling error) should pause it.
    state = SandboxState(SandboxSettings.generate())
    for _ in range(999):
        usage_headers(state, "17841400000000001")
    usage = parse_usage(usage_headers(state, "17841400000000001"))
    assert 90 <= usage.percent < 100
    assert resume_at(usage, NOW) is None
