"""The Instagram channel: Meta's Messenger Platform for Instagram and Instagram Login."""

from __future__ import annotations

import hmac
import logging
from typing import ClassVar

from channels.instagram.settings import (
    FACEBOOK_SCOPES,
    FLOW_FACEBOOK,
    FLOW_INSTAGRAM,
    INSTAGRAM_SCOPES,
    InstagramSettings,
)
from channels.instagram.signature import HEADER, check_signature
from gateway.domain.channel import (
    ChannelContext,
    ChannelInfo,
    HttpRequest,
    HttpResponse,
    LoginFlowInfo,
)

log = logging.getLogger(__name__)

CAPABILITIES = (
    "text",
    "attachments",
    "stickers",
    "shares",
    "quick_replies",
    "templates",
    "reactions",
    "reply_to",
    "sender_actions",
    "human_agent_tag",
    "profiles",
)


class InstagramChannel:
    name: ClassVar[str] = "instagram"

    def __init__(self, settings: InstagramSettings) -> None:
        self.settings = settings

    @classmethod
    def create(cls, context: ChannelContext) -> InstagramChannel:
        return cls(InstagramSettings.from_environ(context.environ, context.public_url))

    def info(self) -> ChannelInfo:
        s = self.settings
        sandbox = s.uses_sandbox
        flows = (
            LoginFlowInfo(
                name=FLOW_INSTAGRAM,
                display_name="Instagram Login",
                scopes=INSTAGRAM_SCOPES,
                configured=s.instagram_flow_configured,
            ),
            LoginFlowInfo(
                name=FLOW_FACEBOOK,
                display_name="Facebook Login",
                scopes=FACEBOOK_SCOPES,
                configured=s.facebook_flow_configured,
            ),
        )
        return ChannelInfo(
            name=self.name,
            display_name="Instagram",
            capabilities=CAPABILITIES,
            login_flows=flows,
            default_login_flow=s.default_flow,
            configured=any(f.configured for f in flows),
            sandbox=sandbox,
        )

    async def start(self) -> None:
        if self.settings.uses_sandbox:
            log.warning(
                "instagram: every Meta host points at the sandbox",
                extra={"sandbox_url": self.settings.sandbox_url},
            )

    async def aclose(self) -> None:
        return None

    async def handle_webhook(self, request: HttpRequest) -> HttpResponse:
        if request.method == "GET":
            return self._verify_subscription(request)
        verdict = check_signature(
            request.body, request.headers.get(HEADER), self.settings.app_secrets()
        )
        if verdict != "ok":
            log.warning("instagram webhook refused", extra={"signature": verdict})
            return HttpResponse.text(403, "invalid signature")
        # Storing deliveries is the inbound pipeline's job (not built yet): a 5xx makes Meta
        # keep the delivery and retry it, so nothing is lost meanwhile.
        return HttpResponse.text(501, "webhook processing is not implemented yet")

    def _verify_subscription(self, request: HttpRequest) -> HttpResponse:
        q = request.query
        expected = self.settings.webhook_verify_token.reveal()
        given = q.get("hub.verify_token", "")
        if (
            q.get("hub.mode") == "subscribe"
            and expected
            and hmac.compare_digest(given.encode(), expected.encode())
        ):
            return HttpResponse.text(200, q.get("hub.challenge", ""))
        return HttpResponse.text(403, "verification failed")
