"""io/wire.py, the hand-written protobuf wire codec, against protobuf itself: the bytes
protobuf writes decode to the same values, the bytes we write parse in protobuf to the
same message, and cut-off input fails exactly where protobuf's parser fails."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from lrprune_caffe.io import wire
from lrprune_caffe.schema.proto import pb

EDGE_INTS = [0, 1, 127, 128, 255, 300, 16383, 16384, 2 ** 31 - 1, 2 ** 31, 2 ** 35 + 7,
             2 ** 56, 2 ** 63 - 1, -1, -2, -300, -(2 ** 31), -(2 ** 63)]


@pytest.mark.parametrize("v", EDGE_INTS)
def test_varints_agree_with_protobuf(v):
    """BlobShape.dim is a packed int64: protobuf's bytes are key, length, varints."""
    data = pb.BlobShape(dim=[v, 5]).SerializeToString()
    ((field, wt, span),) = list(wire.iter_fields(data, 0, len(data)))
    assert (field, wt) == (1, wire.LEN)
    raw = wire.packed_varints(data, span)
    assert [wire.to_int64(x) for x in raw] == [v, 5]
    assert raw[0] == v % 2 ** 64
    # and back: our bytes are protobuf's
    assert wire.varint_bytes(v) + wire.varint_bytes(5) == data[span[0]:span[1]]
    assert len(wire.varint_bytes(v)) == (10 if v < 0 else max(1, -(-v.bit_length() // 7)))


def test_read_varint_limits():
    top = b"\xff" * 9 + b"\x01"  # 2**64 - 1: ten bytes, the longest there is
    assert wire.read_varint(top, 0, len(top)) == (2 ** 64 - 1, 10)
    assert wire.read_varint(b"\x80\x01rest", 0, 6) == (128, 2)
    assert wire.read_varint(b"\x05\x06", 1, 2) == (6, 2)  # reads from pos, not from 0
    with pytest.raises(wire.WireError, match="longer than 10 bytes"):
        wire.read_varint(b"\xff" * 10 + b"\x01", 0, 11)
    with pytest.raises(wire.WireError, match="truncated varint at byte 2"):
        wire.read_varint(b"\x80\x80\x80\x01", 0, 2)  # end before the last byte
    with pytest.raises(wire.WireError):
        wire.read_varint(b"", 0, 0)
    assert wire.to_int64(2 ** 63 - 1) == 2 ** 63 - 1 and wire.to_int64(2 ** 63) == -(2 ** 63)


def every_wire_type() -> bytes:
    """A LayerParameter (name: LEN, loss_weight: non-packed float = I32, phase: VARINT)
    plus unknown fields 99 of wire type I64 and 97, a varint, after it (protobuf keeps them)."""
    lp = pb.LayerParameter(name="conv1", type="Convolution", loss_weight=[1.5, -2.0], phase=pb.TEST)
    i64 = wire.key_bytes(99, wire.I64) + np.array([3.25], "<f8").tobytes()
    return lp.SerializeToString() + i64 + wire.key_bytes(97, wire.VARINT) + wire.varint_bytes(300)


def test_iter_fields_reads_every_wire_type():
    data = every_wire_type()
    fields = list(wire.iter_fields(data, 0, len(data)))
    assert [(f, t) for f, t, _ in fields] == [(1, wire.LEN), (2, wire.LEN), (5, wire.I32), (5, wire.I32),
                                              (10, wire.VARINT), (99, wire.I64), (97, wire.VARINT)]
    (s, e), (s2, e2) = fields[0][2], fields[1][2]
    assert data[s:e] == b"conv1" and data[s2:e2] == b"Convolution"
    floats = [float(np.frombuffer(data[s:e], "<f4")[0]) for _, _, (s, e) in fields[2:4]]
    assert floats == [1.5, -2.0]
    assert fields[4][2] == pb.TEST
    s, e = fields[5][2]
    assert float(np.frombuffer(data[s:e], "<f8")[0]) == 3.25 and fields[6][2] == 300
    # a sub-range: only the fields between start and end (field 2: key and length byte, then 11 bytes)
    assert list(wire.iter_fields(data, s2 - 2, e2)) == [(2, wire.LEN, (s2, e2))]
    pb.LayerParameter.FromString(data)  # protobuf reads it too


def test_truncation_fails_exactly_where_protobuf_fails():
    data = every_wire_type()
    for cut in range(1, len(data)):
        try:
            pb.LayerParameter.FromString(data[:cut])
            proto_ok = True
        except DecodeError:
            proto_ok = False
        try:
            list(wire.iter_fields(data[:cut], 0, cut))
            ours_ok = True
        except wire.WireError:
            ours_ok = False
        assert ours_ok == proto_ok, cut
    # the message cut inside field 1's bytes names the shortfall
    with pytest.raises(wire.WireError, match=r"field 1 claims 5 bytes at byte 2, only 3 remain"):
        list(wire.iter_fields(data[:5], 0, 5))


@pytest.mark.parametrize("bad, why", [
    (b"\x00\x01", "field number 0"),
    (b"\x0e\x01", "invalid wire type 6"),
    (b"\x0f\x01", "invalid wire type 7"),
    (b"\x09" + b"\x00" * 7, "truncated 8-byte field 1"),
    (b"\x0d" + b"\x00" * 3, "truncated 4-byte field 1"),
])
def test_malformed_bytes(bad, why):
    with pytest.raises(wire.WireError, match=why):
        list(wire.iter_fields(bad, 0, len(bad)))
    with pytest.raises(DecodeError):
        pb.BlobProto.FromString(bad)


@pytest.mark.parametrize("shape", [(3, 2, 5, 5), (7,), (), (1, 200), (130, 1, 1, 1), (40, 1000), (0, 3), (4, 0)])
def test_blob_chunks_parse_in_protobuf(shape):
    arr = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if arr.size:
        arr.reshape(-1)[0] = -0.0
    chunks, size = wire.blob_chunks(arr, 7)  # LayerParameter.blobs is field 7
    data = b"".join(bytes(c) for c in chunks)
    assert len(data) == size
    lp = pb.LayerParameter.FromString(data)
    (blob,) = lp.blobs
    assert tuple(blob.shape.dim) == shape and blob.HasField("shape")
    np.testing.assert_array_equal(np.array(blob.data, np.float32), arr.reshape(-1))
    # the message protobuf writes for that blob, of the same size (fields in another order)
    ref = pb.LayerParameter(blobs=[pb.BlobProto(shape=pb.BlobShape(dim=list(shape)), data=arr.reshape(-1))])
    assert lp == ref and size == ref.ByteSize()
    assert wire.blob_size(shape, 7) == ref.ByteSize()  # the size from the shape alone
    # V1LayerParameter keeps blobs in field 6
    chunks, size = wire.blob_chunks(arr.astype(np.float64), 6)
    v1 = pb.V1LayerParameter.FromString(b"".join(bytes(c) for c in chunks))
    assert wire.blob_size(shape, 6) == size == pb.V1LayerParameter(blobs=v1.blobs).ByteSize()
    np.testing.assert_array_equal(np.array(v1.blobs[0].data, np.float32), arr.reshape(-1))


def test_len_prefix_and_key_bytes():
    assert wire.key_bytes(100, wire.LEN) == b"\xa2\x06"  # (100 << 3) | 2 = 802
    assert wire.len_prefix(1, 300) == b"\x0a\xac\x02"
    assert wire.key_bytes(1, wire.I32) == b"\x0d" and wire.key_bytes(2, wire.I64) == b"\x11"
