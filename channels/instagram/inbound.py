"""Instagram's webhook endpoint: the subscription handshake, the signature, the parser."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from datetime import UTC, datetime

from channels.instagram.parser import parse_delivery
from channels.instagram.settings import InstagramSettings
from channels.instagram.signature import HEADER, check_signature
from gateway.domain.channel import HttpRequest, HttpResponse
from gateway.domain.inbound import ParsedDelivery, Verdict


class InstagramInbound:
    """Implements :class:`gateway.domain.inbound.ChannelInbound` for Instagram.

    Settings are read through a callable: the embedded sandbox replaces the plugin's
    settings (and so its app secrets) when it starts.
    """

    def __init__(self, settings: Callable[[], InstagramSettings]) -> None:
        self._settings = settings

    def verify_subscription(self, request: HttpRequest) -> HttpResponse:
        q = request.query
        expected = self._settings().webhook_verify_token.reveal()
        given = q.get("hub.verify_token", "")
        if (
            q.get("hub.mode") == "subscribe"
            and expected
            and hmac.compare_digest(given.encode(), expected.encode())
        ):
            return HttpResponse.text(200, q.get("hub.challenge", ""))
        return HttpResponse.text(403, "verification failed")

    def verify(self, request: HttpRequest) -> Verdict:
        header = request.headers.get(HEADER) or request.headers.get(HEADER.lower())
        reason = check_signature(request.body, header, self._settings().app_secrets())
        return Verdict(ok=reason == "ok", reason=reason)

    def parse(self, body: bytes) -> ParsedDelivery:
        return parse_delivery(body, now=datetime.now(UTC))
