"""The Instagram channel: Meta's Messenger Platform for Instagram and Instagram Login."""

from __future__ import annotations

import logging
from typing import ClassVar

from channels.instagram.connect import InstagramConnector
from channels.instagram.graph_client import GraphClient
from channels.instagram.inbound import InstagramInbound
from channels.instagram.profiles import InstagramProfiles
from channels.instagram.sandbox import (
    RunningSandbox,
    SandboxClient,
    SandboxSettings,
    start_sandbox,
)
from channels.instagram.send import InstagramOutbound
from channels.instagram.settings import (
    FLOW_FACEBOOK,
    FLOW_INSTAGRAM,
    INSTAGRAM_SCOPES,
    InstagramSettings,
)
from gateway.domain.channel import (
    ChannelContext,
    ChannelInfo,
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

    def __init__(
        self,
        settings: InstagramSettings,
        context: ChannelContext,
        *,
        embedded_sandbox: bool = False,
    ) -> None:
        self.settings = settings
        self._context = context
        # No Meta credentials and no sandbox URL: run Meta's stand-in inside this process.
        self.embedded_sandbox = embedded_sandbox
        self._sandbox: RunningSandbox | None = None
        # Both read the settings at call time: start() may replace them (embedded sandbox).
        self.graph = GraphClient(
            lambda host: self.settings.base_urls[host], timeout_s=settings.api_timeout_s
        )
        self.connector = InstagramConnector(lambda: self.settings, self.graph)
        self.inbound = InstagramInbound(lambda: self.settings)
        self.profiles = InstagramProfiles(lambda: self.settings, self.graph)
        self.outbound = InstagramOutbound(lambda: self.settings, self.graph)

    @classmethod
    def create(cls, context: ChannelContext) -> InstagramChannel:
        settings = InstagramSettings.from_environ(context.environ, context.public_url)
        embedded = context.embedded and not (
            settings.instagram_flow_configured
            or settings.facebook_flow_configured
            or settings.uses_sandbox
        )
        return cls(settings, context, embedded_sandbox=embedded)

    def info(self) -> ChannelInfo:
        s = self.settings
        sandbox = s.uses_sandbox or self.embedded_sandbox
        flows = (
            LoginFlowInfo(
                name=FLOW_INSTAGRAM,
                display_name="Instagram Login",
                scopes=INSTAGRAM_SCOPES,
                configured=s.instagram_flow_configured or self.embedded_sandbox,
            ),
            LoginFlowInfo(
                name=FLOW_FACEBOOK,
                display_name="Facebook Login",
                scopes=s.facebook_scopes,
                configured=s.facebook_flow_configured or self.embedded_sandbox,
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
        await self.graph.start()
        if self.embedded_sandbox and self._sandbox is None:
            await self._start_embedded_sandbox()
        elif self.settings.uses_sandbox:
            log.warning(
                "instagram: every Meta host points at the sandbox",
                extra={"sandbox_url": self.settings.sandbox_url},
            )
            s = self.settings
            if not (s.instagram_flow_configured or s.facebook_flow_configured):
                await self._adopt_sandbox_credentials()
        elif not self.info().configured:
            log.warning(
                "instagram: not configured (no Meta app credentials, no INSTAGRAM_SANDBOX_URL);"
                " the built-in sandbox runs only on the embedded default"
            )

    async def _adopt_sandbox_credentials(self) -> None:
        """A sandbox URL alone: take the credentials the sandbox generated (it shows only
        those), so that pointing every process at one ``switchboard sandbox`` is the whole
        setup; and give the sandbox this gateway's webhook URL if it has none yet."""
        url = self.settings.sandbox_url
        try:
            async with SandboxClient(url) as control:
                config = await control.config()
                if not config.get("webhook_url"):
                    await control.set_webhook(self._context.webhook_url(self.name))
        except Exception as exc:  # unreachable, or not a sandbox: say so, keep serving
            log.warning(
                "instagram: the sandbox did not give its credentials; set INSTAGRAM_APP_ID"
                " and INSTAGRAM_APP_SECRET as it has them",
                extra={"sandbox_url": url, "error": type(exc).__name__},
            )
            return
        adopted: dict[str, str] = {}
        for prefix, key in (("INSTAGRAM", "instagram"), ("FACEBOOK", "facebook")):
            # A pair the sandbox was given shows no secret: only a whole pair is taken.
            app_id, secret = config.get(f"{key}_app_id"), config.get(f"{key}_app_secret")
            if app_id and secret:
                adopted |= {f"{prefix}_APP_ID": str(app_id), f"{prefix}_APP_SECRET": str(secret)}
        if config.get("webhook_verify_token"):
            adopted["INSTAGRAM_WEBHOOK_VERIFY_TOKEN"] = str(config["webhook_verify_token"])
        environ = {**adopted, **{k: v for k, v in self._context.environ.items() if v.strip()}}
        self.settings = InstagramSettings.from_environ(environ, self._context.public_url)
        log.info(
            "instagram: using the credentials the sandbox generated",
            extra={"sandbox_url": url, "flows": sorted(self._flows_configured())},
        )

    def _flows_configured(self) -> set[str]:
        s = self.settings
        return {
            flow
            for flow, configured in (
                (FLOW_INSTAGRAM, s.instagram_flow_configured),
                (FLOW_FACEBOOK, s.facebook_flow_configured),
            )
            if configured
        }

    async def _start_embedded_sandbox(self) -> None:
        sandbox_settings = SandboxSettings.generate(
            webhook_url=self._context.webhook_url(self.name),
            webhook_verify_token=self.settings.webhook_verify_token.reveal(),
        )
        self._sandbox = await start_sandbox(sandbox_settings)
        environ = {
            **self._context.environ,
            **sandbox_settings.credentials(),
            "INSTAGRAM_SANDBOX_URL": self._sandbox.url,
        }
        self.settings = InstagramSettings.from_environ(environ, self._context.public_url)
        log.warning(
            "instagram: no Meta credentials given; running against the built-in sandbox "
            "with generated credentials (its control API is at /_sandbox/)",
            extra={"sandbox_url": self._sandbox.url},
        )

    @property
    def sandbox_url(self) -> str:
        """The sandbox this channel talks to, if any."""
        return self.settings.sandbox_url

    async def aclose(self) -> None:
        await self.graph.aclose()
        if self._sandbox is not None:
            await self._sandbox.aclose()
            self._sandbox = None
