"""MNN (a mobile runtime), where it installs, runs what ``compress --onnx`` writes for
compressed golden nets: its outputs equal OpenCV's on the written caffemodel within 1e-3."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import golden_case, load_npz
from test_onnx import _mnn_convert

CASES = [("resnet_mini", "tucker2", 1.5), ("layer_zoo", "spatial", 1.3), ("inception_mini", "channel", 1.5),
         ("lenet_mnist", "channel", 2.0)]


@pytest.mark.parametrize("case,scheme,speedup", CASES)
def test_mnn_runs_compressed_onnx(case, scheme, speedup, tmp_path):
    mnn = pytest.importorskip("MNN", reason="MNN is not installed (pip install \".[mobile]\")")
    import MNN.expr as F
    from lrprune_caffe.api import compress_files as compress
    from lrprune_caffe.engines.runtime import run_net
    d = golden_case(case)
    out = tmp_path / "o"
    report, net = compress(d / "model.prototxt", d / "model.caffemodel", out, scheme=scheme, speedup=speedup,
                           prune=0.3, prune_scope="layer", onnx=True, verify=False)
    # scope layer: at 30% the default erk allocation leaves LeNet's small conv2 factors dense, and this test
    # needs a factorized layer that is also pruned in the file MNN reads
    assert any(r["action"] == "factorized+pruned" for r in report["layers"])
    _mnn_convert(out / "model.onnx", tmp_path / "model.mnn")
    outs = net.outputs()
    module = mnn.nn.load_module_from_file(str(tmp_path / "model.mnn"), net.inputs(), outs)
    x = load_npz(d / "inputs.npz")[net.inputs()[0]][:1].astype(np.float32)
    ys = module.forward([F.const(x, list(x.shape), F.NCHW)])
    got = {n: np.array(F.convert(y, F.NCHW).read()) for n, y in zip(outs, ys)}
    ref = run_net(net, {net.inputs()[0]: x}, outs, engine="opencv")
    for n in outs:
        a, b = got[n].reshape(-1), ref[n].reshape(-1)
        assert np.linalg.norm(a - b) <= 1e-3 * max(np.linalg.norm(b), 1e-12), n
