"""Caffe's protobuf messages, built at import time from a shipped descriptor.

Why a descriptor and not a generated ``caffe_pb2.py``: a generated module is
tied to the protobuf release of the protoc that wrote it (old ones fail on
protobuf >= 4 with "Descriptors cannot be created directly", new ones refuse
runtimes older than their generator). ``caffe_descriptor.bin`` is a plain
serialized FileDescriptorSet of ``proto/caffe.proto``; every protobuf runtime
(pure Python, C++, upb) can turn it into message classes, so the package works
across protobuf releases and needs no protoc at install time. Only whoever
edits ``proto/caffe.proto`` needs protoc, to run
``tools/gen_proto_descriptor.py``.

Usage::

    from .proto import pb

    net = pb.NetParameter()                     # every top-level message
    pb.PoolingParameter.MAX                     # nested enum values
    pb.V1LayerParameter.CONVOLUTION
    pb.TEST, pb.Phase.Value("TRAIN")            # top-level enum: values + wrapper
    pb.enum("Phase")                            # its EnumDescriptor
    pb.DESCRIPTOR                               # the caffe.proto FileDescriptor
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal import enum_type_wrapper

DESCRIPTOR_FILE = "caffe_descriptor.bin"
PROTO_FILE = "caffe.proto"
MIN_PROTOBUF = (4, 21)  # setup.cfg install_requires


def check_protobuf_runtime(version=None) -> None:
    """A protobuf runtime too old for our descriptor: one line saying what was found and what
    is needed (a raw descriptor error otherwise)."""
    import google.protobuf
    from lrprune_caffe.errors import UserError
    version = version or google.protobuf.__version__
    try:
        found = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return
    if found < MIN_PROTOBUF:
        need = ".".join(map(str, MIN_PROTOBUF))
        raise UserError(f"protobuf {version} is installed; lrprune-caffe needs protobuf >= {need} "
                        f"(pip install -U 'protobuf>={need}')")


def _descriptor_bytes() -> bytes:
    try:
        return resources.files(__package__).joinpath(DESCRIPTOR_FILE).read_bytes()
    except (TypeError, AttributeError, FileNotFoundError, ModuleNotFoundError):
        return Path(__file__).with_name(DESCRIPTOR_FILE).read_bytes()


def _message_class(desc):
    get = getattr(message_factory, "GetMessageClass", None)  # protobuf >= 4.22
    if get is not None:
        return get(desc)
    return message_factory.MessageFactory(desc.file.pool).GetPrototype(desc)


class CaffeProto:
    """Namespace of the caffe.proto message classes and top-level enums."""

    def __init__(self, data: bytes):
        fds = descriptor_pb2.FileDescriptorSet.FromString(data)
        self.pool = descriptor_pool.DescriptorPool()  # private: no clash with any caffe_pb2
        for file_proto in fds.file:
            self.pool.AddSerializedFile(file_proto.SerializeToString())
        self.DESCRIPTOR = self.pool.FindFileByName(PROTO_FILE)
        self.messages = {}
        for name, desc in self.DESCRIPTOR.message_types_by_name.items():
            cls = _message_class(desc)
            self.messages[name] = cls
            setattr(self, name, cls)
        for name, desc in self.DESCRIPTOR.enum_types_by_name.items():
            setattr(self, name, enum_type_wrapper.EnumTypeWrapper(desc))
            for value in desc.values:
                setattr(self, value.name, value.number)

    def enum(self, name: str):
        """EnumDescriptor of a top-level enum, e.g. ``pb.enum("Phase")``."""
        return self.DESCRIPTOR.enum_types_by_name[name]

    def __repr__(self) -> str:
        return f"<caffe protobuf schema: {len(self.messages)} messages>"


check_protobuf_runtime()
pb = CaffeProto(_descriptor_bytes())

__all__ = ["CaffeProto", "pb"]
