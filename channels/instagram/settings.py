"""The Instagram plugin's settings, read from the environment the gateway was given."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.config import Secret, read_number
from gateway.domain.errors import ConfigError

FLOW_FACEBOOK = "facebook"
FLOW_INSTAGRAM = "instagram"

FACEBOOK_SCOPES = (
    "instagram_basic",
    "instagram_manage_messages",
    "pages_manage_metadata",
    "pages_show_list",
    "pages_read_engagement",
)
INSTAGRAM_SCOPES = ("instagram_business_basic", "instagram_business_manage_messages")

# Where each Meta host is found; INSTAGRAM_SANDBOX_URL points them all at one sandbox.
META_HOSTS: dict[str, str] = {
    "INSTAGRAM_FACEBOOK_WWW_URL": "https://www.facebook.com",
    "INSTAGRAM_GRAPH_FACEBOOK_URL": "https://graph.facebook.com",
    "INSTAGRAM_WWW_URL": "https://www.instagram.com",
    "INSTAGRAM_API_URL": "https://api.instagram.com",
    "INSTAGRAM_GRAPH_URL": "https://graph.instagram.com",
}
DEFAULT_GRAPH_VERSION = "v21.0"
DEFAULT_API_TIMEOUT_S = 15.0
_VERSION = re.compile(r"^v\d+\.\d+$")
_SCOPE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class InstagramSettings:
    instagram_app_id: str
    instagram_app_secret: Secret
    facebook_app_id: str
    facebook_app_secret: Secret
    webhook_verify_token: Secret
    redirect_uri: str
    graph_version: str
    base_urls: Mapping[str, str]
    sandbox_url: str
    # Facebook Login's scopes: ours, and FACEBOOK_LOGIN_EXTRA_SCOPES (business_management
    # when the businesses' Pages sit in a business portfolio, INSTAGRAM.md §1).
    facebook_scopes: tuple[str, ...] = FACEBOOK_SCOPES
    # How long a call to Meta may take, answer included. A send that runs out of it may
    # still have been delivered: its retry waits for the echo first.
    api_timeout_s: float = DEFAULT_API_TIMEOUT_S

    @property
    def instagram_flow_configured(self) -> bool:
        return bool(self.instagram_app_id and self.instagram_app_secret)

    @property
    def facebook_flow_configured(self) -> bool:
        return bool(self.facebook_app_id and self.facebook_app_secret)

    @property
    def default_flow(self) -> str:
        if self.instagram_flow_configured or not self.facebook_flow_configured:
            return FLOW_INSTAGRAM
        return FLOW_FACEBOOK

    @property
    def uses_sandbox(self) -> bool:
        return bool(self.sandbox_url)

    def app_secrets(self) -> list[bytes]:
        """Every configured secret: which one signs Instagram-Login webhooks is undocumented."""
        return [
            s.reveal().encode() for s in (self.instagram_app_secret, self.facebook_app_secret) if s
        ]

    @classmethod
    def from_environ(cls, env: Mapping[str, str], public_url: str) -> InstagramSettings:
        problems: list[str] = []

        def get(name: str) -> str:
            return env.get(name, "").strip()

        for id_name, secret_name in (
            ("INSTAGRAM_APP_ID", "INSTAGRAM_APP_SECRET"),
            ("FACEBOOK_APP_ID", "FACEBOOK_APP_SECRET"),
        ):
            if bool(get(id_name)) != bool(get(secret_name)):
                problems.append(f"{id_name} and {secret_name}: set both or neither")
            if get(id_name) and not get(id_name).isdigit():
                problems.append(f"{id_name}: must be the app's numeric id")

        sandbox_url = get("INSTAGRAM_SANDBOX_URL").rstrip("/")
        base_urls = dict(META_HOSTS)
        if sandbox_url:
            from channels.instagram.sandbox import sandbox_base_urls

            base_urls.update(sandbox_base_urls(sandbox_url))
        for name in META_HOSTS:
            if get(name):
                base_urls[name] = get(name).rstrip("/")
        for name, url in [*base_urls.items(), ("INSTAGRAM_SANDBOX_URL", sandbox_url)]:
            if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
                problems.append(f"{name}: {url!r} is not an absolute http(s) URL")

        version = get("INSTAGRAM_GRAPH_API_VERSION") or DEFAULT_GRAPH_VERSION
        if not _VERSION.match(version):
            problems.append(f"INSTAGRAM_GRAPH_API_VERSION: {version!r} is not like v21.0")

        if (
            (get("INSTAGRAM_APP_ID") or get("FACEBOOK_APP_ID"))
            and not sandbox_url
            and not get("INSTAGRAM_WEBHOOK_VERIFY_TOKEN")
        ):
            # A generated token differs on every replica and restart, so Meta's webhook
            # verification would fail with nothing said at start.
            problems.append(
                "INSTAGRAM_WEBHOOK_VERIFY_TOKEN: required with Meta app credentials"
                " (the value given to Meta's webhook settings)"
            )

        extra_scopes = tuple(
            dict.fromkeys(s.strip() for s in get("FACEBOOK_LOGIN_EXTRA_SCOPES").split(","))
        )
        extra_scopes = tuple(s for s in extra_scopes if s and s not in FACEBOOK_SCOPES)
        for scope in extra_scopes:
            if not _SCOPE.match(scope):
                problems.append(f"FACEBOOK_LOGIN_EXTRA_SCOPES: {scope!r} is not a permission name")

        api_timeout_s = read_number(
            "INSTAGRAM_API_TIMEOUT_SECONDS",
            get("INSTAGRAM_API_TIMEOUT_SECONDS"),
            DEFAULT_API_TIMEOUT_S,
            low=0.1,
            high=300,
            problems=problems,
        )

        redirect_uri = get("INSTAGRAM_REDIRECT_URI") or (
            f"{public_url.rstrip('/')}/oauth/instagram/callback"
        )
        if problems:
            raise ConfigError(problems)
        # Generated so that the sandbox needs no setup; against Meta it is required (above).
        verify_token = get("INSTAGRAM_WEBHOOK_VERIFY_TOKEN") or secrets.token_urlsafe(24)
        return cls(
            instagram_app_id=get("INSTAGRAM_APP_ID"),
            instagram_app_secret=Secret(get("INSTAGRAM_APP_SECRET")),
            facebook_app_id=get("FACEBOOK_APP_ID"),
            facebook_app_secret=Secret(get("FACEBOOK_APP_SECRET")),
            webhook_verify_token=Secret(verify_token),
            redirect_uri=redirect_uri,
            graph_version=version,
            base_urls=base_urls,
            sandbox_url=sandbox_url,
            facebook_scopes=FACEBOOK_SCOPES + extra_scopes,
            api_timeout_s=api_timeout_s,
        )
