"""The channel plugin interface: what a channel (Instagram, Messenger, WhatsApp, ...) provides.

A plugin is a class registered under the entry-point group ``switchboard.channels``; the
gateway builds it with :meth:`ChannelPlugin.create` and a :class:`ChannelContext`. The core
only speaks to channels through this interface, with framework-free HTTP types, so a new
channel is a new package and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from gateway.domain.inbound import ChannelInbound, ProfileSource


@dataclass(frozen=True, slots=True)
class LoginFlowInfo:
    name: str
    display_name: str
    scopes: tuple[str, ...]
    configured: bool


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    name: str
    display_name: str
    capabilities: tuple[str, ...]
    login_flows: tuple[LoginFlowInfo, ...]
    default_login_flow: str
    configured: bool
    sandbox: bool


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """An HTTP request handed to a plugin by the sidecar (body already size-limited)."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, status: int, text: str) -> HttpResponse:
        return cls(status=status, body=text.encode(), content_type="text/plain")


@dataclass(frozen=True, slots=True)
class ChannelContext:
    """What the gateway gives a plugin: its environment and public URLs.

    ``embedded``: the gateway runs on its embedded default (SQLite, the in-process bus), a
    developer's machine: a plugin without credentials may run a stand-in for its platform
    in the process. Never elsewhere: a production deployment missing its credentials would
    otherwise serve a stand-in whose control API hands out its secrets and signs webhooks.
    """

    environ: Mapping[str, str]
    public_url: str
    embedded: bool = False

    def callback_url(self, channel: str) -> str:
        return f"{self.public_url.rstrip('/')}/oauth/{channel}/callback"

    def webhook_url(self, channel: str) -> str:
        return f"{self.public_url.rstrip('/')}/webhooks/{channel}"


class ChannelPlugin(Protocol):
    name: ClassVar[str]
    # The webhook endpoint: verification, signature, normalization (gateway.domain.inbound).
    inbound: ChannelInbound
    # Customer profiles for enrichment; None when the channel has no such lookup.
    profiles: ProfileSource | None

    @classmethod
    def create(cls, context: ChannelContext) -> ChannelPlugin:
        """Builds the plugin from the environment; raises ConfigError on bad settings."""

    def info(self) -> ChannelInfo: ...
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
