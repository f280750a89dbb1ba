"""One exception tree for the whole gateway.

Every error says whether retrying the same operation may succeed (``retryable``) and
carries a machine-readable ``reason`` (UPPER_SNAKE) plus string ``metadata``. The gRPC
front door maps the families below to status codes in one table
(:mod:`gateway.api.errors`); messages never contain secrets.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any


class SwitchboardError(Exception):
    """Base of every error the gateway raises on purpose."""

    reason: str = "INTERNAL"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(SwitchboardError):
    """The request is wrong; ``field`` names the offending field."""

    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        field: str,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            f"{field}: {message}", reason=reason, metadata={**(metadata or {}), "field": field}
        )
        self.field = field


class NotFound(SwitchboardError):
    """The named resource does not exist (or is outside the caller's tenants)."""

    reason = "NOT_FOUND"


class AlreadyExists(SwitchboardError):
    """The resource exists and may not be created again."""

    reason = "ALREADY_EXISTS"


class Unauthenticated(SwitchboardError):
    """No credentials, or credentials nobody issued."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(SwitchboardError):
    """The caller is known but may not do this (tenant or scope)."""

    reason = "PERMISSION_DENIED"


class FailedPrecondition(SwitchboardError):
    """The system is not in a state that allows the operation (e.g. needs re-auth)."""

    reason = "FAILED_PRECONDITION"


class ResourceExhausted(SwitchboardError):
    """A rate limit or quota stops the operation for now."""

    reason = "RESOURCE_EXHAUSTED"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        retry_at: datetime | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        meta = dict(metadata or {})
        if retry_at is not None:
            meta.setdefault("retry_at", retry_at.isoformat())
        super().__init__(message, reason=reason, metadata=meta)
        self.retry_at = retry_at


class Unimplemented(SwitchboardError):
    """The operation is part of the API but not built yet."""

    reason = "UNIMPLEMENTED"


class Unavailable(SwitchboardError):
    """A dependency (store, bus, channel) cannot be reached right now."""

    reason = "UNAVAILABLE"
    retryable = True


class StoreUnavailable(Unavailable):
    """The database does not answer."""

    reason = "STORE_UNAVAILABLE"


class BusUnavailable(Unavailable):
    """The event bus does not answer."""

    reason = "BUS_UNAVAILABLE"


class BusLost(BusUnavailable):
    """The bus refused an append: it lost what it held since this process last found it
    whole (Redis restarted empty, failed over, flushed). What it lost must be published
    again first, so that nothing newer of a conversation goes ahead of it."""


class ShuttingDown(Unavailable):
    """This process is stopping: the work was not taken, another replica (or a retry) will."""

    reason = "SHUTTING_DOWN"


class ConfigError(SwitchboardError):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    reason = "CONFIG_INVALID"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# ---- errors reported by a channel (the remote platform) ----


class ChannelError(SwitchboardError):
    """The channel's platform refused or failed a call."""

    reason = "CHANNEL_ERROR"

    def __init__(
        self,
        message: str,
        *,
        code: int = 0,
        subcode: int = 0,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        meta = dict(metadata or {})
        if code:
            meta.setdefault("channel_code", str(code))
        if subcode:
            meta.setdefault("channel_subcode", str(subcode))
        super().__init__(message, reason=reason, metadata=meta)
        self.code = code
        self.subcode = subcode


class ChannelTransientError(ChannelError):
    """A temporary failure (network, 5xx, Meta codes 1, 2, 1200): retry with backoff.

    ``maybe_delivered``: the request may have reached the channel, which then did its work
    without our hearing of it (a timeout or a dropped connection after the request went
    out). Sending again could deliver a message twice, so the core waits for the channel's
    echo before it does (see gateway.services.outbound_delivery)."""

    reason = "CHANNEL_TRANSIENT"
    retryable = True

    def __init__(self, message: str, *, maybe_delivered: bool = False, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.maybe_delivered = maybe_delivered


class ChannelAuthError(ChannelError):
    """The channel rejected the credentials or a permission is missing: needs re-auth."""

    reason = "NEEDS_REAUTH"


class ChannelRateLimited(ChannelError):
    """The channel throttles the account until ``retry_at``."""

    reason = "CHANNEL_RATE_LIMITED"
    retryable = True

    def __init__(self, message: str, *, retry_at: datetime, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_at = retry_at


class ChannelRequestError(ChannelError):
    """The channel refused the request as invalid; retrying will not help."""

    reason = "CHANNEL_REQUEST_INVALID"


class OutsideMessagingWindow(FailedPrecondition):
    """The customer's messaging window has closed."""

    reason = "OUTSIDE_MESSAGING_WINDOW"
