"""Opaque page tokens for keyset pagination.

A token is the urlsafe base64 of ``[kind, sort_key, id]``: the position after the last
item of the previous page. ``kind`` keeps a token of one listing from being replayed on
another, where its keyset would mean something else.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime

import orjson

from gateway.domain.errors import InvalidArgument

FIELD = "page_token"
# The ids the listings page by are ours (``conn_…``, ``cnv_…``): anything else is no position.
_IDS = re.compile(r"[A-Za-z0-9_-]{1,100}")


def encode_token(kind: str, sort_key: datetime, item_id: str) -> str:
    raw = orjson.dumps([kind, sort_key.astimezone(UTC).isoformat(), item_id])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_token(kind: str, token: str) -> tuple[datetime, str]:
    """The keyset a token names; InvalidArgument('page_token') when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        token_kind, sort_key, item_id = orjson.loads(raw)
        if (
            token_kind != kind
            or not isinstance(sort_key, str)
            or not isinstance(item_id, str)
            or not _IDS.fullmatch(item_id)
        ):
            raise ValueError(token_kind)
        when = datetime.fromisoformat(sort_key)
        if when.tzinfo is None:
            raise ValueError(sort_key)
        # Every store compares in UTC: a time near the ends of the calendar would not fit.
        return when.astimezone(UTC), item_id
    except (binascii.Error, ValueError, TypeError, OverflowError, orjson.JSONDecodeError):
        raise InvalidArgument(FIELD, "malformed page token") from None
