"""Pass fold_factors: the folded net computes what the unfolded one does, run by onnxruntime and by
OpenCV's Caffe reader from the written files; what may not be folded is left alone, saying why."""

from __future__ import annotations

import numpy as np
import pytest

from lrprune_caffe.io.output import write_net
from lrprune_caffe.ir.net import Layer, Net
from lrprune_caffe.transforms import run_pass
from lrprune_caffe.transforms.fold_factors import fold_factors


def _conv(name, bottom, top, w, b=None, pad=0, stride=1):
    layer = Layer(name, "Convolution", [bottom], [top])
    cp = layer.msg.convolution_param
    cp.num_output, cp.kernel_size[:], cp.bias_term = w.shape[0], [w.shape[2]], b is not None
    if pad:
        cp.pad[:] = [pad]
    if stride != 1:
        cp.stride[:] = [stride]
    layer.blobs = [w.astype(np.float32)] + ([b.astype(np.float32)] if b is not None else [])
    return layer


def _ip(name, bottom, top, w, b=None):
    layer = Layer(name, "InnerProduct", [bottom], [top])
    ip = layer.msg.inner_product_param
    ip.num_output, ip.bias_term = w.shape[0], b is not None
    layer.blobs = [w.astype(np.float32)] + ([b.astype(np.float32)] if b is not None else [])
    return layer


def factor_net():
    """data (1x6x10x10) -> c_lr1 (3x3 6->3) -> c_lr2 (1x1 3->16, bias) -> BN -> Scale -> ReLU
    -> d (1x1 16->12) -> e_lr1 (1x1 12->4, no bias) -> e_lr2 (1x1 4->12, bias) -> f (1x1 12->10)
    -> ip_lr1 (IP 1000->5) -> ip_lr2 (5->40, bias) -> ip2 (40->7)."""
    rng = np.random.default_rng(0)
    r = rng.standard_normal
    inp = Layer("data", "Input", [], ["data"])
    inp.msg.input_param.shape.add().dim.extend([1, 6, 10, 10])
    bn = Layer("bn", "BatchNorm", ["c"], ["c"])
    bn.msg.batch_norm_param.use_global_stats = True
    bn.blobs = [r(16).astype(np.float32), (1 + rng.random(16)).astype(np.float32), np.ones(1, np.float32)]
    sc = Layer("sc", "Scale", ["c"], ["c"])
    sc.msg.scale_param.bias_term = True
    sc.blobs = [(0.5 + rng.random(16)).astype(np.float32), r(16).astype(np.float32)]
    layers = [inp, _conv("c_lr1", "data", "c_lr1", r((3, 6, 3, 3)), pad=1),
              _conv("c_lr2", "c_lr1", "c", r((16, 3, 1, 1)), r(16)), bn, sc, Layer("relu", "ReLU", ["c"], ["c"]),
              _conv("d", "c", "d", r((12, 16, 1, 1)), r(12)),
              _conv("e_lr1", "d", "e_lr1", r((4, 12, 1, 1))), _conv("e_lr2", "e_lr1", "e", r((12, 4, 1, 1)), r(12)),
              _conv("f", "e", "f", r((10, 12, 1, 1)), r(10)),
              _ip("ip_lr1", "f", "ip_lr1", r((5, 1000))), _ip("ip_lr2", "ip_lr1", "ip", r((40, 5)), r(40)),
              _ip("ip2", "ip", "ip2", r((7, 40)), r(7))]
    return Net(name="factors", layers=layers)


def _ort(net, x):
    import onnxruntime as ort
    from lrprune_caffe.export.onnx import export_model
    sess = ort.InferenceSession(export_model(net).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"data": x})[0]


def _opencv(net, x, tmp_path, name):
    cv2 = pytest.importorskip("cv2")
    out = tmp_path / name
    write_net(net, out)
    cvnet = cv2.dnn.readNetFromCaffe(str(out / "model.prototxt"), str(out / "model.caffemodel"))
    cvnet.setInput(x)
    return cvnet.forward(net.layers[-1].name)


