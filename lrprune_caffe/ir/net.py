"""The intermediate representation: a net of layers, blobs as numpy arrays.

A :class:`Net` is an ordered list of :class:`Layer` objects, exactly as Caffe
runs them. Each layer keeps its own LayerParameter message (``layer.msg``) for
everything we do not model explicitly (``*_param`` sub-messages, ParamSpecs,
include rules...), while ``name``, ``type``, ``bottoms``, ``tops`` and
``blobs`` are plain Python attributes and are authoritative: the message's
copies of those fields are kept empty and filled in only when writing.

Blobs follow Caffe's order for each type (weights then bias; BatchNorm's
mean, variance, factor; ...). In-place layers (top == bottom) are ordinary
layers whose top names a blob that already exists.

Passes (see :mod:`lrprune_caffe.transforms`) rewrite a Net and call
:func:`validate` afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from lrprune_caffe.errors import BadFileError
from lrprune_caffe.schema.proto import pb

Shape = Optional[tuple]  # None means "unknown"

_IO_FIELDS = ("name", "type", "bottom", "top", "blobs")


@dataclass
class Layer:
    name: str
    type: str
    bottoms: list = field(default_factory=list)
    tops: list = field(default_factory=list)
    msg: object = None  # pb.LayerParameter without name/type/bottom/top/blobs
    blobs: list = field(default_factory=list)  # list of np.ndarray (float32)

    def __post_init__(self):
        if self.msg is None:
            self.msg = pb.LayerParameter()

    @classmethod
    def from_proto(cls, lp, blobs=None) -> "Layer":
        msg = pb.LayerParameter()
        msg.CopyFrom(lp)
        for f in _IO_FIELDS:
            msg.ClearField(f)
        return cls(name=lp.name, type=lp.type, bottoms=list(lp.bottom), tops=list(lp.top),
                   msg=msg, blobs=list(blobs or []))

    def to_proto(self, with_blobs: bool = False):
        lp = pb.LayerParameter()
        lp.name = self.name
        lp.type = self.type
        lp.bottom.extend(self.bottoms)
        lp.top.extend(self.tops)
        lp.MergeFrom(self.msg)
        if with_blobs:
            for arr in self.blobs:
                lp.blobs.add().CopyFrom(array_to_blobproto(arr))
        return lp

    def param_msg(self, field_name: str):
        """The layer's ``*_param`` sub-message (default values when unset)."""
        return getattr(self.msg, field_name)

    def has(self, field_name: str) -> bool:
        return self.msg.HasField(field_name)

    def copy(self) -> "Layer":
        msg = pb.LayerParameter()
        msg.CopyFrom(self.msg)
        return Layer(self.name, self.type, list(self.bottoms), list(self.tops), msg,
                     [np.array(b, copy=True) for b in self.blobs])

    @property
    def in_place(self) -> bool:
        return bool(self.tops) and list(self.tops) == list(self.bottoms[: len(self.tops)])

    def __repr__(self):
        shapes = [tuple(b.shape) for b in self.blobs]
        return f"Layer({self.name!r}, {self.type!r}, {self.bottoms} -> {self.tops}, blobs={shapes})"


