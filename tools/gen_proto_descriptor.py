#!/usr/bin/env python3
"""Regenerate lrprune_caffe/schema/caffe_descriptor.bin from proto/caffe.proto.

The package ships a serialized FileDescriptorSet instead of a generated
caffe_pb2.py (see lrprune_caffe/schema/proto.py for why). After editing
proto/caffe.proto, run from anywhere:

    python tools/gen_proto_descriptor.py           # rewrite the .bin
    python tools/gen_proto_descriptor.py --check   # exit 1 if the .bin is stale

Needs `protoc` on PATH (Debian/Ubuntu: apt-get install protobuf-compiler)
or --protoc PATH. --check compares parsed FileDescriptorProto messages, not
bytes, so a different protoc release that serializes the same schema in
another byte order does not count as a change.

Exit status: 0 up to date / written, 1 stale (--check), 2 protoc missing or failed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
PROTO_NAME = "caffe.proto"
OUTPUT = ROOT / "lrprune_caffe" / "schema" / "caffe_descriptor.bin"


class ProtocError(Exception):
    pass


def run_protoc(protoc: str) -> bytes:
    """Compile proto/caffe.proto and return the FileDescriptorSet bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "caffe_descriptor.bin"
        cmd = [protoc, f"--descriptor_set_out={out}", f"--proto_path={PROTO_DIR}", PROTO_NAME]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:
            raise ProtocError(f"cannot run {protoc}: {exc}") from None
        if proc.returncode != 0:
            raise ProtocError(f"{' '.join(cmd)} failed with status {proc.returncode}:\n{proc.stderr}")
        return out.read_bytes()


def normalized(data: bytes) -> descriptor_pb2.FileDescriptorSet:
    """Parse a descriptor set, dropping what varies between protoc releases
    without changing the schema (json_name, source info)."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(data)

    def strip(msg: descriptor_pb2.DescriptorProto) -> None:
        for field in msg.field:
            field.ClearField("json_name")
        for nested in msg.nested_type:
            strip(nested)

    for f in fds.file:
        f.ClearField("source_code_info")
        for msg in f.message_type:
            strip(msg)
    return fds


def shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if the committed descriptor differs from a fresh one")
    ap.add_argument("--protoc", default=None, help="protoc executable (default: protoc on PATH)")
    ap.add_argument("--output", type=Path, default=OUTPUT, help=f"descriptor file (default: {shown(OUTPUT)})")
    args = ap.parse_args(argv)
    output = args.output

    protoc = args.protoc or shutil.which("protoc")
    if not protoc:
        sys.stderr.write("error: protoc not found (apt-get install protobuf-compiler)\n")
        return 2
    try:
        fresh = run_protoc(protoc)
    except ProtocError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2

    if args.check:
        if not output.exists():
            print(f"{shown(output)} is missing; run tools/gen_proto_descriptor.py")
            return 1
        if normalized(output.read_bytes()) != normalized(fresh):
            print(f"{shown(output)} is stale: it does not match proto/{PROTO_NAME}; "
                  "run tools/gen_proto_descriptor.py")
            return 1
        print(f"{shown(output)} matches proto/{PROTO_NAME}")
        return 0

    output.write_bytes(fresh)
    print(f"wrote {shown(output)} ({len(fresh)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
