"""A train_val prototxt as a full description: its data layers' sources and preprocessing.

Caffe's data layers (``Data``, ``ImageData``, ``HDF5Data``) name where the
samples are (``data_param`` / ``image_data_param`` / ``hdf5_data_param``
``source``), how many go in a batch (``batch_size``), and how they are
preprocessed (``transform_param``, see :mod:`lrprune_caffe.data.transformer`;
HDF5Data applies none, as in Caffe). :func:`phase_data` opens the data layer of
a phase as a :class:`~lrprune_caffe.data.stream.StreamDataset`.

:func:`deploy_view` gives the net that runs: the data layer replaced by an
``Input`` of the data's shape (batch_size x C x H x W, C x H x W from the first
record after the transform, as Caffe shapes the data top), and the layers that
need the labels (Accuracy, losses, and whatever reads their tops) removed. The
Accuracy layer's first bottom is the class-score blob, as Caffe scores it.

Relative paths (sources, mean files, root folders) resolve as Caffe resolves
them, against the working folder, else next to the prototxt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lrprune_caffe.errors import UserError
from lrprune_caffe.ir.net import Layer
from .sources import DBSource, HDF5Source, ListSource
from .stream import StreamDataset
from .transformer import Transformer, from_param, resolve_path

DATA_TYPES = ("Data", "ImageData", "HDF5Data")
#: data layers we cannot read (each needs its own feeder)
OTHER_DATA_TYPES = ("MemoryData", "WindowData", "DummyData", "AnnotatedData", "Python", "VideoData")


@dataclass
class PhaseData:
    layer: str  # the data layer's name
    type: str
    data_top: str
    label_top: str
    batch_size: int
    dataset: StreamDataset
    notes: list = field(default_factory=list)


def data_layers(net) -> list:
    return [layer for layer in net.layers if layer.type in DATA_TYPES]


def has_data_layer(net) -> bool:
    return bool(data_layers(net))


def _where(net, layer):
    return f"{net.source or 'the net'}: layer '{layer.name}' ({layer.type})"


def _legacy_transform(layer, dp):
    """transform fields inside data_param / image_data_param (pre-2014 nets), as Caffe's upgrade moves them."""
    from lrprune_caffe.schema.proto import pb
    tp = pb.TransformationParameter()
    tp.CopyFrom(layer.param_msg("transform_param"))
    if layer.has("transform_param"):
        return tp
    for f in ("scale", "mean_file", "crop_size", "mirror"):
        if dp.HasField(f):
            setattr(tp, f, getattr(dp, f))
    return tp


def open_layer(net, layer, phase, seed=0) -> PhaseData:
    """The StreamDataset of one data layer."""
    where = _where(net, layer)
    base = Path(net.source).parent if net.source else None
    if len(layer.tops) < 1:
        raise UserError(f"{where}: a data layer without tops")
    data_top = layer.tops[0]
    label_top = layer.tops[1] if len(layer.tops) > 1 else None
    if label_top is None:
        raise UserError(f"{where}: the data layer has no label top; evaluate and finetune need labels")
    notes = []
    if layer.type == "Data":
        dp = layer.param_msg("data_param")
        tp = _legacy_transform(layer, dp)
        t = from_param(tp, phase, base, where)
        src = resolve_path(dp.source, base, f"{where}: source")
        backend = "lmdb" if dp.backend == dp.LMDB else "leveldb"
        rec = DBSource(src, backend, decode=t.decode)
        batch = int(dp.batch_size)
        if dp.rand_skip:
            notes.append(f"{where}: rand_skip {dp.rand_skip} ignored (Caffe skips a random number of "
                         f"records at start; we start at the first)")
    elif layer.type == "ImageData":
        ip = layer.param_msg("image_data_param")
        tp = _legacy_transform(layer, ip)
        t = from_param(tp, phase, base, where)
        src = resolve_path(ip.source, base, f"{where}: source")
        root = ip.root_folder
        if root and not Path(root).exists() and base is not None and (base / root).exists():
            root = str(base / root) + ("/" if root.endswith("/") else "")
        rec = ListSource(src, root, ip.new_height, ip.new_width, ip.is_color)
        batch = int(ip.batch_size)
        if ip.shuffle and phase == "TRAIN":
            notes.append(f"{where}: shuffle is set; training shuffles every epoch anyway")
    else:  # HDF5Data
        hp = layer.param_msg("hdf5_data_param")
        src = resolve_path(hp.source, base, f"{where}: source")
        rec = HDF5Source(src, data_top, label_top, base_dir=base)
        t = Transformer(phase=phase)
        if layer.has("transform_param"):
            notes.append(f"{where}: Caffe's HDF5Data applies no transform_param; ignored")
        batch = int(hp.batch_size)
    if batch < 1:
        raise UserError(f"{where}: batch_size must be set (>= 1)")
    ds = StreamDataset(rec, t, str(src), notes=notes, seed=seed)
    return PhaseData(layer.name, layer.type, data_top, label_top, batch, ds, list(ds.notes))


