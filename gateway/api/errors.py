"""The one table from domain errors to gRPC status codes, with google.rpc.ErrorInfo details."""

from __future__ import annotations

from typing import NamedTuple

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gateway.domain import errors
from gateway.observability.logging import request_id_var

DOMAIN = "switchboard.dev"

# Most specific first: the first matching class wins.
_TABLE: tuple[tuple[type[errors.SwitchboardError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.ChannelAuthError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ChannelRateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ChannelTransientError, grpc.StatusCode.UNAVAILABLE),
    (errors.ChannelRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ChannelError, grpc.StatusCode.UNAVAILABLE),
    (errors.ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_code_for(error: errors.SwitchboardError) -> grpc.StatusCode:
    for cls, code in _TABLE:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def to_status(error: errors.SwitchboardError) -> grpc.Status:
    """A grpc.Status carrying the message and an ErrorInfo(reason, domain, metadata), then,
    for a bad field, a BadRequest naming it: the detail generic gRPC tooling and other
    languages' client libraries look for on INVALID_ARGUMENT."""
    code = status_code_for(error)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=DOMAIN, metadata=dict(error.metadata)
    )
    details = [_packed(info)]
    if isinstance(error, errors.InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field,
            description=error.message.removeprefix(f"{error.field}: "),
        )
        details.append(_packed(error_details_pb2.BadRequest(field_violations=[violation])))
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=error.message, details=details
    )
    base = rpc_status.to_status(status)
    # abort_with_status replaces the trailers set earlier, so the request id rides along.
    request_id = request_id_var.get()
    trailers = tuple(base.trailing_metadata) + (
        (("x-request-id", request_id),) if request_id else ()
    )
    return _Status(base.code, base.details, trailers)


def _packed(detail: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


class _StatusFields(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class _Status(_StatusFields, grpc.Status):
    """What abort_with_status takes: grpc.Status with the three fields it reads."""
