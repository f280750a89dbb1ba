"""The channel side of connecting an account: what a plugin's ``connector`` provides.

A channel plugin that supports OAuth connect exposes a :class:`ChannelConnector` as its
``connector`` attribute. The core (``gateway.services.connect``) owns everything that is
the same for every channel — state, storage, encryption, events, refresh scheduling — and
asks the connector only for what the channel's platform decides: the authorization URL,
the code exchange, webhook subscriptions and token refresh.

Connectors report failures with the channel errors of :mod:`gateway.domain.errors`:
``ChannelAuthError`` (the token is dead: re-auth), ``ChannelTransientError`` and
``ChannelRateLimited`` (retry later), ``ChannelRequestError`` (the request is wrong).
Tokens travel as :class:`~gateway.config.Secret` so that no ``repr`` or log line shows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from gateway.config import Secret
from gateway.domain.models import Account


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A token the connection acts with, and what the core needs to schedule its refresh."""

    value: Secret
    issued_at: datetime
    # None: the token does not expire.
    expires_at: datetime | None = None
    # None: the channel cannot refresh it (a rejected token needs a new authorization).
    refreshable_after: datetime | None = None


@dataclass(frozen=True, slots=True)
class GrantedAccount:
    """One account an authorization covers, with the token that acts for it."""

    account: Account
    token: AccessToken


@dataclass(frozen=True, slots=True)
class Grant:
    """What a code exchange yields: the scopes granted and every account they reach."""

    login_flow: str
    scopes: tuple[str, ...]
    accounts: tuple[GrantedAccount, ...]


class ChannelConnector(Protocol):
    """The OAuth and subscription side of a channel plugin."""

    def authorization_url(self, login_flow: str, state: str) -> str:
        """Where to send the browser; the channel redirects back with ``code`` and ``state``."""

    async def exchange(self, login_flow: str, code: str) -> Grant:
        """Trades an authorization code for long-lived tokens and discovers the accounts.
        An empty ``Grant.accounts`` means the authorization reached no usable account."""

    async def subscribe(self, login_flow: str, account: Account, token: AccessToken) -> None:
        """Subscribes the app to the account's webhooks."""

    async def unsubscribe(self, login_flow: str, account: Account, token: AccessToken) -> None:
        """Removes the subscription."""

    async def subscription_active(
        self, login_flow: str, account: Account, token: AccessToken
    ) -> bool:
        """Whether the account's webhooks still reach this app."""

    async def refresh(self, login_flow: str, token: AccessToken) -> AccessToken:
        """A fresh token for one that ``refreshable_after`` allows refreshing."""


def connector_of(plugin: object) -> ChannelConnector | None:
    """The plugin's connector, or None for a channel without OAuth connect."""
    connector: ChannelConnector | None = getattr(plugin, "connector", None)
    return connector