def test_folded_net_matches_the_unfolded_on_onnxruntime_and_opencv(tmp_path):
    net = factor_net()
    before = [(x.name, x.blobs[0].copy()) for x in net.layers if x.blobs]
    new = Net(net.name, list(net.layers), net.header, "", "", [])
    res = run_pass(fold_factors, new)
    assert res.changed
    kinds = {(d["kind"], d["into"]) for d in res.details if d.get("kind")}
    # BN + Scale into c_lr2; d -> e_lr1 and e_lr2 -> f (1x1 into 1x1); ip_lr2 -> ip2
    assert kinds == {("batchnorm", "c_lr2"), ("linear", "e_lr1"), ("linear", "f"), ("linear", "ip2")}
    assert [x.name for x in new.layers] == ["data", "c_lr1", "c_lr2", "relu", "e_lr1", "f", "ip_lr1", "ip2"]
    for name, w in before:  # the layers shared with the original net are untouched
        assert np.array_equal(net.layer(name).blobs[0], w)
    x = np.random.default_rng(1).standard_normal((1, 6, 10, 10)).astype(np.float32)
    ref = _ort(net, x)
    np.testing.assert_allclose(_ort(new, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    cv_ref = _opencv(net, x, tmp_path, "a")
    np.testing.assert_allclose(cv_ref.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(_opencv(new, x, tmp_path, "b").reshape(ref.shape), ref, rtol=1e-4,
                               atol=1e-4 * np.abs(ref).max())


def test_conv_factor_into_inner_product_and_padding_rules():
    rng = np.random.default_rng(2)
    r = rng.standard_normal
    inp = Layer("data", "Input", [], ["data"])
    inp.msg.input_param.shape.add().dim.extend([2, 8, 5, 5])
    # a 1x1 factor feeding a padded 3x3 conv: its bias would be padded wrongly, so it is not merged
    padded = Net("p", [inp, _conv("a_lr2", "data", "a", r((2, 8, 1, 1)), r(2)),
                       _conv("b", "a", "b", r((40, 2, 3, 3)), pad=1)])
    res = run_pass(fold_factors, padded)
    assert not res.changed and "pads its input" in res.reason
    # a reducing 1x1 factor (8->2) into a 3x3 (2->40): merged it would cost more MACs than apart
    wide = Net("w", [inp, _conv("a_lr1", "data", "a", r((2, 8, 1, 1))), _conv("b", "a", "b", r((40, 2, 3, 3)))])
    res = run_pass(fold_factors, wide)
    assert not res.changed and "would cost" in res.reason
    # a 1x1 factor (2->8) read by an InnerProduct, flattened: merged into one IP over the input
    small = Layer("data", "Input", [], ["data"])
    small.msg.input_param.shape.add().dim.extend([2, 2, 5, 5])
    net = Net("q", [small, _conv("a_lr2", "data", "a", r((8, 2, 1, 1)), r(8)), _ip("ip", "a", "ip", r((30, 200)), r(30))])
    x = r((2, 2, 5, 5)).astype(np.float32)
    ref = _ort(net, x)
    new = Net("q", list(net.layers), net.header, "", "", [])
    assert run_pass(fold_factors, new).changed and [x.name for x in new.layers] == ["data", "ip"]
    np.testing.assert_allclose(_ort(new, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_protected_and_non_factor_layers_are_left_alone():
    net = factor_net()
    res = run_pass(fold_factors, Net(net.name, list(net.layers), net.header, "", "", []),
                   protect={"c_lr2", "e_lr1", "f", "ip2"})
    assert not res.changed and "protected" in res.reason
    plain = Net(net.name, [x for x in net.layers], net.header, "", "", [])
    for x in plain.layers:  # no factor names: nothing is folded unless any_layer
        x.name = x.name.replace("_lr", "_x")
    assert not run_pass(fold_factors, plain).changed


def test_compress_folds_batchnorm_into_factors_and_says_so(tmp_path):
    from lrprune_caffe.api import compress_files
    from lrprune_caffe.io.caffe import load_net, save_net
    net = factor_net()
    keep = {"data", "c_lr1", "c_lr2", "bn", "sc", "relu"}
    layers = [x for x in net.layers if x.name in keep]
    conv = _conv("c", "data", "c", np.random.default_rng(3).standard_normal((16, 6, 3, 3)), np.zeros(16), pad=1)
    pool = Layer("pool", "Pooling", ["c"], ["pool"])
    pool.msg.pooling_param.global_pooling = True
    small = Net("bn", [layers[0], conv] + layers[3:] + [pool])
    proto, model = tmp_path / "n.prototxt", tmp_path / "n.caffemodel"
    save_net(small, str(proto), str(model))
    report, _ = compress_files(str(proto), str(model), tmp_path / "out", rank=3)
    assert any("folded 1 factor neighbour" in n and "bn, sc into c_lr2" in n for n in report["notes"])
    written = load_net(str(tmp_path / "out" / "model.prototxt"), str(tmp_path / "out" / "model.caffemodel"))
    assert [x.name for x in written.layers] == ["data", "c_lr1", "c_lr2", "relu", "pool"]
    row = {r["name"]: r for r in report["layers"]}["c"]
    assert row["new_layers"] == ["c_lr1", "c_lr2"]
