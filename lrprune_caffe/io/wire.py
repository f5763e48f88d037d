"""Just enough of the protobuf wire format to move weights fast.

A VGG-16 caffemodel is 528 MB of packed floats. Parsing it with protobuf and
copying ``blob.data`` into numpy walks 138M Python-visible floats; here the
packed float fields become zero-copy ``np.frombuffer`` views of the file's
bytes, and writing streams each array's buffer straight to the file.

Only the messages that hold weights are decoded this way (NetParameter ->
LayerParameter / V1LayerParameter -> BlobProto). Everything else about a
layer is serialized/parsed by protobuf proper.

Wire format reference: https://protobuf.dev/programming-guides/encoding/
"""

from __future__ import annotations

import numpy as np

VARINT, I64, LEN, I32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def read_varint(buf, pos: int, end: int):
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError(f"truncated varint at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError(f"varint longer than 10 bytes at byte {pos}")


def iter_fields(buf, start: int, end: int):
    """Yield (field_number, wire_type, value) where LEN values are (start, end) pairs."""
    pos = start
    while pos < end:
        key, pos = read_varint(buf, pos, end)
        field, wt = key >> 3, key & 7
        if field == 0:
            raise WireError(f"field number 0 at byte {pos}")
        if wt == VARINT:
            value, pos = read_varint(buf, pos, end)
        elif wt == I64:
            if pos + 8 > end:
                raise WireError(f"truncated 8-byte field {field} at byte {pos}")
            value = (pos, pos + 8)
            pos += 8
        elif wt == LEN:
            n, pos = read_varint(buf, pos, end)
            if pos + n > end:
                raise WireError(f"field {field} claims {n} bytes at byte {pos}, "
                                f"only {end - pos} remain (truncated file?)")
            value = (pos, pos + n)
            pos += n
        elif wt == I32:
            if pos + 4 > end:
                raise WireError(f"truncated 4-byte field {field} at byte {pos}")
            value = (pos, pos + 4)
            pos += 4
        else:
            raise WireError(f"invalid wire type {wt} for field {field} at byte {pos}")
        yield field, wt, value


def packed_varints(buf, span) -> list:
    s, e = span
    out = []
    while s < e:
        v, s = read_varint(buf, s, e)
        out.append(v)
    return out


def to_int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


# ---- writing -------------------------------------------------------------

def varint_bytes(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key_bytes(field: int, wire_type: int) -> bytes:
    return varint_bytes((field << 3) | wire_type)


def len_prefix(field: int, n: int) -> bytes:
    return key_bytes(field, LEN) + varint_bytes(n)


def blob_size(shape, blobs_field: int) -> int:
    """Bytes :func:`blob_chunks` gives for an array of ``shape``, without touching its data."""
    count = 1
    for d in shape:
        count *= int(d)
    dims = sum(len(varint_bytes(int(d))) for d in shape)
    shape_msg = len(len_prefix(1, dims)) + dims if len(shape) else 0
    head = len(len_prefix(7, shape_msg)) + shape_msg + (len(len_prefix(5, 4 * count)) if count else 0)
    body = head + 4 * count
    return len(len_prefix(blobs_field, body)) + body


def blob_chunks(arr: np.ndarray, blobs_field: int):
    """(chunks, size) for one BlobProto {shape: BlobShape{dim}, data: packed float}
    embedded as field ``blobs_field`` of its parent message."""
    data = np.ascontiguousarray(arr, dtype="<f4")
    dims = b"".join(varint_bytes(int(d)) for d in arr.shape)
    shape_msg = len_prefix(1, len(dims)) + dims if arr.ndim else b""
    head = len_prefix(7, len(shape_msg)) + shape_msg
    if data.nbytes:  # protobuf writes no packed field for an empty one (a blob of shape (0, 3))
        head += len_prefix(5, data.nbytes)
    body_len = len(head) + data.nbytes
    prefix = len_prefix(blobs_field, body_len)
    # a flat uint8 view: memoryview.cast refuses shapes with a 0 in them (an empty blob, e.g. (0, 3))
    return [prefix, head, memoryview(data.reshape(-1).view(np.uint8))], len(prefix) + body_len
