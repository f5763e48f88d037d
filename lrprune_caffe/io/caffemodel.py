"""Caffe caffemodel in and out (binary), no Caffe needed.

Caffemodels in the current and V1 forms, 4-D legacy blob shapes and
``double_data``; weights merge into layers by name as in Caffe's
``CopyTrainedLayersFrom``; weight layers no layer claims are reported. Weight
blobs go through :mod:`.wire`, so a 500 MB model reads and writes in seconds.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import numpy as np

from . import wire
from .prototxt import PROTOBUF_LIMIT, V1_TYPE_NAMES, _looks_like_prototxt, _read_bytes, sniff
from lrprune_caffe.ir.analysis import check_weights, expected_weight_shapes, infer_shapes
from lrprune_caffe.errors import BadFileError, UserError
from lrprune_caffe.fileutil import atomic_open
from lrprune_caffe.ir.net import Net
from lrprune_caffe.schema.proto import pb

_ALLOW_NONFINITE: contextvars.ContextVar = contextvars.ContextVar("lrprune_allow_nonfinite", default=False)


@contextlib.contextmanager
def nonfinite_policy(allow=False):
    """Within the block, weights with NaN / Inf load with a note (``allow``) instead of an error."""
    token = _ALLOW_NONFINITE.set(bool(allow))
    try:
        yield
    finally:
        _ALLOW_NONFINITE.reset(token)



class WeightLayer:
    __slots__ = ("name", "type", "blobs", "legacy")

    def __init__(self, name, type_, blobs, legacy):
        self.name, self.type, self.blobs, self.legacy = name, type_, blobs, legacy


_NET_FIELDS = {1: wire.LEN, 2: wire.LEN, 3: wire.LEN, 4: None, 5: wire.VARINT, 6: wire.LEN,
               7: wire.VARINT, 8: wire.LEN, 100: wire.LEN}


def read_caffemodel(path) -> list:
    """The weight-bearing layers of a caffemodel: [WeightLayer(name, type, [arrays], legacy)]."""
    buf = _read_bytes(path, "a binary .caffemodel")
    if not len(buf):
        raise BadFileError("is empty, expected a binary .caffemodel", path=path)
    try:
        return _parse_caffemodel(buf, path)
    except (wire.WireError, _NoLayers) as e:
        kind = sniff(buf)
        if kind:
            raise BadFileError(f"is {kind}, expected a binary .caffemodel with weights", path=path) from None
        if isinstance(e, _NoLayers):
            raise BadFileError("holds no layers: not a caffemodel", path=path) from None
        if _looks_like_prototxt(buf):
            raise BadFileError("is a text prototxt, expected a binary .caffemodel with weights",
                               path=path) from None
        raise BadFileError(f"is not a valid caffemodel (truncated or corrupt: {e})", path=path) from None


def _parse_caffemodel(buf, path):
    end = len(buf)
    layers = []
    forms = set()
    for field, wt, value in wire.iter_fields(buf, 0, end):
        expected = _NET_FIELDS.get(field, -1)
        if expected == -1 or (expected is not None and wt != expected):
            raise wire.WireError(f"unexpected field {field} (wire type {wt}) for a NetParameter")
        if field == 100:
            layers.append(_parse_layer(buf, value, name_f=1, type_f=2, blobs_f=7, v1=False))
            forms.add("layer")
        elif field == 2:
            layers.append(_parse_layer(buf, value, name_f=4, type_f=5, blobs_f=6, v1=True))
            forms.add("layers")
    if len(forms) > 1:  # Caffe's UpgradeV1Net refuses this "inconsistent NetParameter" too
        raise BadFileError("mixes current 'layer' and legacy V1 'layers' entries; Caffe refuses such a "
                           "file too", path=path)
    if not layers:
        if _looks_like_prototxt(buf):
            raise BadFileError("is a text prototxt, expected a binary .caffemodel with weights", path=path)
        raise _NoLayers()
    return layers


class _NoLayers(Exception):
    pass


def _parse_layer(buf, span, name_f, type_f, blobs_f, v1):
    name, type_, blobs, legacy = "", "", [], []
    for field, wt, value in wire.iter_fields(buf, *span):
        if field == name_f and wt == wire.LEN:
            name = bytes(buf[value[0]:value[1]]).decode("utf-8", "replace")  # names are shown, not trusted
        elif field == type_f:
            if v1 and wt == wire.VARINT:
                desc = pb.V1LayerParameter.DESCRIPTOR.enum_types_by_name["LayerType"]
                ev = desc.values_by_number.get(value)
                type_ = V1_TYPE_NAMES.get(ev.name, ev.name) if ev else f"V1:{value}"
            elif wt == wire.LEN:
                type_ = bytes(buf[value[0]:value[1]]).decode("utf-8", "replace")
        elif field == blobs_f and wt == wire.LEN:
            arr, is_legacy = _parse_blob(buf, value)
            blobs.append(arr)
            legacy.append(is_legacy)
        elif v1 and field == 1 and wt == wire.LEN:  # V0 layer inside V1: name=1, type=2, blobs=50
            inner = _parse_layer(buf, value, name_f=1, type_f=2, blobs_f=50, v1=False)
            name, type_, blobs, legacy = inner.name, inner.type, inner.blobs, inner.legacy
    return WeightLayer(name, type_, blobs, legacy)


def _parse_blob(buf, span):
    legacy = [0, 0, 0, 0]
    shape = None
    chunks32, chunks64 = [], []
    for field, wt, value in wire.iter_fields(buf, *span):
        if field in (1, 2, 3, 4) and wt == wire.VARINT:
            legacy[field - 1] = wire.to_int64(value)
        elif field == 5:
            if wt == wire.LEN:
                s, e = value
                if (e - s) % 4:
                    raise wire.WireError(f"packed float data of {e - s} bytes is not a multiple of 4")
                chunks32.append(np.frombuffer(buf, dtype="<f4", count=(e - s) // 4, offset=s))
            elif wt == wire.I32:
                chunks32.append(np.frombuffer(buf, dtype="<f4", count=1, offset=value[0]))
        elif field == 8:
            if wt == wire.LEN:
                s, e = value
                if (e - s) % 8:
                    raise wire.WireError(f"packed double data of {e - s} bytes is not a multiple of 8")
                chunks64.append(np.frombuffer(buf, dtype="<f8", count=(e - s) // 8, offset=s))
            elif wt == wire.I64:
                chunks64.append(np.frombuffer(buf, dtype="<f8", count=1, offset=value[0]))
        elif field == 7 and wt == wire.LEN:
            shape = []
            for f2, wt2, v2 in wire.iter_fields(buf, *value):
                if f2 == 1 and wt2 == wire.LEN:
                    shape.extend(wire.to_int64(v) for v in wire.packed_varints(buf, v2))
                elif f2 == 1 and wt2 == wire.VARINT:
                    shape.append(wire.to_int64(v2))
    if chunks64 and not chunks32:
        data = np.concatenate(chunks64).astype(np.float32) if len(chunks64) > 1 else chunks64[0].astype(np.float32)
    elif len(chunks32) == 1:
        data = chunks32[0]
    elif chunks32:
        data = np.concatenate(chunks32)
    else:
        data = np.zeros(0, np.float32)
    is_legacy = shape is None
    dims = tuple(legacy) if is_legacy else tuple(shape)
    if any(d < 0 for d in dims):
        raise wire.WireError(f"blob shape {dims} has negative dimensions")
    count = math.prod(dims) if dims else 1  # Python ints: no overflow
    if count != data.size:
        raise wire.WireError(f"blob of shape {dims} holds {data.size} values, expected {count}")
    if data.dtype.byteorder == ">" or data.dtype != np.float32:
        data = data.astype(np.float32)
    return data.reshape(dims), is_legacy


def _legacy_without_input_shape(layer, i, arr):
    """A legacy 4-D blob of a layer whose input shape is unknown (a train net whose
    Data layers we do not model): the shapes Caffe gives conv / IP blobs regardless
    of the input, so that the blob is written in the shape Caffe will expect."""
    if arr.ndim != 4 or arr.shape[:2] != (1, 1):
        return arr
    if layer.type in ("Convolution", "Deconvolution", "InnerProduct") and i == 1 and arr.shape[2] == 1:
        return arr.reshape(arr.shape[3])  # bias (1,1,1,N) -> (N,)
    if layer.type == "InnerProduct" and i == 0:
        return arr.reshape(arr.shape[2], arr.shape[3])  # weights (1,1,N,K) -> (N,K)
    return arr


def merge_weights(net: Net, weight_layers, path=None, strict=True):
    """Give each layer the blobs of the same-named layer in the caffemodel (Caffe's rule)."""
    by_name = {}
    for wl in weight_layers:
        by_name.setdefault(wl.name, wl)
    shapes = infer_shapes(net)
    used = set()
    matched_any = False
    for layer in net.layers:
        wl = by_name.get(layer.name)
        if wl is None:
            continue
        used.add(layer.name)
        if not wl.blobs:
            continue
        matched_any = True
        expected = expected_weight_shapes(net, layer, shapes)
        blobs = []
        for i, (arr, is_legacy) in enumerate(zip(wl.blobs, wl.legacy)):
            if expected is not None and i < len(expected) and is_legacy and tuple(arr.shape) != tuple(expected[i]):
                e = tuple(expected[i])
                if len(e) <= 4 and (1,) * (4 - len(e)) + e == tuple(arr.shape):
                    arr = arr.reshape(e)  # Caffe's LegacyShape comparison
            elif expected is None and is_legacy:
                arr = _legacy_without_input_shape(layer, i, arr)
            blobs.append(arr)
        layer.blobs = blobs
    needing = [layer for layer in net.layers if (expected_weight_shapes(net, layer, shapes) or [])]
    missing = [layer.name for layer in needing if not layer.blobs]
    unmatched = [wl.name for wl in weight_layers if wl.name not in used and wl.blobs]
    if strict and needing and not matched_any:
        raise BadFileError(f"no layer of this weights file matches a layer of {net.source} "
                           f"(weights for: {', '.join(unmatched[:5])}{'...' if len(unmatched) > 5 else ''}); "
                           f"does it belong to this net?", path=path)
    if unmatched:
        net.notes.append(f"{path}: weights for {len(unmatched)} layer(s) not in the net were ignored: "
                         + ", ".join(unmatched))
    if missing:
        net.notes.append(f"{path}: no weights for {len(missing)} layer(s): " + ", ".join(missing))
    net.weights_source = str(path) if path else None
    try:
        check_weights(net, shapes)
    except BadFileError as e:
        if path is None:
            raise
        err = BadFileError(f"{e} (weights from {path})")
        err.path, err.layer, err.layer_type = e.path, e.layer, e.layer_type
        raise err from None
    check_finite(net, path)
    return net


def nonfinite_blobs(net) -> list:
    """[(layer, blob index, NaN count, Inf count)] of the blobs holding non-finite values."""
    found = []
    for layer in net.layers:
        for i, b in enumerate(layer.blobs):
            if b.size and not np.isfinite(np.sum(b, dtype=np.float64)):  # exact: NaN/Inf propagate
                found.append((layer, i, int(np.isnan(b).sum()), int(np.isinf(b).sum())))
    return found


def check_finite(net, path=None, allow=None):
    """NaN / Inf in the weights: refused naming the layers, or (``allow``, default the
    :func:`nonfinite_policy`) a note per layer."""
    found = nonfinite_blobs(net)
    if not found:
        return
    allow = _ALLOW_NONFINITE.get() if allow is None else allow
    parts = [f"layer '{layer.name}' ({layer.type}) blob {i}: {nan:,} NaN, {inf:,} infinite"
             for layer, i, nan, inf in found]
    if not allow:
        first, i, nan, inf = found[0]
        more = f" (and {len(found) - 1} more blob(s))" if len(found) > 1 else ""
        raise BadFileError(f"blob {i} holds {nan:,} NaN and {inf:,} infinite values{more}; add "
                           f"--allow-nonfinite to go on anyway", path=path, layer=first.name,
                           layer_type=first.type)
    net.notes.append(f"{path}: weights hold non-finite values: " + "; ".join(parts))


def caffemodel_size(net: Net) -> int:
    """Bytes of the caffemodel :func:`caffemodel_chunks` would give, from the shapes only."""
    total = 0
    if net.name:
        n = len(net.name.encode("utf-8"))
        total += len(wire.len_prefix(1, n)) + n
    for layer in net.layers:
        head = len(layer.to_proto(with_blobs=False).SerializeToString())
        body = head + sum(wire.blob_size(arr.shape, 7) for arr in layer.blobs)
        total += len(wire.len_prefix(100, body)) + body
    return total


def check_caffemodel_size(net: Net, where=None) -> int:
    """Refuse, before any byte is written, a caffemodel Caffe could not read back (over 2 GB)."""
    total = caffemodel_size(net)
    if total > PROTOBUF_LIMIT:
        prefix = f"{where}: " if where else ""
        raise UserError(f"{prefix}the caffemodel would be {total:,} bytes, over the 2 GB limit that "
                        f"Caffe can read")
    return total


def caffemodel_chunks(net: Net):
    """(chunks, total_size) of the caffemodel; chunks are bytes / memoryviews. A caffemodel
    over Caffe's 2 GB limit is refused before any array is copied."""
    check_caffemodel_size(net)
    chunks = []
    total = 0
    if net.name:
        b = net.name.encode("utf-8")
        chunks.append(wire.len_prefix(1, len(b)) + b)
        total += len(chunks[-1])
    for layer in net.layers:
        head = layer.to_proto(with_blobs=False).SerializeToString()
        blob_parts, blob_size = [], 0
        for arr in layer.blobs:
            parts, n = wire.blob_chunks(arr, 7)
            blob_parts.extend(parts)
            blob_size += n
        prefix = wire.len_prefix(100, len(head) + blob_size)
        chunks.append(prefix + head)
        chunks.extend(blob_parts)
        total += len(prefix) + len(head) + blob_size
    return chunks, total


def save_caffemodel(net: Net, path) -> int:
    """Write the weights as a current-format caffemodel; returns its size in bytes."""
    chunks, total = caffemodel_chunks(net)
    if total > PROTOBUF_LIMIT:
        raise UserError(f"{path}: the caffemodel would be {total:,} bytes, over the 2 GB limit "
                        f"that Caffe can read")
    with atomic_open(path, "wb") as fh:
        for c in chunks:
            fh.write(c)
    return total
