"""export-onnx --cut BLOB,...: the graph ends at the named blobs (an SSD net's loc, conf and priors for a
runtime with its own post-processing), checked with onnxruntime against OpenCV's Caffe reader and
real Caffe's blobs (golden ssd_mini); and the notes on what MNN / OpenCV will not take."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import golden_case, lenet_files, load_npz, run_cli

from lrprune_caffe.engines.runtime import ort_session, run_opencv
from lrprune_caffe.io.caffe import load_net

CUT = ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"]


def test_cut_ssd_heads_equal_opencv_and_caffe(tmp_path, capsys):
    pytest.importorskip("cv2")
    d = golden_case("ssd_mini")
    proto, model = d / "model.prototxt", d / "model.caffemodel"
    out = tmp_path / "heads.onnx"
    rc, stdout, err = run_cli(capsys, "export-onnx", proto, model, "-o", out, "--cut", ",".join(CUT + ["conv1"]))
    assert rc == 0, err
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    assert [o.name for o in m.graph.output] == CUT + ["conv1"]
    ops = {n.op_type for n in m.graph.node}
    assert "NonMaxSuppression" not in ops and "TopK" not in ops  # DetectionOutput was dropped
    x = load_npz(d / "inputs.npz")
    got = dict(zip(CUT + ["conv1"], ort_session(out.read_bytes(), 1).run(CUT + ["conv1"], x)))
    cv = run_opencv(load_net(proto, model), x, CUT + ["conv1"])
    caffe = load_npz(d / "blobs.npz")
    for name in CUT + ["conv1"]:  # conv1: its final value, after the in-place ReLU
        np.testing.assert_allclose(got[name], cv[name].reshape(got[name].shape), atol=1e-4, rtol=0, err_msg=name)
        np.testing.assert_allclose(got[name], caffe[name], atol=1e-4, rtol=0, err_msg=name)


def test_cut_drops_unneeded_layers_and_names_a_missing_blob(tmp_path, capsys):
    d = golden_case("ssd_mini")
    proto, model = d / "model.prototxt", d / "model.caffemodel"
    out = tmp_path / "c.onnx"
    rc, stdout, err = run_cli(capsys, "export-onnx", proto, model, "-o", out, "--cut", "conv2_norm_loc", "--json")
    assert rc == 0, err
    assert json.loads(stdout)["outputs"] == ["conv2_norm_loc"]
    inits = {t.name for t in onnx.load(str(out)).graph.initializer}
    assert not any(n.startswith(("conv3", "conv2_norm_conf")) for n in inits)  # only the loc head's path
    rc, stdout, err = run_cli(capsys, "export-onnx", proto, model, "-o", tmp_path / "x.onnx",
                              "--cut", "mbox_loc,no_such_blob")
    assert rc == 2 and "no_such_blob" in err and "--cut" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()
    rc, stdout, err = run_cli(capsys, "export-onnx", proto, model, "-o", tmp_path / "x.onnx", "--cut", "data")
    assert rc == 2 and "'data' is an input" in err


def test_compress_sparse_onnx_says_mnn_will_not_take_it(tmp_path, capsys):
    _, proto, model = lenet_files()
    out = tmp_path / "o"
    rc, stdout, err = run_cli(capsys, "compress", proto, model, "-o", out, "--prune", "0.8", "--onnx", "--sparse",
                              "--no-verify")
    assert rc == 0, err
    assert "MNN" in err and "without --sparse" in err
    rep = json.loads((out / "report.json").read_text())
    assert any("MNN" in n and "without --sparse" in n for n in rep["onnx"]["consumer_notes"])
    assert any(n.startswith("model.onnx: MNN") for n in rep["notes"])
    # the dense file says nothing of the kind
    rc, stdout, err = run_cli(capsys, "compress", proto, model, "-o", tmp_path / "dense", "--prune", "0.8",
                              "--onnx", "--no-verify")
    assert rc == 0 and "MNN" not in err
    assert json.loads((tmp_path / "dense" / "report.json").read_text())["onnx"]["consumer_notes"] == []


def test_export_ssd_says_opencv_onnx_reader_will_not_take_nms(tmp_path, capsys):
    d = golden_case("ssd_mini")
    rc, stdout, err = run_cli(capsys, "export-onnx", d / "model.prototxt", d / "model.caffemodel",
                              "-o", tmp_path / "ssd.onnx")
    assert rc == 0 and "NonMaxSuppression" in err
    rc, stdout, err = run_cli(capsys, "export-onnx", d / "model.prototxt", d / "model.caffemodel",
                              "-o", tmp_path / "heads.onnx", "--cut", ",".join(CUT))
    assert rc == 0 and "NonMaxSuppression" not in err
