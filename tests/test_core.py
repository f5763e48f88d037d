"""The net-in, net-out core: compress on an IR net touches no file; the IR's mutation API."""

from __future__ import annotations

import builtins
import tempfile

import numpy as np
import pytest

from conftest import golden_case, load_npz
from lrprune_caffe.core.compress import CompressData, CompressOptions, compress
from lrprune_caffe.errors import UserError
from lrprune_caffe.io.caffe import load_net
from lrprune_caffe.ir.net import Layer


def _no_files(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError(f"the core touched the file system: {a[:1]}")
    for mod, name in ((builtins, "open"), (tempfile, "mkstemp"), (tempfile, "mkdtemp"),
                      (tempfile, "TemporaryDirectory"), (tempfile, "NamedTemporaryFile")):
        monkeypatch.setattr(mod, name, refuse)


def test_compress_on_a_net_touches_no_file(monkeypatch):
    pytest.importorskip("onnxruntime")
    import onnx  # noqa: F401  (imported before the file system is refused)
    import onnxruntime as ort
    d = golden_case("lenet_mnist")
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    x = load_npz(d / "inputs.npz")["data"][:16]
    before = {l.name: [b.copy() for b in l.blobs] for l in net.layers}
    _no_files(monkeypatch)
    res = compress(net, CompressOptions(rank="ip1=32", prune="0.9,ip1=0.5", onnx=True, sparse=True),
                   CompressData(inputs={"data": x}, inputs_desc="16 digits"))
    monkeypatch.undo()
    assert set(res.files) == {"model.onnx", "masks.npz"}
    assert set(res.masks) == {"conv1/0", "conv2/0", "ip1_lr1/0", "ip1_lr2/0", "ip2/0"}
    rows = {r["name"]: r for r in res.report["layers"]}
    assert rows["ip1"]["action"] == "factorized+pruned" and rows["conv1"]["action"] == "pruned"
    assert res.report["verification"]["inputs"] == "16 digits" and res.report["verification"]["batch"] == 16
    assert "ip1_lr1" in res.net and "ip1" not in res.net
    # the input net is unchanged (verification's reference)
    assert all(np.array_equal(a, b) for l in net.layers for a, b in zip(l.blobs, before[l.name]))
    # the sparse model.onnx runs in onnxruntime and agrees with the compressed net's report
    sess = ort.InferenceSession(res.files["model.onnx"], providers=["CPUExecutionProvider"])
    assert sess.run(["prob"], {"data": x[:1]})[0].shape == (1, 10)


def test_compress_says_what_to_do_before_any_work():
    d = golden_case("lenet_mnist")
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    with pytest.raises(UserError, match="say what to do"):
        compress(net, CompressOptions())
    with pytest.raises(UserError, match="unknown option"):
        CompressOptions.from_kwargs(rank=4, no_such_option=1)


def test_replace_and_insert_keep_order():
    d = golden_case("lenet_mnist")
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    names = [l.name for l in net.layers]
    a = Layer("ip1_a", "ReLU", ["ip1"], ["ip1"])
    net.replace_layers({"ip1": [net.layer("ip1"), a]})
    net.insert_after("conv1", Layer("conv1_relu", "ReLU", ["conv1"], ["conv1"]))
    assert [l.name for l in net.layers] == (names[:names.index("conv1") + 1] + ["conv1_relu"]
                                            + names[names.index("conv1") + 1:names.index("ip1") + 1]
                                            + ["ip1_a"] + names[names.index("ip1") + 1:])
    with pytest.raises(KeyError):
        net.replace_layer("nope", a)
    index = net.index_by_name()
    assert index.layer("ip2") is net.layer("ip2")
    # in-place writers: conv1's readers up to the next non-in-place writer, as Net.consumers says
    assert [l.name for l in index.consumers("conv1")] == [l.name for l in net.consumers("conv1")]
    at = net.index("ip1_a")
    assert index.producer("ip1", before=at).name == "ip1" and index.producer("ip1", before=at + 1).name == "ip1_a"
    assert index.producer("ip1") is net.producer("ip1")
