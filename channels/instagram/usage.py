"""Meta's usage headers (INSTAGRAM.md §6) and when they let an account call again.

``x-app-usage`` gives the app's usage as percentages; ``x-business-use-case-usage`` gives,
per business id, a list of buckets with the same percentages and
``estimated_time_to_regain_access`` in minutes; ``x-page-usage`` (calls made with a Page
token, the Facebook Login flow) gives the Page's, flat like the app's, with the estimate
when Meta sends one. All are read here, once, for a successful send (:func:`resume_at`)
and for a throttling error (:func:`regain_at`).

Meta does not promise the headers' shape, so anything unexpected counts as "nothing known":
a malformed header never fails a send that Meta accepted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

APP_USAGE = "x-app-usage"
BUSINESS_USAGE = "x-business-use-case-usage"
PAGE_USAGE = "x-page-usage"
PERCENT_FIELDS = ("call_count", "total_time", "total_cputime")
REGAIN_FIELD = "estimated_time_to_regain_access"
LIMIT_PERCENT = 100.0
# Meta throttles an account but has not said for how long: long enough for the window it
# counts over to move on, short enough not to hold messages needlessly.
DEFAULT_THROTTLE = timedelta(minutes=1)
# A garbage estimate (1e20 minutes) must not overflow datetime arithmetic or hold an
# account for years; Meta's own estimates stay well under a day.
MAX_REGAIN = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Usage:
    """What the usage headers say: the highest percentage of any limit in any header,
    and the longest ``estimated_time_to_regain_access`` (0 when neither says anything)."""

    percent: float = 0.0
    regain_minutes: float = 0.0

    @property
    def at_limit(self) -> bool:
        return self.percent >= LIMIT_PERCENT


def _number(value: Any) -> float:
    """A non-negative finite number, or 0 for anything else (bools, strings, NaN, ...)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    number = float(value)
    return number if math.isfinite(number) and number > 0 else 0.0


def _load(headers: Mapping[str, str], name: str) -> Any:
    raw = headers.get(name)
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _percent(entry: Mapping[str, Any]) -> float:
    return max((_number(entry.get(f)) for f in PERCENT_FIELDS), default=0.0)


def parse_usage(headers: Mapping[str, str]) -> Usage:
    """The usage headers, tolerant of a missing, non-JSON or oddly shaped value."""
    percent = regain = 0.0
    app = _load(headers, APP_USAGE)
    if isinstance(app, dict):
        percent = _percent(app)
    page = _load(headers, PAGE_USAGE)
    if isinstance(page, dict):
        percent = max(percent, _percent(page))
        regain = max(regain, _number(page.get(REGAIN_FIELD)))
    business = _load(headers, BUSINESS_USAGE)
    if isinstance(business, dict):
        for entries in business.values():
            for entry in entries if isinstance(entries, list) else ():
                if isinstance(entry, dict):
                    percent = max(percent, _percent(entry))
                    regain = max(regain, _number(entry.get(REGAIN_FIELD)))
    return Usage(percent=percent, regain_minutes=regain)


def resume_at(usage: Usage, now: datetime) -> datetime | None:
    """Until when the account should not call, after a call Meta accepted (None: no pause).

    Meta's estimate wins; without one, an account at 100 % of any limit will be throttled
    on its next call, so it waits the default instead of spending that call on an error.
    """
    if usage.regain_minutes > 0:
        minutes = min(usage.regain_minutes, MAX_REGAIN / timedelta(minutes=1))
        return now + timedelta(minutes=minutes)
    if usage.at_limit:
        return now + DEFAULT_THROTTLE
    return None


def retry_after(headers: Mapping[str, str], now: datetime) -> datetime | None:
    """The time an HTTP ``Retry-After`` header names (seconds or an HTTP date), capped like
    Meta's estimates; None when it is absent or unreadable."""
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        wait = timedelta(seconds=min(int(value), MAX_REGAIN.total_seconds()))
        return now + wait
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(when, now), now + MAX_REGAIN)


def regain_at(usage: Usage, now: datetime, retry_at: datetime | None = None) -> datetime:
    """When an account Meta has throttled may call again: the later of its estimate and
    ``retry_at`` (the response's ``Retry-After``), else the default."""
    known = [w for w in (resume_at(usage, now), retry_at) if w is not None]
    return max(known, default=now + DEFAULT_THROTTLE)
