"""Audit: nets compress folds (fold_factors: BatchNorm + Scale into a factor, a factor's last FC into the
next FC) load and agree in every consumer the project targets: OpenCV's Caffe reader on the written
caffemodel, onnxruntime and MNN on model.onnx. At a tiny speed-up the written net stays close to real
Caffe's golden output."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import golden_case, load_npz

CASES = [("resnet_mini", {"speedup": 1.05}, "scale_conv1 into conv1_lr2"),  # BN + Scale after a factor
         ("cifar10_quick", {"rank": "ip1=16"}, "ip1_lr2 into ip2")]  # merged: no ReLU between them


@pytest.mark.parametrize("case,kw,folded", CASES)
def test_folded_compressed_net_agrees_in_opencv_onnxruntime_and_mnn(case, kw, folded, tmp_path):
    cv2 = pytest.importorskip("cv2")
    ort = pytest.importorskip("onnxruntime")
    from lrprune_caffe.api import compress_files as compress
    d = golden_case(case)
    out = tmp_path / "o"
    report, net = compress(d / "model.prototxt", d / "model.caffemodel", out, onnx=True, verify=False,
                           measure_rounds=0 if "speedup" in kw else None, **kw)
    assert any("fold_factors" in n and folded in n for n in report["notes"]), report["notes"]
    name = net.inputs()[0]
    x = load_npz(d / "inputs.npz")[name][:1].astype(np.float32)
    top = net.outputs()[0]
    golden = load_npz(d / "blobs.npz")[top]
    cvn = cv2.dnn.readNetFromCaffe(str(out / "model.prototxt"), str(out / "model.caffemodel"))
    cvn.setInput(x, name)
    caffe_out = cvn.forward(top).reshape(-1)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(None, {name: x})[0].reshape(-1)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))
    assert rel(onnx_out, caffe_out) < 1e-5
    assert rel(caffe_out, golden.reshape(-1)) < 0.1  # a tiny cut: close to what real Caffe computed
    try:
        import MNN
        import MNN.expr as F
        from test_onnx import _mnn_convert
    except ImportError:
        return
    _mnn_convert(out / "model.onnx", tmp_path / "model.mnn")
    module = MNN.nn.load_module_from_file(str(tmp_path / "model.mnn"), [name], [top])
    y = module.forward([F.const(x, list(x.shape), F.NCHW)])[0]
    assert rel(np.array(F.convert(y, F.NCHW).read()).reshape(-1), caffe_out) < 1e-4
