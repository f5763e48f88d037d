"""A training net (train_val.prototxt) as written: every phase kept, upgraded, not validated."""

from __future__ import annotations

from lrprune_caffe.ir.net import Layer, Net

from .caffe import parse_prototxt, upgrade_net


def read_train_net(path) -> Net:
    """A training net as written: every phase kept, upgraded, not validated (it has Data layers)."""
    msg = parse_prototxt(path)
    upgrade_net(msg, path)
    header = type(msg)()
    header.CopyFrom(msg)
    for f in ("layer", "layers", "name"):
        header.ClearField(f)
    return Net(name=msg.name, layers=[Layer.from_proto(lp) for lp in msg.layer], header=header, source=str(path))


__all__ = ["read_train_net"]
