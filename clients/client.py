"""A small asyncio client: one channel, the bearer token on every call, both stubs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from switchboard.v1 import connect_pb2_grpc, messaging_pb2_grpc


class _Bearer:
    """Adds ``authorization: Bearer`` to every call, also on plaintext channels (where
    grpc's call credentials refuse to travel)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files each interceptor under the first call kind it matches, so one object per
# kind: a single class deriving from all four would only ever see unary-unary calls.
class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, bearer: _Bearer) -> None:
        self._bearer = bearer

    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        return await continuation(self._bearer.details(details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, bearer: _Bearer) -> None:
        self._bearer = bearer

    async def intercept_unary_stream(
        self, continuation: Callable[..., Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        return await continuation(self._bearer.details(details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, bearer: _Bearer) -> None:
        self._bearer = bearer

    async def intercept_stream_unary(
        self, continuation: Callable[..., Awaitable[Any]], details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._bearer.details(details), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, bearer: _Bearer) -> None:
        self._bearer = bearer

    async def intercept_stream_stream(
        self, continuation: Callable[..., Awaitable[Any]], details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._bearer.details(details), request_iterator)


class SwitchboardClient:
    """``async with SwitchboardClient("127.0.0.1:50051", token) as sb: await sb.connect...``"""

    def __init__(
        self, target: str, token: str, *, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        bearer = _Bearer(token)
        interceptors: list[grpc.aio.ClientInterceptor] = [
            _UnaryUnary(bearer),
            _UnaryStream(bearer),
            _StreamUnary(bearer),
            _StreamStream(bearer),
        ]
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, interceptors=interceptors)
        else:
            self.channel = grpc.aio.secure_channel(target, credentials, interceptors=interceptors)
        self.connect = connect_pb2_grpc.ChannelConnectStub(self.channel)
        self.messaging = messaging_pb2_grpc.MessagingStub(self.channel)

    async def __aenter__(self) -> SwitchboardClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()
