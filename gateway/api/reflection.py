"""Server reflection under both of its names: ``grpc.reflection.v1`` (what current tools
ask for first) and ``grpc.reflection.v1alpha`` (what older ones know).

grpcio-reflection serves v1alpha only. v1 renamed the package and changed nothing else
(the same messages, field for field), so one servicer answers both: the v1 method reads and
writes v1alpha's messages, which are the same bytes on the wire. The v1 file's descriptor,
v1alpha's under the new package, is added to the pool so that a client can also ask
reflection about itself under v1.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

_ALPHA_PACKAGE = "grpc.reflection.v1alpha"
_V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{_V1_PACKAGE}.ServerReflection"
# The file's name in gRPC's repository, which v1 clients may ask for.
_V1_FILE = "grpc/reflection/v1/reflection.proto"
V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Reflection about ``service_names`` (and itself), under v1 and v1alpha."""
    _add_v1_descriptor()
    servicer = ReflectionServicer((*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))


def _add_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return  # a server started before in this process added it
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    file.name = _V1_FILE
    file.package = _V1_PACKAGE
    file.options.Clear()
    for message in file.message_type:
        for field in message.field:
            if field.type_name.startswith(f".{_ALPHA_PACKAGE}."):
                field.type_name = f".{_V1_PACKAGE}." + field.type_name[len(_ALPHA_PACKAGE) + 2 :]
    for service in file.service:
        for method in service.method:
            for attr in ("input_type", "output_type"):
                name = getattr(method, attr)
                setattr(method, attr, f".{_V1_PACKAGE}." + name[len(_ALPHA_PACKAGE) + 2 :])
    pool.AddSerializedFile(file.SerializeToString())
