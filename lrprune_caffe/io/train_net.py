"""A training net (train_val.prototxt) as written: every phase kept, upgraded, not validated;
and written back beside a deploy net made from it (compress --train-net, finetune, pipeline)."""

from __future__ import annotations

from lrprune_caffe.errors import UserError
from lrprune_caffe.ir.net import Layer, Net

from .caffe import net_to_prototxt, parse_prototxt, upgrade_net


def read_train_net(path) -> Net:
    """A training net as written: every phase kept, upgraded, not validated (it has Data layers)."""
    msg = parse_prototxt(path)
    upgrade_net(msg, path)
    header = type(msg)()
    header.CopyFrom(msg)
    for f in ("layer", "layers", "name"):
        header.ClearField(f)
    return Net(name=msg.name, layers=[Layer.from_proto(lp) for lp in msg.layer], header=header, source=str(path))


def check_train_net(train_net: Net, deploy: Net):
    """Every layer of ``deploy`` (but its Inputs, which stand for data layers) is in ``train_net``
    under its name and type: the training net describes the net that is written."""
    have = {}
    for layer in train_net.layers:
        have.setdefault(layer.name, set()).add(layer.type)
    for layer in deploy.layers:
        if layer.type == "Input":
            continue
        if layer.type not in have.get(layer.name, ()):
            raise UserError(f"{train_net.source or 'the train_val net'}: no layer '{layer.name}' ({layer.type}) "
                            f"as in the written net; the train_val was not rewritten as the net was")


def train_net_text(train_net: Net, deploy: Net = None) -> str:
    """train_val.prototxt's text, checked against the deploy net written beside it."""
    if deploy is not None:
        check_train_net(train_net, deploy)
    return net_to_prototxt(train_net)


__all__ = ["read_train_net", "check_train_net", "train_net_text"]
