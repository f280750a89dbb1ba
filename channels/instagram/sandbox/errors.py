"""Meta's error bodies, and the sandbox exceptions that carry them to the response.

Handlers raise; one middleware turns the exception into Meta's JSON, so every error leaves
the sandbox in the same shape as Meta's.
"""

from __future__ import annotations

from typing import Any, Literal

from . import ids

THROTTLE_CODES = frozenset({4, 17, 32, 613, 80002, 80006})
TRANSIENT_CODES = frozenset({1, 2})

# Meta's wording for codes a test injects without a message of its own.
DEFAULT_MESSAGES: dict[int, str] = {
    1: "An unknown error occurred",
    2: "An unexpected error has occurred. Please retry your request later.",
    4: "(#4) Application request limit reached",
    10: "(#10) Application does not have permission for this action",
    17: "(#17) User request limit reached",
    32: "(#32) Page request limit reached",
    100: "(#100) Invalid parameter",
    190: "Error validating access token: The session has been invalidated because the user"
    " changed their password or Facebook has changed the session for security reasons.",
    200: "(#200) Requires instagram_manage_messages permission to manage the object",
    230: "(#230) User consent is required to access user profile",
    368: "(#368) The action attempted has been deemed abusive or is otherwise disallowed",
    551: "This person isn't available right now.",
    613: "(#613) Calls to this api have exceeded the rate limit.",
    80002: "(#80002) There have been too many calls to this Instagram account."
    " Wait a bit and try again.",
    80006: "(#80006) There have been too many messages sent to this Instagram account."
    " Wait a bit and try again.",
}

_DEFAULT_SUBCODES: dict[int, int] = {551: 1545041}


def default_http_status(code: int) -> int:
    """The HTTP status Meta pairs with a code; clients must read the body, not the status."""
    if code in TRANSIENT_CODES:
        return 500
    if code == 10 or 200 <= code <= 299:
        return 403
    return 400


class GraphError(Exception):
    """A Graph API error: becomes ``{"error": {...}}`` with Meta's fields."""

    def __init__(
        self,
        code: int,
        message: str | None = None,
        *,
        subcode: int | None = None,
        http_status: int | None = None,
        user_title: str | None = None,
        user_msg: str | None = None,
        is_transient: bool | None = None,
        headers: dict[str, str] | None = None,
        error_type: str = "OAuthException",
    ) -> None:
        self.code = code
        self.error_type = error_type
        self.message = message or DEFAULT_MESSAGES.get(code, f"(#{code}) Sandbox error")
        self.subcode = subcode if subcode is not None else _DEFAULT_SUBCODES.get(code)
        self.http_status = http_status or default_http_status(code)
        self.user_title = user_title
        self.user_msg = user_msg
        self.is_transient = code in TRANSIENT_CODES if is_transient is None else is_transient
        self.headers = dict(headers or {})
        super().__init__(f"({code}/{self.subcode}) {self.message}")

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.error_type,
            "code": self.code,
        }
        if self.subcode is not None:
            error["error_subcode"] = self.subcode
        if self.is_transient:
            error["is_transient"] = True
        if self.user_title is not None:
            error["error_user_title"] = self.user_title
        if self.user_msg is not None:
            error["error_user_msg"] = self.user_msg
        error["fbtrace_id"] = ids.fbtrace_id()
        return {"error": error}


class InstagramOAuthError(Exception):
    """The Instagram Login exchange's own shape: ``{"error_type","code","error_message"}``."""

    def __init__(self, message: str, *, http_status: int = 400) -> None:
        self.message = message
        self.http_status = http_status
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {
            "error_type": "OAuthException",
            "code": self.http_status,
            "error_message": self.message,
        }


def invalid_parameter(message: str, *, subcode: int | None = None) -> GraphError:
    return GraphError(100, f"(#100) {message}", subcode=subcode)


def unsupported_request(method: str, node: str) -> GraphError:
    return GraphError(
        100,
        f"Unsupported {method.lower()} request. Object with ID '{node}' does not exist, cannot be"
        " loaded due to missing permissions, or does not support this operation.",
        subcode=33,
    )


def token_missing() -> GraphError:
    return GraphError(104, "An access token is required to request this resource.")


def token_unparseable() -> GraphError:
    return GraphError(190, "Invalid OAuth access token - Cannot parse access token")


def token_expired(expired_at: str) -> GraphError:
    return GraphError(
        190,
        f"Error validating access token: Session has expired on {expired_at}.",
        subcode=463,
    )


def token_revoked(subcode: int) -> GraphError:
    messages = {
        458: "Error validating access token: The user has not authorized application.",
        459: "Error validating access token: The user is checkpointed.",
        460: DEFAULT_MESSAGES[190],
        464: "Error validating access token: The user is not a confirmed user.",
        467: "Error validating access token: The access token is invalid.",
    }
    return GraphError(190, messages.get(subcode, messages[467]), subcode=subcode)


def outside_window(host: Literal["facebook", "instagram"]) -> GraphError:
    """Each host answers a send outside the window its own way."""
    message = "(#10) This message is sent outside of allowed window."
    if host == "instagram":
        return GraphError(10, message, subcode=2534022, error_type="IGApiException")
    return GraphError(10, message, subcode=2018278)


def no_matching_user() -> GraphError:
    return GraphError(100, "(#100) No matching user found", subcode=2018001)
