"""Caffe prototxt in and out (text), and the file sniffing both readers share.

Reading accepts what Caffe's own upgrade path accepts:

* the current ``layer {}`` form and the legacy V1 ``layers {}`` form with enum
  types (upgraded as Caffe's ``UpgradeV1Net`` does: type names, ``blobs_lr`` /
  ``weight_decay`` / ``param`` names into ParamSpecs);
* ``input:`` + ``input_dim:`` / ``input_shape {}`` headers, turned into an
  ``Input`` layer (Caffe's ``UpgradeNetInput``);
* phase rules (``include`` / ``exclude`` with phase, stage, level), giving the
  TEST (deploy) view by default (Caffe's ``Net::FilterNet``).

Binary weights are :mod:`.caffemodel`; :mod:`.caffe` is the entry point that joins them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from google.protobuf import text_format

from . import wire
from lrprune_caffe.ir.analysis import check_structure
from lrprune_caffe.errors import BadFileError, UserError
from lrprune_caffe.fileutil import atomic_open
from lrprune_caffe.ir.net import Layer, Net
from lrprune_caffe.schema.proto import pb

PROTOBUF_LIMIT = 2**31 - 1  # Caffe reads binary protos with a 2 GB (INT_MAX) limit
PROTOTXT_LIMIT = 64 * 2**20  # the largest deploy nets are well under 1 MB of text


# Caffe's UpgradeV1LayerType
V1_TYPE_NAMES = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}


# ---------------------------------------------------------------------------
# files

def _read_bytes(path, what: str, limit=PROTOBUF_LIMIT, why=None) -> bytes:
    p = Path(path)
    if not p.exists():
        raise BadFileError(f"no such file (expected {what})", path=path)
    if p.is_dir():
        raise BadFileError(f"is a folder, expected {what}", path=path)
    try:
        size = p.stat().st_size
        if size > limit:
            why = why or "over protobuf's 2 GB limit that Caffe reads binary protos with"
            raise BadFileError(f"is {size:,} bytes, {why} (expected {what} under {_size_str(limit)})",
                               path=path)
        with open(p, "rb") as fh:
            buf = bytearray(size)
            n = fh.readinto(buf)
            if n != size:
                del buf[n:]
            return buf
    except PermissionError:
        raise BadFileError(f"cannot be read (permission denied; expected {what})", path=path) from None
    except OSError as e:
        raise BadFileError(f"cannot be read ({e.strerror}; expected {what})", path=path) from None


def _size_str(n) -> str:
    return f"{n / 2**30:.0f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def sniff(data) -> str:
    """What a file's first bytes say it is ("a zip archive", "an ONNX model"...), or ""."""
    head = bytes(data[:16])
    magic = [(b"PK\x03\x04", "a zip archive (an .npz?)"), (b"PK\x05\x06", "an empty zip archive"),
             (b"\x93NUMPY", "a NumPy .npy array"), (b"\x1f\x8b", "gzip-compressed data"),
             (b"\x89HDF", "an HDF5 file (Keras/Caffe .h5?)"), (b"\x89PNG", "a PNG image"),
             (b"\xff\xd8\xff", "a JPEG image"), (b"BZh", "bzip2-compressed data"),
             (b"\xfd7zXZ", "xz-compressed data"), (b"\x7fELF", "an executable"),
             (b"\x80\x02", "a Python pickle (a PyTorch .pt?)"), (b"\x80\x04", "a Python pickle"),
             (b"%PDF", "a PDF document")]
    for m, what in magic:
        if head.startswith(m):
            return what
    if len(data) > 262 and bytes(data[257:262]) == b"ustar":
        return "a tar archive"
    if _looks_onnx(data):
        return "an ONNX model"
    return ""


def _looks_onnx(data) -> bool:
    """ONNX ModelProto: ir_version (field 1, varint) first, a graph (field 7) among the fields."""
    if not len(data) or data[0] != 0x08:
        return False
    try:
        fields = {(f, wt) for f, wt, _ in wire.iter_fields(data, 0, len(data))}
    except wire.WireError:
        return False
    return (7, wire.LEN) in fields


def _looks_caffemodel(data) -> bool:
    try:
        return any(f in (2, 100) and wt == wire.LEN for f, wt, _ in wire.iter_fields(data, 0, len(data)))
    except wire.WireError:
        return False


def _looks_binary(data) -> bool:
    head = bytes(data[:4096])
    if b"\x00" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 4  # a cut multi-byte char at the end is fine
    return False


def _looks_like_prototxt(data) -> bool:
    head = bytes(data[:4096])
    if _looks_binary(head):
        return False
    text = head.decode("utf-8", "replace")
    return any(k in text for k in ("layer", "name:", "input", "type:"))


