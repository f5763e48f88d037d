"""``compress --prune`` end to end from the command line: the written caffemodel read back by
OpenCV's Caffe reader (an independent reader) holds exactly the zeros the report counts,
masks.npz matches, ``--onnx --sparse`` writes a file onnxruntime runs with the same outputs
as OpenCV on the caffemodel and that is at most 0.35x the dense ONNX at 90% sparsity,
and bad pruning requests fail with one line, exit 2, nothing written."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import lenet_files, run_cli, golden_case, load_npz
from lrprune_caffe.cli.main import main

cv2 = pytest.importorskip("cv2")


lenet = lenet_files


run = run_cli


def cv_blobs(outdir, layer_names):
    """Every blob of the named layers, as OpenCV's Caffe reader loaded them."""
    from lrprune_caffe.io.caffe import load_net
    tops = {layer.name: layer.tops[0] for layer in load_net(outdir / "model.prototxt").layers if layer.tops}
    net = cv2.dnn.readNetFromCaffe(str(outdir / "model.prototxt"), str(outdir / "model.caffemodel"))
    out = {}
    for name in layer_names:
        lid = net.getLayerId(name)
        if lid < 0:  # OpenCV names some layers after their top (conv2_lr2 writes 'conv2')
            lid = net.getLayerId(tops[name])
        blobs = net.getLayer(lid).blobs
        out[name] = [np.array(b) for b in blobs]
    return net, out


@pytest.fixture(scope="module")
def pruned90(tmp_path_factory):
    d, proto, model = lenet()
    tmp = tmp_path_factory.mktemp("p90")
    x = load_npz(d / "inputs.npz")["data"][:100]
    np.savez(tmp / "inputs.npz", data=x)
    outs = {}
    for name, extra in (("sparse", ["--sparse"]), ("dense", [])):
        rc = main(["compress", proto, model, "-o", str(tmp / name), "--prune", "0.9", "--onnx",
                   "--inputs", str(tmp / "inputs.npz"), "--json", *extra])
        assert rc == 0
        outs[name] = tmp / name
    return outs, x


def test_files_and_report_fields(pruned90):
    outs, _ = pruned90
    out = outs["sparse"]
    assert {p.name for p in out.iterdir()} == {"model.prototxt", "model.caffemodel", "model.onnx", "masks.npz",
                                               "report.json", "report.md"}
    rep = json.loads((out / "report.json").read_text())
    t = rep["totals"]
    for key in ("nonzero_params", "caffemodel_bytes", "onnx_bytes", "dense_bytes", "csr_bytes"):
        assert key in t
    assert t["caffemodel_bytes"] == (out / "model.caffemodel").stat().st_size
    assert t["onnx_bytes"] == (out / "model.onnx").stat().st_size
    for row in rep["layers"]:  # the default scope (erk) leaves the small conv1 and ip2 dense, and says so
        assert "sparsity" in row and "nonzero_params" in row
        assert row["action"] == "pruned" or "kept dense by --prune-scope erk" in row["reason"], row
    assert {r["name"] for r in rep["layers"] if r["action"] == "pruned"} == {"conv2", "ip1"}
    assert "## Storage" in (out / "report.md").read_text()
    assert "masks.npz" in rep["files"]


def test_counts_equal_zeros_opencv_reads(pruned90):
    outs, _ = pruned90
    out = outs["sparse"]
    rep = json.loads((out / "report.json").read_text())
    names = [r["name"] for r in rep["layers"]]
    _, blobs = cv_blobs(out, names)
    total_nonzero = 0
    for row in rep["layers"]:
        bl = blobs[row["name"]]
        # OpenCV may store InnerProduct weights transposed: count, don't compare positions
        nonzero = sum(int(np.count_nonzero(b)) for b in bl)
        assert nonzero == row["nonzero_params"], row["name"]
        total_nonzero += nonzero
    # --prune 0.9 over the net (erk): 90% of the weights zero (the biases are counted here too)
    weights = sum(r["params"] for r in rep["prune"]["layers"])
    zero = sum(r["params"] - r["nonzero_params"] for r in rep["prune"]["layers"])
    assert abs(zero / weights - 0.9) < 0.002 and rep["prune"]["scope"] == "erk"
    assert all(r["sparsity"] > 0.85 for r in rep["layers"] if r["action"] == "pruned")
    # every blob of the net (there are no other layers with blobs in LeNet)
    assert total_nonzero == rep["totals"]["nonzero_params"]
    with np.load(out / "masks.npz") as z:
        for key in z.files:
            layer, idx = key.rsplit("/", 1)
            w = blobs[layer][int(idx)]
            assert int(z[key].sum()) >= int(np.count_nonzero(w))  # pruned weights are zero
            assert z[key].size == w.size


