"""Typing helpers for grpc.aio (its stubs make contexts generic; the runtime classes are not)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio

if TYPE_CHECKING:
    Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Ctx = grpc.aio.ServicerContext
    Handler = grpc.RpcMethodHandler
