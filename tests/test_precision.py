"""Reduced precision (export/precision.py, export-onnx --precision/--quantize): sizes and accuracy of
the real-Caffe LeNet, judged by onnxruntime on the 1,000 held-out digits against their labels
(real Caffe's top-1 on them: 0.973, golden README)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import SHARED, golden_case, lenet_files, load_npz, require_shared, run_cli

SPLIT = SHARED / "data" / "mnist5k_split.npz"
CAFFE_TOP1 = 0.973


def _top1(path, x, y):
    from lrprune_caffe.engines.model import OnnxModel
    m = OnnxModel.load(str(path))
    out = m.run({m.input_names[0]: x})[m.output_names[0]]
    return float(np.mean(out.reshape(len(x), -1).argmax(1) == y))


def _split():
    require_shared(SPLIT)
    return SPLIT


@pytest.mark.parametrize("flags,max_ratio", [(["--quantize", "int8"], 0.30), (["--precision", "fp16"], 0.52)])
def test_lenet_reduced_size_and_accuracy(tmp_path, capsys, flags, max_ratio):
    d, proto, model = lenet_files()
    split = _split()
    x = load_npz(d / "inputs.npz")["data"]
    y = load_npz(d / "labels.npz")["labels"].astype(np.int64)
    fp32 = tmp_path / "fp32.onnx"
    assert run_cli(capsys, "export-onnx", proto, model, "-o", fp32)[0] == 0
    out = tmp_path / "small.onnx"
    if "--quantize" in flags:  # calibrated on the 4,000 training digits
        flags = [*flags, "--calib", split]
    rc, stdout, err = run_cli(capsys, "export-onnx", proto, model, "-o", out, *flags,
                              "--inputs", d / "inputs.npz", "--labels", d / "labels.npz", "--json")
    assert rc == 0, err
    rep = json.loads(stdout)
    size = out.stat().st_size
    assert rep["bytes"] == size and rep["precision"]["bytes_fp32"] == fp32.stat().st_size
    assert size <= max_ratio * fp32.stat().st_size
    top_fp32 = _top1(fp32, x, y)
    top = _top1(out, x, y)
    assert top_fp32 == pytest.approx(CAFFE_TOP1, abs=1e-9)
    assert top >= top_fp32 - 0.005
    v = rep["check"]["blobs"]["prob"]
    assert v["top1_ref"] == pytest.approx(top_fp32) and v["top1_test"] == pytest.approx(top)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    m = onnx.load(str(out))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    if "--quantize" in flags:
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        w = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
        assert w, "conv weights stored as int8"
        assert rep["precision"]["calibration"]["samples"] == 1000
    else:
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)
    # the plain console output says the same
    rc, stdout, _ = run_cli(capsys, "export-onnx", proto, model, "-o", tmp_path / "again.onnx", *flags,
                            "--inputs", d / "inputs.npz", "--labels", d / "labels.npz")
    assert rc == 0 and "x the fp32 file" in stdout and "top-1 accuracy 97.30% (fp32)" in stdout


def _pruned_lenet(fraction=0.95):
    from lrprune_caffe.export.onnx import export_model
    from lrprune_caffe.io.caffe import load_net
    from onnx import numpy_helper
    _, proto, weights = lenet_files()
    m = export_model(load_net(proto, weights))
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t).copy()
        if a.ndim >= 2:
            a[np.abs(a) < np.quantile(np.abs(a), fraction)] = 0
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    return m


@pytest.mark.parametrize("kw", [{"precision": "fp16"}, {"quantize": "int8"}])
def test_sparse_with_reduced_precision_same_outputs(kw):
    from lrprune_caffe.engines.model import OnnxModel
    from lrprune_caffe.export.precision import reduce_precision
    d, _, _ = lenet_files()
    x = load_npz(d / "inputs.npz")["data"][:50]
    m = _pruned_lenet()
    if "quantize" in kw:
        kw = {**kw, "calib": {"data": x}}
    dense, rd = reduce_precision(m, **kw)
    sparse, rs = reduce_precision(m, sparse=True, **kw)
    assert rs["sparse_initializers"] > 0 and rs["bytes"] < rd["bytes"]
    assert any("sparse initializers" in n for n in rs["notes"])
    a, b = OnnxModel(dense.SerializeToString()), OnnxModel(sparse.SerializeToString())
    np.testing.assert_array_equal(a.run({"data": x})["prob"], b.run({"data": x})["prob"])


def test_fp16_keeps_detection_tail_fp32():
    from lrprune_caffe.export.onnx import export_model
    from lrprune_caffe.export.precision import reduce_precision
    from lrprune_caffe.io.caffe import load_net
    d = golden_case("ssd_mini")
    m, rep = reduce_precision(export_model(load_net(d / "model.prototxt", d / "model.caffemodel")),
                              precision="fp16")
    assert any(n.startswith("detection_out") for n in rep["kept_fp32"])
    assert "mbox_conf_softmax" in rep["kept_fp32"]
    weight_ops = {n.name for n in m.graph.node if n.op_type in ("Conv", "Gemm")}
    assert weight_ops and not weight_ops & set(rep["kept_fp32"])


@pytest.mark.parametrize("flags,expect", [
    (["--quantize", "int8"], "needs calibration inputs"),
    (["--quantize", "int8", "--precision", "fp16", "--inputs", "X"], "exclude each other"),
    (["--calib", "X"], "give --quantize int8 too"),
    (["--quantize", "int8", "--opset", "11", "--calib", "SPLIT"], "needs opset 13"),
])
def test_precision_usage_errors(tmp_path, capsys, flags, expect):
    _, proto, model = lenet_files()
    flags = [str(_split()) if f == "SPLIT" else f for f in flags]
    rc, _, err = run_cli(capsys, "export-onnx", proto, model, "-o", tmp_path / "m.onnx", *flags)
    assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.onnx").exists()


def test_ssd_reduced_check_matches_detections(tmp_path, capsys):
    """A detection list is checked box by box (recall/precision at IoU 0.5), never by a tensor distance."""
    d = golden_case("ssd_mini")
    rc, out, err = run_cli(capsys, "export-onnx", d / "model.prototxt", d / "model.caffemodel", "-o",
                           tmp_path / "ssd16.onnx", "--precision", "fp16", "--inputs", d / "inputs.npz", "--json")
    assert rc == 0, err
    check = json.loads(out)["check"]
    assert "detection_out" not in check["blobs"]
    m = check["detections"]["detection_out"]
    assert m["ref"] > 0 and m["recall"] >= 0.9 and m["precision"] >= 0.9 and m["mean_iou"] > 0.95


def test_int8_on_random_inputs_is_a_warning():
    """Without --calib or --inputs, int8 scales come from the check's random inputs: the report warns
    (a LeNet calibrated that way scored 86.5% against 93.5% for its fp32 net: the audit)."""
    from lrprune_caffe.core.compress import CompressData, compress
    from lrprune_caffe.core.options import CompressOptions
    from lrprune_caffe.io.caffe import load_net
    d, _, _ = lenet_files()
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    o = CompressOptions(speedup=2.0, onnx=True, quantize="int8", cost="macs", progress=False)
    res = compress(net, o, CompressData())
    assert any("int8 scales were calibrated on random inputs" in w for w in res.report["warnings"])
    x = load_npz(d / "inputs.npz")["data"][:8]
    res = compress(net, o, CompressData(inputs={"data": x}))
    assert not any("int8" in w for w in res.report["warnings"])