def test_sparse_onnx_small_and_same_outputs(pruned90):
    outs, x = pruned90
    sparse, dense = outs["sparse"] / "model.onnx", outs["dense"] / "model.onnx"
    ratio = sparse.stat().st_size / dense.stat().st_size
    assert ratio <= 0.35, ratio
    model = onnx.load(str(sparse))
    assert len(model.graph.sparse_initializer) > 0
    onnx.checker.check_model(model)
    cvnet = cv2.dnn.readNetFromCaffe(str(outs["sparse"] / "model.prototxt"),
                                     str(outs["sparse"] / "model.caffemodel"))
    got_cv = []
    for i in range(x.shape[0]):
        cvnet.setInput(x[i:i + 1])
        got_cv.append(np.array(cvnet.forward("prob")))
    got_cv = np.concatenate(got_cv)
    sess = ort.InferenceSession(str(sparse), providers=["CPUExecutionProvider"])
    got_ort = np.concatenate([sess.run(["prob"], {"data": x[i:i + 1]})[0] for i in range(x.shape[0])])
    assert np.abs(got_ort - got_cv).max() < 1e-5
    dsess = ort.InferenceSession(str(dense), providers=["CPUExecutionProvider"])
    got_dense = np.concatenate([dsess.run(["prob"], {"data": x[i:i + 1]})[0] for i in range(x.shape[0])])
    assert np.abs(got_ort - got_dense).max() < 1e-6


def test_factorize_then_prune_counts(tmp_path, capsys):
    d, proto, model = lenet()
    out = tmp_path / "o"
    rc, stdout, err = run(capsys, "compress", proto, model, "-o", out, "--speedup", "2", "--prune", "0.7",
                          "--no-verify")
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    fact = [r for r in rep["layers"] if r["action"] == "factorized+pruned"]
    assert fact, rep["layers"]
    new_names = [n for r in fact for n in r["new_layers"]]
    _, blobs = cv_blobs(out, new_names)
    for r in fact:
        assert r["nonzero_params"] == sum(int(np.count_nonzero(b)) for n in r["new_layers"] for b in blobs[n])
    with np.load(out / "masks.npz") as z:
        assert any(k.startswith(new_names[0] + "/") for k in z.files)


def test_prune_only_std_rule(tmp_path, capsys):
    d, proto, model = lenet()
    rc, stdout, err = run(capsys, "compress", proto, model, "-o", tmp_path / "o", "--prune-method", "std",
                          "--quality", "1", "--no-verify", "--json")
    assert rc == 0, err
    rep = json.loads(stdout)
    assert 0.4 < rep["totals"]["sparsity"] < 0.8
    assert rep["prune"]["method"] == "std" and rep["prune"]["quality"] == 1.0


def test_structured_cli_smaller_dense_net(tmp_path, capsys):
    d, proto, model = lenet()
    out = tmp_path / "o"
    rc, stdout, err = run(capsys, "compress", proto, model, "-o", out, "--prune", "conv1=0.5,conv2=0.5,ip1=0.5",
                          "--prune-structured", "--inputs", d / "inputs.npz", "--labels", d / "labels.npz")
    assert rc == 0, err
    assert not (out / "masks.npz").exists()
    rep = json.loads((out / "report.json").read_text())
    assert rep["totals"]["params_after"] < 0.6 * rep["totals"]["params_before"]
    assert rep["totals"]["macs_after"] < 0.6 * rep["totals"]["macs_before"]
    assert "top-1 accuracy" in stdout
    net = cv2.dnn.readNetFromCaffe(str(out / "model.prototxt"), str(out / "model.caffemodel"))
    x = load_npz(d / "inputs.npz")["data"][:1]
    net.setInput(x)
    assert net.forward("prob").shape == (1, 10)


@pytest.mark.parametrize("args, needle", [
    (["--prune", "1.0"], "[0, 1)"),
    (["--prune", "-0.1"], "[0, 1)"),
    (["--prune", "nosuch=0.5"], "nosuch"),
    (["--prune", "0.5", "--sparse"], "--onnx"),
    (["--prune-scope", "global"], "--prune"),
    (["--prune", "0.5", "--prune-exclude", "nosuch"], "nosuch"),
])
def test_bad_prune_requests(tmp_path, capsys, args, needle):
    d, proto, model = lenet()
    out = tmp_path / "o"
    rc, stdout, err = run(capsys, "compress", proto, model, "-o", out, *args)
    assert rc == 2
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err and not out.exists()


def test_structured_unshrinkable_consumer_cli(tmp_path, capsys):
    d = golden_case("resnet_mini")
    out = tmp_path / "o"
    rc, stdout, err = run(capsys, "compress", d / "model.prototxt", d / "model.caffemodel", "-o", out,
                          "--prune", "res2a_c=0.5", "--prune-structured")
    assert rc == 2
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and "res2a_c" in lines[0] and "Eltwise" in lines[0], err
    assert not out.exists()
