"""Connecting a tenant's channel account: start, complete (the OAuth redirect), disconnect.

The same core path serves the sidecar's ``/oauth/{channel}/callback`` and
``ChannelConnect.CompleteConnect``. What only the channel knows is behind its
:class:`~gateway.domain.connect.ChannelConnector`; everything here is channel-neutral.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from gateway.config import origin_of
from gateway.domain.connect import ChannelConnector, Grant, GrantedAccount, connector_of
from gateway.domain.errors import (
    AlreadyExists,
    ChannelError,
    ChannelRequestError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SwitchboardError,
)
from gateway.domain.ids import new_id
from gateway.domain.models import Account, Connection, ConnectionStatus, Credential, OAuthState
from gateway.domain.store import Store
from gateway.plugins import ChannelRegistry
from gateway.security.keyring import DecryptionError, KeyRing
from gateway.security.oauth_state import (
    STATE_TTL,
    OAuthStateStore,
    hash_state,
    new_state,
)
from gateway.services.connection_status import Notify, change_status, nothing
from gateway.services.credentials import seal, unseal

log = logging.getLogger(__name__)

MAX_TENANT_ID = 128
MAX_RETURN_URL = 2048

# Called with the tenant a flow belongs to, before anything is exchanged: the gRPC front
# door passes its tenant check, so a caller cannot finish another tenant's flow.
Authorize = Callable[[str], None]


def _allow_all(_: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class StartedConnect:
    authorization_url: str
    state: str = field(repr=False)
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class CompletedConnect:
    connection: Connection
    available_accounts: tuple[Account, ...]
    return_url: str


class ConnectService:
    def __init__(
        self,
        store: Store,
        channels: ChannelRegistry,
        keyring: KeyRing,
        states: OAuthStateStore,
        *,
        allowed_return_origins: tuple[str, ...],
        state_ttl: timedelta = STATE_TTL,
        notify: Notify = nothing,
    ) -> None:
        self._store = store
        # After a status change committed: its ConnectionChanged goes out now.
        self._notify = notify
        self._channels = channels
        self._keyring = keyring
        self._states = states
        self._origins = frozenset(o.lower() for o in allowed_return_origins)
        # Public so that tests can make states expire at once.
        self.state_ttl = state_ttl

    # ---- start ----

    async def start(
        self,
        *,
        tenant_id: str,
        channel: str,
        return_url: str = "",
        login_flow: str = "",
        authorize: Authorize = _allow_all,
    ) -> StartedConnect:
        tenant_id = self._tenant(tenant_id)
        authorize(tenant_id)
        connector, flow = self._connector(channel, login_flow)
        return_url = self._return_url(return_url)
        state = new_state()
        now = datetime.now(UTC)
        record = OAuthState(
            state_hash=hash_state(state),
            tenant_id=tenant_id,
            channel=channel,
            login_flow=flow,
            return_url=return_url,
            expires_at=now + self.state_ttl,
            created_at=now,
        )
        url = connector.authorization_url(flow, state)
        await self._states.put(record)
        log.info(
            "connect started", extra={"tenant_id": tenant_id, "channel": channel, "flow": flow}
        )
        return StartedConnect(authorization_url=url, state=state, expires_at=record.expires_at)

    @staticmethod
    def _tenant(tenant_id: str) -> str:
        tenant_id = tenant_id.strip()
        if not tenant_id:
            raise InvalidArgument("tenant_id", "must not be empty")
        if len(tenant_id) > MAX_TENANT_ID:
            raise InvalidArgument("tenant_id", f"must be at most {MAX_TENANT_ID} characters")
        return tenant_id

    def _connector(self, channel: str, login_flow: str) -> tuple[ChannelConnector, str]:
        if not channel.strip():
            raise InvalidArgument("channel", "must not be empty")
        plugin = self._channels.require(channel)
        connector = connector_of(plugin)
        if connector is None:
            raise FailedPrecondition(
                f"channel {channel!r} has no OAuth connect", reason="CONNECT_UNSUPPORTED"
            )
        info = plugin.info()
        flow = login_flow.strip() or info.default_login_flow
        flows = {f.name: f for f in info.login_flows}
        if flow not in flows:
            raise InvalidArgument(
                "login_flow", f"must be one of {', '.join(sorted(flows))} (got {flow!r})"
            )
        if not flows[flow].configured:
            raise FailedPrecondition(
                f"the {flow} login flow of {channel} is not configured",
                reason="LOGIN_FLOW_NOT_CONFIGURED",
                metadata={"login_flow": flow},
            )
        return connector, flow

    def _return_url(self, url: str) -> str:
        url = url.strip()
        if not url:
            return ""
        if len(url) > MAX_RETURN_URL:
            raise InvalidArgument("return_url", f"must be at most {MAX_RETURN_URL} characters")
        try:
            parts = urlsplit(url)
        except ValueError:  # a bracketed host left open, say
            raise InvalidArgument("return_url", "is not a URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgument("return_url", "must be an absolute http(s) URL")
        if parts.username is not None or parts.password is not None:
            raise InvalidArgument("return_url", "must not carry credentials")
        if origin_of(url) not in self._origins:
            # Not naming the allowed origins: the list is the operator's business.
            raise InvalidArgument(
                "return_url",
                f"origin {origin_of(url)} is not allowed (SWITCHBOARD_ALLOWED_RETURN_ORIGINS)",
                reason="RETURN_URL_NOT_ALLOWED",
            )
        return url

    # ---- complete ----

    async def consume_state(self, channel: str, state: str) -> OAuthState:
        """The pending flow of ``state``, removed so that it works once. ``channel`` empty:
        the one the state was issued for. A call that names another channel leaves the
        state as it was, so that a mistaken call does not cost the user the flow."""
        if not state.strip():
            raise InvalidArgument("state", "must not be empty", reason="OAUTH_STATE_INVALID")
        if channel.strip():
            self._channels.require(channel)
        record = await self._states.take(hash_state(state.strip()), datetime.now(UTC))
        if record is None:
            raise InvalidArgument(
                "state",
                "unknown, expired or already used: start the connection again",
                reason="OAUTH_STATE_INVALID",
            )
        if channel.strip() and record.channel != channel:
            await self._states.put(record)
            raise InvalidArgument(
                "channel",
                f"the state was issued for {record.channel!r}",
                reason="OAUTH_STATE_INVALID",
            )
        return record

    async def complete(
        self,
        *,
        channel: str,
        code: str,
        state: str,
        account_external_id: str = "",
        authorize: Authorize = _allow_all,
    ) -> CompletedConnect:
        # Codes come in the query string: what follows a '#' is the fragment a provider
        # appends to its redirect (Instagram "#_", Facebook "#_=_"), never the code. Checked
        # before the state is spent, which a refusal before the exchange must not do.
        code = code.strip().split("#", 1)[0]
        if not code:
            raise InvalidArgument("code", "must not be empty")
        record = await self.consume_state(channel, state)
        try:
            authorize(record.tenant_id)
        except SwitchboardError:
            # A caller who may not act for the tenant does not get to spend its flow.
            await self._states.put(record)
            raise
        return await self.finish(
            record, code, account_external_id=account_external_id, code_field="code"
        )

    async def finish(
        self,
        record: OAuthState,
        code: str,
        *,
        account_external_id: str = "",
        code_field: str = "",
    ) -> CompletedConnect:
        """Exchanges the code of a consumed state, stores the connection and subscribes.
        ``code_field``: the request field that carried the code, named by the
        INVALID_ARGUMENT a refused exchange then raises (else the channel's own error)."""
        connector, _ = self._connector(record.channel, record.login_flow)
        try:
            grant = await connector.exchange(record.login_flow, code)
        except ChannelRequestError as exc:
            if not code_field:
                raise
            raise InvalidArgument(
                code_field,
                f"the channel refused it: {exc.message}",
                reason=exc.reason,
                metadata=exc.metadata,
            ) from None
        chosen = self._choose(grant, account_external_id)
        account = chosen.account
        async with self._store.transaction() as tx:
            existing = await tx.find_connection_by_account(record.channel, account.external_id)
        if existing is not None and existing.tenant_id != record.tenant_id:
            raise AlreadyExists(
                f"this {record.channel} account is connected by another tenant",
                reason="ACCOUNT_ALREADY_CONNECTED",
                metadata={"channel": record.channel},
            )
        await connector.subscribe(record.login_flow, account, chosen.token)
        previous: Credential | None = None
        # Connected before with the other flow, which subscribed another object (the
        # account, or its page).
        other_flow = (
            existing if existing is not None and existing.login_flow != grant.login_flow else None
        )
        if other_flow is not None:
            # Removed with its own token, which the new one is about to replace; else Meta
            # would go on sending, and nothing could unsubscribe it any more.
            async with self._store.transaction() as tx:
                previous = await tx.get_credential(other_flow.id)
        conn = await self._save(record, grant, chosen, existing)
        if other_flow is not None:
            failure = await self._unsubscribe(other_flow, previous)
            if failure:
                log.warning(
                    "the previous login flow's webhook subscription was not removed",
                    extra={"connection_id": conn.id, "flow": other_flow.login_flow, "why": failure},
                )
        log.info(
            "connection connected",
            extra={
                "connection_id": conn.id,
                "tenant_id": conn.tenant_id,
                "channel": conn.channel,
                "flow": conn.login_flow,
                "account_id": account.external_id,
                "reconnected": existing is not None,
            },
        )
        return CompletedConnect(
            connection=conn,
            available_accounts=tuple(a.account for a in grant.accounts),
            return_url=record.return_url,
        )

    @staticmethod
    def _choose(grant: Grant, account_external_id: str) -> GrantedAccount:
        if not grant.accounts:
            raise FailedPrecondition(
                "the authorization covers no account that can be connected "
                "(Facebook Login: no page with an Instagram professional account)",
                reason="NO_ACCOUNT",
            )
        if not account_external_id:
            return grant.accounts[0]
        for granted in grant.accounts:
            if account_external_id in (granted.account.external_id, granted.account.page_id):
                return granted
        raise FailedPrecondition(
            f"the authorization does not cover account {account_external_id}",
            reason="ACCOUNT_NOT_GRANTED",
            metadata={"account_external_id": account_external_id},
        )

    async def _save(
        self,
        record: OAuthState,
        grant: Grant,
        chosen: GrantedAccount,
        existing: Connection | None,
    ) -> Connection:
        now = datetime.now(UTC)
        async with self._store.transaction() as tx:
            # Re-read inside the transaction: a disconnect may have happened meanwhile.
            current = await tx.get_connection(existing.id, for_update=True) if existing else None
            if current is not None and current.status is ConnectionStatus.DISCONNECTED:
                current = None
            conn = Connection(
                id=current.id if current else new_id("conn"),
                tenant_id=record.tenant_id,
                channel=record.channel,
                status=current.status if current else ConnectionStatus.PENDING,
                account=chosen.account,
                login_flow=grant.login_flow,
                scopes=grant.scopes,
                token_expires_at=chosen.token.expires_at,
                connected_at=now,
                last_event_at=current.last_event_at if current else None,
                last_error="",
                created_at=current.created_at if current else None,
            )
            reason = "reconnected" if current else "connected"
            await change_status(tx, conn, ConnectionStatus.CONNECTED, reason, now)
            await tx.put_credential(seal(self._keyring, conn.id, chosen.token))
            # A fresh token ends any refresh back-off of the previous one.
            await tx.set_connection_claim(conn.id, None)
        self._notify()
        return conn

    # ---- disconnect ----

    async def disconnect(
        self, connection_id: str, *, authorize: Authorize = _allow_all
    ) -> Connection:
        """Unsubscribes (best effort), destroys the credentials, DISCONNECTED; idempotent."""
        connection_id = connection_id.strip()
        if not connection_id:
            raise InvalidArgument("connection_id", "must not be empty")
        async with self._store.transaction() as tx:
            conn = await tx.get_connection(connection_id)
            credential = await tx.get_credential(connection_id) if conn else None
        if conn is None:
            raise NotFound(
                f"no connection {connection_id!r}", metadata={"connection_id": connection_id}
            )
        authorize(conn.tenant_id)
        if conn.status is ConnectionStatus.DISCONNECTED:
            return conn
        failure = await self._unsubscribe(conn, credential)
        now = datetime.now(UTC)
        async with self._store.transaction() as tx:
            current = await tx.get_connection(connection_id, for_update=True)
            if current is None or current.status is ConnectionStatus.DISCONNECTED:
                return current or conn
            await tx.delete_credential(connection_id)
            current.last_error = failure
            current.token_expires_at = None
            reason = (
                f"disconnected; webhooks not unsubscribed: {failure}"
                if failure
                else "disconnected; webhooks unsubscribed"
            )
            await change_status(tx, current, ConnectionStatus.DISCONNECTED, reason, now)
        self._notify()
        log.info(
            "connection disconnected",
            extra={
                "connection_id": current.id,
                "tenant_id": current.tenant_id,
                "unsubscribed": not failure,
            },
        )
        return current

    async def _unsubscribe(self, conn: Connection, credential: Credential | None) -> str:
        """Empty on success, else why the subscription could not be removed."""
        plugin = self._channels.get(conn.channel)
        connector = connector_of(plugin) if plugin is not None else None
        if connector is None:
            return f"channel {conn.channel} is not installed"
        if credential is None:
            return "no stored credentials to unsubscribe with"
        try:
            token = unseal(self._keyring, credential)
            await connector.unsubscribe(conn.login_flow, conn.account, token)
        except DecryptionError as exc:
            return f"the credentials do not open ({exc.message})"
        except ChannelError as exc:
            return f"the channel refused ({exc.reason}: {exc.message})"
        return ""
