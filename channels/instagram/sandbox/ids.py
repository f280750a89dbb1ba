"""Random identifiers shaped like Meta's: numeric ids, tokens, codes, message ids, trace ids."""

from __future__ import annotations

import base64
import secrets
import string

_ALNUM = string.ascii_letters + string.digits
_URLSAFE = _ALNUM + "-_"


def _digits(n: int) -> str:
    # One draw for the whole number: a draw per digit is a system call per digit, and the
    # sandbox mints a 39-digit message id on every Send API call.
    return str(secrets.randbelow(10**n)).zfill(n)


def _chars(alphabet: str, n: int) -> str:
    """``n`` characters drawn uniformly from ``alphabet``: the digits of one random
    number in base ``len(alphabet)``."""
    base = len(alphabet)
    value = secrets.randbelow(base**n)
    out = []
    for _ in range(n):
        value, index = divmod(value, base)
        out.append(alphabet[index])
    return "".join(out)


def ig_id() -> str:
    """An Instagram professional account id: 17 digits, and Meta's start with 1784."""
    return "1784" + _digits(13)


def app_scoped_user_id() -> str:
    """The app-scoped Instagram user id that Instagram Login returns as ``id`` (not the IG_ID)."""
    return "2" + _digits(16)


def page_id() -> str:
    return "1" + _digits(14)


def facebook_user_id() -> str:
    return "1" + _digits(15)


def igsid() -> str:
    return "1" + _digits(15)


def app_id() -> str:
    return "1" + _digits(15)


def app_secret() -> str:
    return secrets.token_hex(16)


def verify_token() -> str:
    return secrets.token_urlsafe(24)


def instagram_token() -> str:
    return "IGAA" + _chars(_ALNUM, 180)


def facebook_token() -> str:
    return "EAA" + _chars(_ALNUM, 190)


def auth_code() -> str:
    return "AQ" + _chars(_URLSAFE, 250)


def message_id(account: str) -> str:
    """A mid like Meta's: base64 of an item key, which is why they all start ``aWdfZAG1``."""
    raw = f"ig_message_item:1:IGMessageID:{account}:{_digits(39)}".encode()
    tail = base64.b64encode(raw).decode().rstrip("=")
    return "aWdfZAG1" + tail[8:]


def fbtrace_id() -> str:
    return _chars(_URLSAFE, 23)


def username() -> str:
    return "sandbox_biz_" + _chars(string.ascii_lowercase + string.digits, 8)


def customer_username() -> str:
    return "sandbox_customer_" + _chars(string.ascii_lowercase + string.digits, 8)