@dataclass
class Net:
    name: str = ""
    layers: list = field(default_factory=list)
    header: object = None  # pb.NetParameter with layer/layers/input* cleared
    source: str = None  # the prototxt this came from, for error messages
    weights_source: str = None
    notes: list = field(default_factory=list)  # things a user should hear about (unmatched weights ...)

    def __post_init__(self):
        if self.header is None:
            self.header = pb.NetParameter()

    # ---- lookups -------------------------------------------------------
    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise KeyError(name)

    def __contains__(self, name) -> bool:
        return any(layer.name == name for layer in self.layers)

    def input_layers(self) -> list:
        return [layer for layer in self.layers if layer.type == "Input"]

    def inputs(self) -> list:
        """Names of the net's input blobs (tops of Input layers)."""
        return [t for layer in self.input_layers() for t in layer.tops]

    def input_shapes(self) -> dict:
        shapes = {}
        for layer in self.input_layers():
            ip = layer.param_msg("input_param")
            for i, top in enumerate(layer.tops):
                if len(ip.shape) == 0:
                    shapes[top] = None
                    continue
                s = ip.shape[i] if len(ip.shape) > 1 else ip.shape[0]
                shapes[top] = tuple(int(d) for d in s.dim)
        return shapes

    def outputs(self) -> list:
        """Blobs produced and not consumed later, in Caffe's order (its net outputs)."""
        available = {}
        for layer in self.layers:
            for b in layer.bottoms:
                available.pop(b, None)
            for t in layer.tops:
                available[t] = True
        return list(available)

    def consumers(self, blob: str, after: int = -1) -> list:
        """Layers (after index ``after``) that read ``blob`` before it is re-produced."""
        out = []
        for layer in self.layers[after + 1:]:
            if blob in layer.bottoms:
                out.append(layer)
            if blob in layer.tops and blob not in layer.bottoms:
                break
        return out

    def version_readers(self, blob: str, index: int) -> list:
        """Layers reading the version of ``blob`` written by layer ``index``: up to and
        including the next layer writing it (an in-place writer reads it too)."""
        out = []
        for layer in self.layers[index + 1:]:
            if blob in layer.bottoms:
                out.append(layer)
            if blob in layer.tops:
                break
        return out

    def producer(self, blob: str, before: int = None) -> Optional[Layer]:
        """The last layer before index ``before`` whose top is ``blob``."""
        layers = self.layers if before is None else self.layers[:before]
        for layer in reversed(layers):
            if blob in layer.tops:
                return layer
        return None

    def index_by_name(self) -> "NetIndex":
        """A snapshot of name / blob lookups built in one walk (stale after a mutation)."""
        return NetIndex(self)

    # ---- mutation ------------------------------------------------------
    def replace_layers(self, replacements: dict) -> None:
        """Replace each layer named in ``replacements`` ({name: [new layers]}) by its new
        layers, in place of it, in one walk; a name the net lacks is a KeyError."""
        missing = [n for n in replacements if n not in self.index_by_name().position]
        if missing:
            raise KeyError(missing[0])
        out = []
        for layer in self.layers:
            new = replacements.get(layer.name)
            out.extend([layer] if new is None else new)
        self.layers[:] = out

    def replace_layer(self, name: str, new_layers) -> None:
        """Replace layer ``name`` by ``new_layers`` (one layer or a list)."""
        self.replace_layers({name: [new_layers] if isinstance(new_layers, Layer) else list(new_layers)})

    def insert_after(self, name: str, new_layers) -> None:
        """Insert ``new_layers`` (one layer or a list) right after layer ``name``."""
        i = self.index(name)
        self.layers[i + 1:i + 1] = [new_layers] if isinstance(new_layers, Layer) else list(new_layers)

    # ---- conversion ----------------------------------------------------
    def to_proto(self, with_blobs: bool = False):
        np_ = pb.NetParameter()
        np_.CopyFrom(self.header)
        np_.name = self.name
        for layer in self.layers:
            np_.layer.add().CopyFrom(layer.to_proto(with_blobs=with_blobs))
        return np_

    def copy(self) -> "Net":
        header = pb.NetParameter()
        header.CopyFrom(self.header)
        return Net(self.name, [layer.copy() for layer in self.layers], header,
                   self.source, self.weights_source, list(self.notes))

    def cut(self, blobs) -> "Net":
        """A net computing only ``blobs`` (their final values, after any in-place layers): the
        layers they do not need are dropped (the kept ones are shared, not copied). The cut net's
        :meth:`outputs` may hold more blobs (other tops of a kept layer); ask for ``blobs``."""
        from lrprune_caffe.errors import UserError
        blobs = [str(b) for b in blobs]
        known = {t for layer in self.layers for t in layer.tops}
        inputs = set(self.inputs())
        for b in blobs:
            if b not in known:
                names = sorted(known - inputs)
                more = f", ... ({len(names)} in all)" if len(names) > 12 else ""
                raise UserError(f"{self.source or self.name or 'the net'}: --cut: no blob named '{b}' "
                                f"(blobs: {', '.join(names[:12])}{more})")
            if b in inputs:
                raise UserError(f"{self.source or self.name or 'the net'}: --cut: '{b}' is an input of the net, "
                                f"not a blob it computes")
        needed, kept = set(blobs), []
        for layer in reversed(self.layers):
            if layer.type == "Input" or needed.intersection(layer.tops):
                kept.append(layer)
                needed.update(layer.bottoms)
        return Net(self.name, kept[::-1], self.header, self.source, self.weights_source, list(self.notes))

    def params(self) -> int:
        return sum(int(b.size) for layer in self.layers for b in layer.blobs)


