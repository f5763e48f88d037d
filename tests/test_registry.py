"""The layer registry (``ir/layers``): one spec class per type, and adding a type means one class.

A toy type ``Negate`` (``y = -x``) registered by this test in one class becomes exportable
(checked by onnxruntime against numpy's ``-x``), runs in the torch model, and lets
structured pruning pass through it (the pruned net, run by onnxruntime, equals the
numpy forward of the dense weights restricted to the kept channels).
"""

from __future__ import annotations

import numpy as np
import pytest

from lrprune_caffe.engines.runtime import run_net
from lrprune_caffe.export.onnx import lowered_types
from lrprune_caffe.io.caffe import read_net
from lrprune_caffe.ir.layers import base, get_spec, known_types, register
from lrprune_caffe.ir.layers.base import LayerSpec, follow_channels
from lrprune_caffe.transforms import run_pass
from lrprune_caffe.transforms.factorize import FACTORIZABLE
from lrprune_caffe.transforms.prune import PRUNABLE_TYPES, PruneSpec
from lrprune_caffe.transforms.structured_prune import prune_structured


def test_one_spec_class_per_type():
    classes = [type(get_spec(t)) for t in known_types()]
    assert len(set(classes)) == len(classes)
    for t in known_types():
        assert get_spec(t).type_name == t


def test_register_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register("ReLU")(type("AnotherReLU", (LayerSpec,), {}))


def test_type_lists_come_from_the_specs():
    """The module-level lists other modules use keep their values."""
    assert FACTORIZABLE == ("Convolution", "InnerProduct")
    assert PRUNABLE_TYPES == ("Convolution", "Deconvolution", "InnerProduct")
    assert "HardSigmoid" not in lowered_types() and "ReLU" in lowered_types()


NET = """
name: "toy"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 5 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" inner_product_param { num_output: 6 } }
layer { name: "neg" type: "Negate" bottom: "ip1" top: "neg" }
layer { name: "ip2" type: "InnerProduct" bottom: "neg" top: "ip2" inner_product_param { num_output: 3 } }
"""


@pytest.fixture
def negate_type():
    @register("Negate")
    class NegateSpec(LayerSpec):
        def to_onnx(self, layer, ctx):
            ctx.node("Neg", [ctx.bottom(0)], ctx.top(0))

        def to_torch(self, layer):
            def fn(bottoms, blobs, training):
                return [-bottoms[0]]
            return fn

        def shrink_input(self, layer, shape, block, in_place):
            return follow_channels(layer, block)
    try:
        yield "Negate"
    finally:
        del base._REGISTRY["Negate"]


def _toy_net(tmp_path):
    p = tmp_path / "toy.prototxt"
    p.write_text(NET)
    net = read_net(p)
    rng = np.random.default_rng(0)
    net.layer("ip1").blobs = [rng.standard_normal((6, 5)).astype(np.float32),
                              rng.standard_normal(6).astype(np.float32)]
    net.layer("ip2").blobs = [rng.standard_normal((3, 6)).astype(np.float32),
                              rng.standard_normal(3).astype(np.float32)]
    return net


def _numpy_forward(x, w1, b1, w2, b2):
    return -(x @ w1.T + b1) @ w2.T + b2


def test_a_new_type_is_one_class(tmp_path, negate_type):
    assert negate_type in lowered_types()
    net = _toy_net(tmp_path)
    x = np.random.default_rng(1).standard_normal((2, 5)).astype(np.float32)
    w1, b1 = net.layer("ip1").blobs
    w2, b2 = net.layer("ip2").blobs
    want = _numpy_forward(x, w1, b1, w2, b2)
    got = run_net(net, {"data": x}, outputs=["ip2"])["ip2"]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()

    result = run_pass(prune_structured, net, spec=PruneSpec(per_layer={"ip1": 0.5}, structured=True))
    (row,) = [d for d in result.details if d.get("structured")]
    keep = np.setdiff1d(np.arange(6), row["removed"])
    assert net.layer("ip2").blobs[0].shape == (3, 3)
    want = _numpy_forward(x, w1[keep], b1[keep], w2[:, keep], b2)
    got = run_net(net, {"data": x}, outputs=["ip2"])["ip2"]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()

    pytest.importorskip("torch")
    from lrprune_caffe.train import torch_model
    assert negate_type in torch_model.supported_types()
    got = torch_model.run_torch(net, {"data": x}, outputs=["ip2"])["ip2"]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
