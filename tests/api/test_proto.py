"""Our tinker_public.proto against the SDK's: same messages, field numbers, types and labels; and the generated
module is up to date with the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor
from tinker.proto import tinker_public_pb2 as sdk_pb

from tinkerd.api.proto import tinker_public_pb2 as our_pb

SRC = Path(our_pb.__file__).parents[3]
SOURCE = "tinkerd/api/proto/tinker_public.proto"


def _fields(message: Descriptor) -> dict[str, tuple[int, int, str]]:
    return {
        f.name: (f.number, f.type, f.message_type.name if f.message_type else f.enum_type.name if f.enum_type else "")
        for f in message.fields
    }


def _enum(enum: EnumDescriptor) -> dict[str, int]:
    return {value.name: value.number for value in enum.values}


def test_every_sdk_message_has_the_same_fields_here() -> None:
    sdk_messages = sdk_pb.DESCRIPTOR.message_types_by_name
    ours = our_pb.DESCRIPTOR.message_types_by_name
    assert set(sdk_messages) <= set(ours), set(sdk_messages) - set(ours)
    for name, message in sdk_messages.items():
        assert _fields(ours[name]) == _fields(message), name
        for nested in message.nested_types:  # map entries
            assert _fields(ours[name].nested_types_by_name[nested.name]) == _fields(nested), f"{name}.{nested.name}"
    for name, enum in sdk_pb.DESCRIPTOR.enum_types_by_name.items():
        assert _enum(our_pb.DESCRIPTOR.enum_types_by_name[name]) == _enum(enum), name


def _drop_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _drop_json_names(nested)


def test_generated_module_matches_the_proto(tmp_path: Path) -> None:
    """Compares descriptors, not generated text, so a newer protoc (other headers, same schema) still passes."""
    pytest.importorskip("grpc_tools")
    out = tmp_path / "descriptor.pb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--descriptor_set_out={out}", SOURCE],
        cwd=SRC,
        check=True,
    )
    (fresh,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    for message in fresh.message_type:  # protoc fills in json_name here but leaves it out of generated code
        _drop_json_names(message)
    generated = descriptor_pb2.FileDescriptorProto.FromString(our_pb.DESCRIPTOR.serialized_pb)
    assert fresh == generated, "tinker_public_pb2.py is stale: regenerate it (see the .proto's header)"
