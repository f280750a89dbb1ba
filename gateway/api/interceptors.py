"""Server interceptors: request id + call log, metrics, auth, and error mapping.

Each interceptor wraps the method handler's behaviour (unary or response-streaming) with
an ``around`` step; they are installed outermost first::

    RequestIdInterceptor -> MetricsInterceptor -> AuthInterceptor -> ErrorInterceptor
        -> TextInterceptor -> servicer
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from gateway.api.context import Ctx, Handler
from gateway.api.errors import to_status
from gateway.api.text_fields import refuse_nul
from gateway.domain.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SwitchboardError,
    Unauthenticated,
)
from gateway.domain.models import ApiToken, Scope
from gateway.observability import metrics
from gateway.observability.logging import is_request_id, request_id_var
from gateway.security.tokens import TokenAuthority

log = logging.getLogger("gateway.api")

_token_var: contextvars.ContextVar[ApiToken | None] = contextvars.ContextVar(
    "api_token", default=None
)
# Authenticates the caller's token again: a stream can outlive the token's revocation.
_recheck_var: contextvars.ContextVar[Callable[[], Awaitable[ApiToken]] | None] = (
    contextvars.ContextVar("api_token_recheck", default=None)
)

API_PACKAGE = "switchboard.v1."

# The scope each RPC needs; an RPC of the API missing here needs ``admin``.
REQUIRED_SCOPE: dict[str, Scope] = {
    "/switchboard.v1.ChannelConnect/ListChannels": Scope.READ,
    "/switchboard.v1.ChannelConnect/StartConnect": Scope.CONNECT,
    "/switchboard.v1.ChannelConnect/CompleteConnect": Scope.CONNECT,
    "/switchboard.v1.ChannelConnect/GetConnection": Scope.READ,
    "/switchboard.v1.ChannelConnect/ListConnections": Scope.READ,
    "/switchboard.v1.ChannelConnect/Disconnect": Scope.CONNECT,
    "/switchboard.v1.Messaging/SendMessage": Scope.SEND,
    "/switchboard.v1.Messaging/GetMessage": Scope.READ,
    "/switchboard.v1.Messaging/ListConversations": Scope.READ,
    "/switchboard.v1.Messaging/GetConversation": Scope.READ,
    "/switchboard.v1.Messaging/ListMessages": Scope.READ,
    "/switchboard.v1.Messaging/Subscribe": Scope.SUBSCRIBE,
}


async def recheck_caller() -> None:
    """Raises Unauthenticated once the caller's token is revoked (seen within the token
    cache's lifetime, as for new calls); StoreUnavailable when that cannot be told now."""
    recheck = _recheck_var.get()
    if recheck is not None:
        await recheck()


def current_token() -> ApiToken:
    """The authenticated caller of the RPC being served."""
    token = _token_var.get()
    if token is None:
        raise Unauthenticated("no authenticated caller")
    return token


def require_owner(tenant_id: str, kind: str, ident: str) -> None:
    """For a resource named by its id: one of a tenant the token may not act for is
    NOT_FOUND, word for word as if it did not exist, so that the answer tells neither that
    it exists nor whose it is (ids cannot be probed across tenants)."""
    if not current_token().allows_tenant(tenant_id):
        raise NotFound(f"no {kind} {ident!r}", metadata={f"{kind}_id": ident})


def require_tenant(tenant_id: str) -> None:
    """PERMISSION_DENIED unless the caller's token may act for ``tenant_id``. An empty one is
    INVALID_ARGUMENT whatever the token: a field left unset is the request's fault, and the
    answer must not depend on which tenants the token names."""
    # Compared as the services read it (trimmed), or a padded id would be the token's
    # own tenant to them and another one here.
    tenant_id = tenant_id.strip()
    if not tenant_id:
        raise InvalidArgument("tenant_id", "must not be empty")
    if not current_token().allows_tenant(tenant_id):
        raise PermissionDenied(
            f"the token may not act for tenant {tenant_id!r}",
            reason="TENANT_NOT_ALLOWED",
            metadata={"tenant_id": tenant_id},
        )


@dataclass(frozen=True, slots=True)
class MethodInfo:
    full: str
    service: str
    method: str
    grpc_type: str

    @property
    def is_api(self) -> bool:
        return self.service.startswith(API_PACKAGE)


Behavior = Callable[..., Any]


