"""Caffe files in and out: the entry point (:func:`load_net`, :func:`save_net`) joining
:mod:`.prototxt` (text, upgrades, phase rules, file sniffing) and :mod:`.caffemodel`
(binary weights). The names of both are re-exported here for callers.
"""

from __future__ import annotations

from .caffemodel import (WeightLayer, caffemodel_chunks, caffemodel_size, check_caffemodel_size,  # noqa: F401
                         check_finite, merge_weights, nonfinite_blobs, nonfinite_policy, read_caffemodel,
                         save_caffemodel)
from .prototxt import (PROTOBUF_LIMIT, PROTOTXT_LIMIT, V1_TYPE_NAMES, filter_phase, net_to_prototxt,  # noqa: F401
                       parse_prototxt, read_net, save_prototxt, sniff, upgrade_net, upgrade_v1_layer)
from lrprune_caffe.ir.analysis import infer_shapes
from lrprune_caffe.ir.net import Net


def load_net(prototxt, weights=None, phase="TEST", stages=(), level=0) -> Net:
    """Read a net (and optionally its weights) into the IR, validated."""
    net = read_net(prototxt, phase, stages, level)
    infer_shapes(net)
    if weights is not None:
        merge_weights(net, read_caffemodel(weights), path=weights)
    return net


def save_net(net: Net, prototxt_path, caffemodel_path=None) -> None:
    save_prototxt(net, prototxt_path)
    if caffemodel_path is not None:
        save_caffemodel(net, caffemodel_path)