def array_to_blobproto(arr: np.ndarray):
    bp = pb.BlobProto()
    bp.shape.dim.extend(int(d) for d in arr.shape)
    bp.data.extend(np.asarray(arr, dtype=np.float32).ravel().tolist())
    return bp


def blobproto_to_array(bp) -> np.ndarray:
    """A BlobProto's data as a float32 array (``shape``, or the legacy num/channels/height/width)."""
    if len(bp.double_data):
        data = np.asarray(bp.double_data, dtype=np.float64).astype(np.float32)
    else:
        data = np.asarray(bp.data, dtype=np.float32)
    if bp.HasField("shape"):
        shape = tuple(int(d) for d in bp.shape.dim)
    else:
        shape = (bp.num, bp.channels, bp.height, bp.width)
    if int(np.prod(shape)) != data.size:
        raise BadFileError(f"blob holds {data.size} values but its shape {shape} needs {int(np.prod(shape))}")
    return data.reshape(shape)


class NetIndex:
    """Lookups over a net's layers built in one walk: ``position`` {layer name: index},
    ``layer(name)``, ``writers`` {blob: [indices of layers writing it]}, ``readers``
    {blob: [indices of layers reading it]}. A snapshot: rebuild it after changing the net."""

    def __init__(self, net: "Net"):
        self.layers = list(net.layers)
        self.position = {}
        self.writers: dict = {}
        self.readers: dict = {}
        for i, layer in enumerate(self.layers):
            self.position.setdefault(layer.name, i)
            for b in layer.bottoms:
                self.readers.setdefault(b, []).append(i)
            for t in layer.tops:
                self.writers.setdefault(t, []).append(i)

    def __contains__(self, name) -> bool:
        return name in self.position

    def layer(self, name: str) -> Layer:
        return self.layers[self.position[name]]

    def producer(self, blob: str, before: int = None) -> Optional[Layer]:
        """The last layer before index ``before`` writing ``blob`` (as :meth:`Net.producer`)."""
        idx = [i for i in self.writers.get(blob, ()) if before is None or i < before]
        return self.layers[idx[-1]] if idx else None

    def consumers(self, blob: str, after: int = -1) -> list:
        """Layers after index ``after`` reading ``blob`` before it is re-produced (as :meth:`Net.consumers`)."""
        out = []
        for i in sorted(set(self.readers.get(blob, ())) | set(self.writers.get(blob, ()))):
            if i <= after:
                continue
            layer = self.layers[i]
            if blob in layer.bottoms:
                out.append(layer)
            if blob in layer.tops and blob not in layer.bottoms:
                break
        return out


def clone_msg(msg):
    new = type(msg)()
    new.CopyFrom(msg)
    return new


__all__ = ["Layer", "Net", "NetIndex", "Shape", "array_to_blobproto", "blobproto_to_array", "clone_msg"]