# ---------------------------------------------------------------------------
# prototxt

def parse_prototxt(path):
    """The NetParameter of a text prototxt, as written (no upgrade, no filter)."""
    with contextlib.suppress(OSError):
        if os.path.isfile(path) and os.path.getsize(path) > PROTOTXT_LIMIT:
            with open(path, "rb") as fh:
                head = fh.read(4096)
            if _looks_binary(head):
                kind = sniff(head) or "a binary file"
                raise BadFileError(f"is {kind} of {os.path.getsize(path):,} bytes (a .caffemodel?), "
                                   f"expected a text .prototxt net definition", path=path)
    data = _read_bytes(path, "a text .prototxt", limit=PROTOTXT_LIMIT,
                       why="too large for a net definition")
    if _looks_binary(data):
        kind = sniff(data) or ("a binary caffemodel (weights)" if _looks_caffemodel(data) else "")
        if kind or b"\x00" in bytes(data[:4096]):
            raise BadFileError(f"is {kind or 'a binary file'}, expected a text .prototxt net definition",
                               path=path)
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadFileError(f"is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                           f"expected a text .prototxt: save it as UTF-8", path=path) from None
    msg = pb.NetParameter()
    try:
        text_format.Parse(text, msg, allow_unknown_field=False)
    except RecursionError:
        raise BadFileError("nests messages too deeply to be a net definition", path=path) from None
    except text_format.ParseError as e:
        line, col = e.GetLine(), e.GetColumn()
        reason = str(e)
        # protobuf prefixes "line:col : " itself; keep the reason only
        if line is not None and reason.startswith(f"{line}:"):
            reason = reason.split(" : ", 1)[-1]
        # the tokenizer also echoes the whole source line ("'<line>': reason"); a
        # one-line prototxt would make that the whole file, so drop it
        lines = text.splitlines()
        if line is not None and 0 < line <= len(lines) and reason.startswith("'"):
            for echo in (lines[line - 1], lines[line - 1] + "\n"):
                if reason.startswith(f"'{echo}': "):
                    reason = reason[len(echo) + 4:]
                    break
        where = f"{path}:{line}:{col}" if line is not None else str(path)
        raise BadFileError(f"prototxt syntax error: {reason}", path=where) from None
    _check_required(msg, path)
    return msg


def _check_required(msg, path):
    """proto2 'required' fields (e.g. clip_param's min and max) must be set: name the layer."""
    import re
    missing = msg.FindInitializationErrors()
    if not missing:
        return
    first = missing[0]
    m = re.match(r"(layers?)\[(\d+)\]\.(.*)", first)
    if m:
        lp = getattr(msg, m.group(1))[int(m.group(2))]
        ltype = lp.type if m.group(1) == "layer" else pb.V1LayerParameter.LayerType.Name(lp.type)
        raise BadFileError(f"required field '{m.group(3)}' is not set", path=path, layer=lp.name, layer_type=ltype)
    raise BadFileError(f"required field '{first}' is not set", path=path)


def upgrade_net(msg, path=None):
    """Upgrade a NetParameter in place to the current form (V1 layers, input headers)."""
    if len(msg.layers):
        if len(msg.layer):
            raise BadFileError("mixes current 'layer {}' and legacy V1 'layers {}' entries", path=path)
        for v1 in msg.layers:
            msg.layer.add().CopyFrom(upgrade_v1_layer(v1, path))
        msg.ClearField("layers")
    _upgrade_input_header(msg, path)
    return msg


def upgrade_v1_layer(v1, path=None):
    """Caffe's UpgradeV1LayerParameter."""
    if v1.HasField("layer"):
        raise BadFileError("uses the V0 (pre-2014) layer format, which this tool does not read; "
                           "upgrade it once with Caffe's upgrade_net_proto_text/binary",
                           path=path, layer=v1.layer.name or None)
    lp = pb.LayerParameter()
    lp_fields = lp.DESCRIPTOR.fields_by_name
    for fd, value in v1.ListFields():
        name = fd.name
        if name == "type":
            enum_name = fd.enum_type.values_by_number[value].name
            if enum_name == "NONE" or enum_name not in V1_TYPE_NAMES:
                raise BadFileError(f"V1 layer type {enum_name} has no current equivalent",
                                   path=path, layer=v1.name)
            lp.type = V1_TYPE_NAMES[enum_name]
        elif name == "param":
            for i, pname in enumerate(value):
                _param_spec(lp, i).name = pname
        elif name == "blob_share_mode":
            for i, mode in enumerate(value):
                _param_spec(lp, i).share_mode = mode
        elif name == "blobs_lr":
            for i, v in enumerate(value):
                _param_spec(lp, i).lr_mult = v
        elif name == "weight_decay":
            for i, v in enumerate(value):
                _param_spec(lp, i).decay_mult = v
        elif name in lp_fields:
            target = lp_fields[name]
            if _is_repeated(fd):
                getattr(lp, name).extend(value) if fd.message_type is None else \
                    [getattr(lp, name).add().CopyFrom(v) for v in value]
            elif fd.message_type is not None:
                if target.message_type.full_name != fd.message_type.full_name:
                    raise BadFileError(f"V1 field {name} cannot be upgraded", path=path, layer=v1.name)
                getattr(lp, name).CopyFrom(value)
            else:
                setattr(lp, name, value)
        else:
            raise BadFileError(f"V1 field '{name}' has no current equivalent", path=path, layer=v1.name)
    return lp


def _is_repeated(fd) -> bool:
    rep = getattr(fd, "is_repeated", None)  # protobuf >= 6; .label is deprecated there
    return rep if rep is not None else fd.label == fd.LABEL_REPEATED


def _param_spec(lp, i):
    while len(lp.param) <= i:
        lp.param.add()
    return lp.param[i]


def _upgrade_input_header(msg, path):
    """Caffe's UpgradeNetInput: ``input``/``input_dim``/``input_shape`` -> an Input layer."""
    if not len(msg.input):
        if len(msg.input_dim) or len(msg.input_shape):
            raise BadFileError("has input_dim/input_shape but no 'input:' name", path=path)
        return
    names = list(msg.input)
    layer = pb.LayerParameter(name="input", type="Input")
    layer.top.extend(names)
    if len(msg.input_shape):
        if len(msg.input_shape) not in (1, len(names)):
            raise BadFileError(f"{len(msg.input_shape)} input_shape entries for {len(names)} inputs", path=path)
        for s in msg.input_shape:
            layer.input_param.shape.add().CopyFrom(s)
    elif len(msg.input_dim):
        dims = list(msg.input_dim)
        if len(dims) != 4 * len(names):
            raise BadFileError(f"{len(dims)} input_dim values for {len(names)} inputs "
                               f"(need 4 per input)", path=path)
        for i in range(len(names)):
            layer.input_param.shape.add().dim.extend(dims[4 * i:4 * i + 4])
    else:
        raise BadFileError("declares inputs without input_dim or input_shape", path=path)
    layers = [layer] + [pb.LayerParameter.FromString(lp.SerializeToString()) for lp in msg.layer]
    msg.ClearField("layer")
    for lp in layers:
        msg.layer.add().CopyFrom(lp)
    for f in ("input", "input_dim", "input_shape"):
        msg.ClearField(f)


def _state_meets_rule(state, rule) -> bool:
    """Caffe's Net::StateMeetsRule."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def filter_phase(msg, phase="TEST", stages=(), level=0, path=None):
    """Caffe's Net::FilterNet: keep the layers the given state includes."""
    if not -2**31 <= int(level) < 2**31:
        raise UserError(f"--level {level} is out of range (Caffe's NetState level is a 32-bit int)")
    state = pb.NetState()
    state.CopyFrom(msg.state)
    state.phase = pb.Phase.Value(phase) if isinstance(phase, str) else phase
    state.level = level or state.level
    state.stage.extend(s for s in stages if s not in state.stage)
    kept = []
    for lp in msg.layer:
        if len(lp.include) and len(lp.exclude):
            raise BadFileError("has both include and exclude rules", path=path, layer=lp.name,
                               layer_type=lp.type)
        if len(lp.include):
            keep = any(_state_meets_rule(state, r) for r in lp.include)
        else:
            keep = not any(_state_meets_rule(state, r) for r in lp.exclude)
        if keep:
            kept.append(lp.SerializeToString())
    msg.ClearField("layer")
    for b in kept:
        msg.layer.add().ParseFromString(b)
    return msg


def read_net(path, phase="TEST", stages=(), level=0) -> Net:
    """A prototxt as an IR Net (upgraded, phase-filtered, structure-checked; no weights)."""
    msg = parse_prototxt(path)
    upgrade_net(msg, path)
    filter_phase(msg, phase, stages, level, path)
    header = pb.NetParameter()
    header.CopyFrom(msg)
    for f in ("layer", "layers", "name", "state"):
        header.ClearField(f)
    net = Net(name=msg.name, layers=[Layer.from_proto(lp) for lp in msg.layer], header=header,
              source=str(path))
    check_structure(net)
    return net


# ---------------------------------------------------------------------------
# writing

def net_to_prototxt(net: Net) -> str:
    return text_format.MessageToString(net.to_proto(with_blobs=False), as_utf8=True)


def save_prototxt(net: Net, path) -> None:
    text = net_to_prototxt(net)
    with atomic_open(path, "w") as fh:
        fh.write(text)