def phase_data(net, phase="TEST", seed=0) -> PhaseData:
    """The data layer of ``net`` (already filtered to ``phase``), opened."""
    others = [layer for layer in net.layers if layer.type in OTHER_DATA_TYPES]
    layers = data_layers(net)
    if others and not layers:
        raise UserError(f"{_where(net, others[0])}: this data layer type is not read here "
                        f"(supported: {', '.join(DATA_TYPES)})")
    if len(layers) != 1:
        raise UserError(f"{net.source or 'the net'}: the {phase} view has {len(layers)} data layers "
                        f"({', '.join(layer.name for layer in layers) or 'none'}); expected one")
    return open_layer(net, layers[0], phase, seed)


def score_blob(net):
    """The Accuracy layer's first bottom (Caffe's class scores), if the net has one Accuracy of top_k 1."""
    acc = [layer for layer in net.layers if layer.type == "Accuracy"]
    top1 = [layer for layer in acc if int(layer.param_msg("accuracy_param").top_k) == 1] or acc
    return top1[0].bottoms[0] if top1 else None


def deploy_view(net, pdata: PhaseData):
    """(deploy net, score blob or None): the data layer as an Input, label consumers removed."""
    shape = (pdata.batch_size, *pdata.dataset.sample_shape)
    scores = score_blob(net)
    out = net.copy()
    dropped = {t for layer in net.layers if layer.type in DATA_TYPES for t in layer.tops[1:]}
    layers = []
    for layer in out.layers:
        if layer.type in DATA_TYPES:
            if layer.name != pdata.layer:
                continue
            inp = Layer(layer.name, "Input", [], [layer.tops[0]])
            inp.msg.input_param.shape.add().dim.extend(int(d) for d in shape)
            layers.append(inp)
            continue
        if any(b in dropped for b in layer.bottoms) or layer.type.endswith("Loss") or layer.type == "Silence":
            dropped.update(layer.tops)
            continue
        layers.append(layer)
    out.layers[:] = layers
    return out, scores


@dataclass
class TrainVal:
    net: object  # the deploy net (weights loaded)
    train: PhaseData  # the TRAIN data layer (random crop, mirror) or None
    val: PhaseData  # the TEST data layer (center crop) or None
    scores: str  # the Accuracy layer's score blob, or None
    notes: list = field(default_factory=list)


def load_train_val(prototxt, weights=None, seed=0) -> TrainVal:
    """A train_val's deploy net and its TRAIN and TEST data (either may be missing, not both)."""
    from lrprune_caffe.io.caffe import load_net, read_net
    views = {}
    for phase in ("TEST", "TRAIN"):
        full = load_net(prototxt, weights, phase=phase) if phase == "TEST" else read_net(prototxt, phase=phase)
        views[phase] = (full, phase_data(full, phase, seed) if has_data_layer(full) else None)
    (test_net, val), train = views["TEST"], views["TRAIN"][1]
    if val is None and train is None:
        raise UserError(f"{prototxt}: no Data, ImageData or HDF5Data layer in the TRAIN or TEST phase")
    if val is not None:
        net, scores = deploy_view(test_net, val)
    else:
        full = load_net(prototxt, weights, phase="TRAIN")
        net, scores = deploy_view(full, train)
    if train is not None and val is not None and train.dataset.sample_shape != val.dataset.sample_shape:
        raise UserError(f"{prototxt}: the TRAIN data layer '{train.layer}' gives samples of "
                        f"{train.dataset.sample_shape}, the TEST one '{val.layer}' {val.dataset.sample_shape}; "
                        f"the net takes one shape")
    notes = (train.notes if train else []) + (val.notes if val else [])
    return TrainVal(net, train, val, scores, notes)


__all__ = ["PhaseData", "TrainVal", "load_train_val", "phase_data", "open_layer", "deploy_view", "score_blob",
           "data_layers", "has_data_layer", "DATA_TYPES"]