class _AroundInterceptor(grpc.aio.ServerInterceptor):
    """Base: subclasses implement ``around_unary`` and ``around_stream``."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        # A method's handler is the same object call after call: wrap it once, not per call.
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, _method_info(method, handler))
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    @functools.cached_property
    def _wrapped(self) -> dict[str, tuple[Handler, Handler]]:
        return {}

    def _wrap(self, handler: Handler, info: MethodInfo) -> Handler:
        if not self.applies(info):
            return handler
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary or handler.stream_unary:
            inner: Behavior = handler.unary_unary or handler.stream_unary  # type: ignore[assignment]

            async def unary(request: Any, context: Ctx) -> Any:
                return await self.around_unary(info, inner, request, context)

            factory = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler
            )
            return factory(unary, **kwargs)
        inner_stream: Behavior = handler.unary_stream or handler.stream_stream  # type: ignore[assignment]

        # grpc.aio decides sync vs async by the function's kind: it must be an async generator.
        async def stream(request: Any, context: Ctx) -> AsyncIterator[Any]:
            async for item in self.around_stream(info, inner_stream, request, context):
                yield item

        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        return factory(stream, **kwargs)

    def applies(self, info: MethodInfo) -> bool:
        return True

    async def around_unary(
        self, info: MethodInfo, behavior: Behavior, request: Any, context: Ctx
    ) -> Any:
        return await behavior(request, context)

    async def around_stream(
        self, info: MethodInfo, behavior: Behavior, request: Any, context: Ctx
    ) -> AsyncIterator[Any]:
        async for item in _responses(behavior, request, context):
            yield item


async def _responses(behavior: Behavior, request: Any, context: Ctx) -> AsyncIterator[Any]:
    """The responses of a streaming behaviour, whether it yields them or writes them itself
    with ``context.write`` (as grpc's own health Watch does)."""
    result = behavior(request, context)
    if inspect.isawaitable(result):
        await result
        return
    async for item in result:
        yield item


def _method_info(full: str, handler: Handler) -> MethodInfo:
    _, service, method = full.split("/", 2) if full.count("/") == 2 else ("", "unknown", full)
    if handler.unary_unary:
        kind = "unary"
    elif handler.unary_stream:
        kind = "server_stream"
    elif handler.stream_unary:
        kind = "client_stream"
    else:
        kind = "bidi_stream"
    return MethodInfo(full=full, service=service, method=method, grpc_type=kind)


def _metadata(context: Ctx, key: str) -> str:
    for item_key, value in context.invocation_metadata() or ():
        if item_key == key:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def _code_of(context: Ctx, exc: BaseException | None) -> grpc.StatusCode:
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for candidate in grpc.StatusCode:
            if candidate.value[0] == code:
                return candidate
    return grpc.StatusCode.UNKNOWN if exc is not None else grpc.StatusCode.OK


class _CallObserver(_AroundInterceptor):
    """Base of the interceptors that note a call's start, each message it streams, and its
    outcome (status code and duration), whether the call returns, fails or is cancelled."""

    def _started(self, info: MethodInfo, context: Ctx) -> Any:
        """Called first; what it returns is handed to ``_sent`` and ``_ended``."""

    def _sent(self, state: Any) -> None:
        """A streaming call is about to send a message."""

    def _ended(
        self, info: MethodInfo, context: Ctx, state: Any, start: float, exc: BaseException | None
    ) -> None:
        """The call finished (``exc`` set when it raised)."""

    async def around_unary(
        self, info: MethodInfo, behavior: Behavior, request: Any, context: Ctx
    ) -> Any:
        state = self._started(info, context)
        start = time.perf_counter()
        exc: BaseException | None = None
        try:
            return await behavior(request, context)
        except BaseException as caught:
            exc = caught
            raise
        finally:
            self._ended(info, context, state, start, exc)

    async def around_stream(
        self, info: MethodInfo, behavior: Behavior, request: Any, context: Ctx
    ) -> AsyncIterator[Any]:
        state = self._started(info, context)
        start = time.perf_counter()
        exc: BaseException | None = None
        try:
            async for item in _responses(behavior, request, context):
                self._sent(state)
                yield item
        except BaseException as caught:
            exc = caught
            raise
        finally:
            self._ended(info, context, state, start, exc)


class RequestIdInterceptor(_CallObserver):
    """Binds a request id (the caller's ``x-request-id`` or a new one) to every log line of
    the call, returns it in the trailing metadata, and logs one line per finished call."""

    def _started(self, info: MethodInfo, context: Ctx) -> None:
        request_id = _metadata(context, "x-request-id")
        if not is_request_id(request_id):
            request_id = secrets.token_hex(8)
        request_id_var.set(request_id)
        # Trailers travel with the status; initial metadata would cost a frame of its own.
        context.set_trailing_metadata((("x-request-id", request_id),))

    def _ended(
        self, info: MethodInfo, context: Ctx, state: Any, start: float, exc: BaseException | None
    ) -> None:
        code = _code_of(context, exc)
        level = logging.INFO if info.is_api else logging.DEBUG
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            level = logging.ERROR
        log.log(
            level,
            "rpc finished",
            extra={
                "method": info.full,
                "code": code.name,
                "duration_ms": round((time.perf_counter() - start) * 1000, 2),
            },
        )


class MetricsInterceptor(_CallObserver):
    """grpc_server_started_total / handled_total / handling_seconds / msg_received_total /
    msg_sent_total, as grpc-prometheus counts them: a unary call receives one message and
    sends one when it succeeds; a stream's messages sent are counted one by one (its
    client's messages, after the first, are not)."""

    def _started(self, info: MethodInfo, context: Ctx) -> tuple[tuple[str, str, str], Any]:
        labels = (info.grpc_type, info.service, info.method)
        metrics.grpc_server_started_total.labels(*labels).inc()
        metrics.grpc_server_msg_received_total.labels(*labels).inc()
        # Looked up once per call, not per streamed message.
        return labels, metrics.grpc_server_msg_sent_total.labels(*labels)

    def _sent(self, state: Any) -> None:
        state[1].inc()

    def _ended(
        self, info: MethodInfo, context: Ctx, state: Any, start: float, exc: BaseException | None
    ) -> None:
        labels = state[0]
        if exc is None and info.grpc_type in ("unary", "client_stream"):
            state[1].inc()
        metrics.grpc_server_handled_total.labels(
            *labels, metrics.GRPC_CODE_NAMES[_code_of(context, exc)]
        ).inc()
        metrics.grpc_server_handling_seconds.labels(*labels).observe(time.perf_counter() - start)


class AuthInterceptor(_AroundInterceptor):
    """``authorization: Bearer <token>`` on every API call; health and reflection are open
    so that probes and tooling work without a token."""

    def __init__(self, authority: TokenAuthority) -> None:
        self._authority = authority

    def applies(self, info: MethodInfo) -> bool:
        return info.is_api

    async def _authenticate(self, info: MethodInfo, context: Ctx) -> None:
        try:
            header = _metadata(context, "authorization")
            scheme, _, token = header.partition(" ")
            if header.strip() and (scheme.lower() != "bearer" or not token.strip()):
                raise Unauthenticated(
                    "the authorization metadata must be 'Bearer <token>'",
                    reason="MALFORMED_TOKEN",
                )
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated(
                    "missing 'authorization: Bearer <token>' metadata", reason="MISSING_TOKEN"
                )
            record = await self._authority.authenticate(token.strip())
            needed = REQUIRED_SCOPE.get(info.full, Scope.ADMIN)
            if needed not in record.scopes and Scope.ADMIN not in record.scopes:
                raise PermissionDenied(
                    f"the token lacks the {needed.value!r} scope",
                    reason="SCOPE_MISSING",
                    metadata={"scope": needed.value},
                )
        except SwitchboardError as exc:
            await context.abort_with_status(to_status(exc))
        _token_var.set(record)
        _recheck_var.set(functools.partial(self._authority.authenticate, token.strip()))

    async def around_unary(
        self, info: MethodInfo, behavior: Behavior, request: Any, context: Ctx
    ) -> Any:
        await self._authenticate(info, context)
        return await behavior(request, context)

    async def around_stream(
        self, info: MethodInfo, behavior: Behavior, request: Any, context: Ctx
    ) -> AsyncIterator[Any]:
        await self._authenticate(info, context)
        async for item in _responses(behavior, request, context):
            yield item


class ErrorInterceptor(_AroundInterceptor):
    """Domain errors become status codes with ErrorInfo details; anything else is logged
    with its traceback and answered INTERNAL, never an empty success."""

    def applies(self, info: MethodInfo) -> bool:
        return info.is_api

    async def _abort(self, context: Ctx, exc: Exception) -> None:
        if isinstance(exc, SwitchboardError):
            await context.abort_with_status(to_status(exc))
        log.error("unhandled error in rpc", exc_info=exc)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error (request id {request_id_var.get() or 'unknown'})",
        )

    async def around_unary(
        self, info: MethodInfo, behavior: Behavior, request: Any, context: Ctx
    ) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # mapped, never swallowed: _abort always raises
            await self._abort(context, exc)
            raise

    async def around_stream(
        self, info: MethodInfo, behavior: Behavior, request: Any, context: Ctx
    ) -> AsyncIterator[Any]:
        try:
            async for item in _responses(behavior, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # mapped, never swallowed: _abort always raises
            await self._abort(context, exc)
            raise


class TextInterceptor(_AroundInterceptor):
    """A request whose text holds U+0000 is INVALID_ARGUMENT naming the field, whatever the
    RPC (see :mod:`gateway.api.text_fields`); inside ErrorInterceptor, which maps it."""

    def applies(self, info: MethodInfo) -> bool:
        return info.is_api

    async def around_unary(
        self, info: MethodInfo, behavior: Behavior, request: Any, context: Ctx
    ) -> Any:
        refuse_nul(request)
        return await behavior(request, context)
