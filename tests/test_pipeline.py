"""``pipeline``: the han and lowrank-prune schedules on the real-Caffe LeNet with a few hundred
digits: rounds recorded, masks held (zeros read back by OpenCV's Caffe reader), a factorized
net that OpenCV runs, and bad requests (one line, exit 2, nothing written)."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from conftest import GOLDEN, golden_case, require_shared, run_cli
from lrprune_caffe.errors import UserError
from lrprune_caffe.core.pipeline import parse_steps

SPLIT = GOLDEN.parent / "data" / "mnist5k_split.npz"


def test_parse_steps():
    assert parse_steps(None) == (0.5, 0.7, 0.8, 0.9)
    assert parse_steps(None, 0.75) == (0.5, 0.7, 0.75)
    assert parse_steps("0.3,0.6") == (0.3, 0.6)
    assert parse_steps("0.3,0.6", 0.6) == (0.3, 0.6)
    for bad, target in (("0.6,0.3", None), ("1.0", None), ("x", None), ("", 1.5), ("0.3,0.6", 0.9), ("-0.1", None)):
        with pytest.raises(UserError):
            parse_steps(bad, target)


@pytest.fixture(scope="module")
def lenet():
    d = golden_case("lenet_mnist")
    return str(d / "model.prototxt"), str(d / "model.caffemodel")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    require_shared(SPLIT)
    from lrprune_caffe.data.datasets import load_mnist_split
    train, test = load_mnist_split(SPLIT)
    d = tmp_path_factory.mktemp("digits")
    np.savez(d / "train.npz", x=train.x[:320], y=train.y[:320])
    np.savez(d / "val.npz", x=test.x[:300], y=test.y[:300])
    return str(d / "train.npz"), str(d / "val.npz")


run = run_cli


@pytest.mark.slow
def test_han_rounds_and_masks(lenet, data, tmp_path, capsys):
    pytest.importorskip("torch")
    cv2 = pytest.importorskip("cv2")
    out = tmp_path / "han"
    # tolerance 0: every round must fine-tune (at most 1 epoch here)
    rc, stdout, err = run(capsys, "pipeline", *lenet, "--data", data[0], "--val", data[1], "-o", out,
                          "--schedule", "han", "--prune-steps", "0.5,0.8", "--tolerance", "0", "--max-epochs", 1,
                          "--threads", 2, "--json")
    assert rc == 0, err
    rep = json.loads(stdout)
    drawn = {"rounds.png"} if importlib.util.find_spec("matplotlib") else set()
    assert {p.name for p in out.iterdir()} == {"model.prototxt", "model.caffemodel", "masks.npz", "report.json",
                                               "report.md"} | drawn
    assert [r["step"] for r in rep["rounds"]] == ["prune to 50% per layer", "prune to 80% per layer"]
    for r in rep["rounds"]:
        assert set(r) >= {"round", "step", "params", "nonzero_params", "macs", "top1_after_step", "epochs",
                          "iterations", "top1", "reached"}
        assert r["epochs"] <= 1
        if r["epochs"]:
            assert r["iterations"] == 5  # 320 digits / batch 64
    assert rep["summary"]["rounds"] == 2
    assert rep["summary"]["epochs"] == sum(r["epochs"] for r in rep["rounds"])
    assert 0.78 < rep["final"]["sparsity"] < 0.81
    # the masks hold: every masked weight is zero in the caffemodel as OpenCV reads it
    cvnet = cv2.dnn.readNetFromCaffe(str(out / "model.prototxt"), str(out / "model.caffemodel"))
    with np.load(out / "masks.npz") as z:
        assert sorted(z.files) == ["conv1/0", "conv2/0", "ip1/0", "ip2/0"]
        for key in z.files:
            layer, idx = key.split("/")
            w = np.array(cvnet.getLayer(cvnet.getLayerId(layer)).blobs[int(idx)])
            assert int(np.count_nonzero(w)) <= int(z[key].sum())
            assert (~z[key]).sum() == round(0.8 * z[key].size)


def test_lowrank_prune_schedule(lenet, data, tmp_path, capsys):
    pytest.importorskip("torch")
    cv2 = pytest.importorskip("cv2")
    out = tmp_path / "lrp"
    rc, stdout, err = run(capsys, "pipeline", *lenet, "--data", data[0], "--val", data[1], "-o", out,
                          "--schedule", "lowrank-prune", "--speedup", "2", "--scheme", "spatial",
                          "--prune-steps", "0.5", "--tolerance", "0.02", "--max-epochs", 2, "--quiet")
    assert rc == 0, err
    assert "| 1 | factorize (spatial, 2x MACs)" in stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["schedule"] == "lowrank-prune" and len(rep["rounds"]) == 2
    assert rep["rounds"][0]["macs"] * 1.9 < rep["original"]["macs"]
    assert any(r["action"] == "factorized" for r in rep["factorize"]["layers"])
    with np.load(out / "masks.npz") as z:
        assert any("_lr" in k for k in z.files)
    cvnet = cv2.dnn.readNetFromCaffe(str(out / "model.prototxt"), str(out / "model.caffemodel"))
    with np.load(data[1]) as z:
        x, y = z["x"][:100], z["y"][:100]
    pred = []
    for i in range(len(x)):
        cvnet.setInput(x[i:i + 1])
        pred.append(int(np.argmax(cvnet.forward("prob"))))
    acc = float(np.mean(np.array(pred) == y))
    assert acc > 0.85


def _bad(capsys, argv, out, needle):
    rc, stdout, err = run(capsys, *argv)
    assert rc == 2, err
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err and not out.exists()


def test_bad_requests(lenet, data, tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    out = tmp_path / "o"
    base = ["pipeline", *lenet, "--data", data[0], "-o", out]
    _bad(capsys, base + ["--val", data[1], "--prune-steps", "0.8,0.5"], out, "increase")
    _bad(capsys, base + ["--val", data[1], "--sparsity", "1.2"], out, "--sparsity")
    _bad(capsys, base + ["--val", data[1], "--tolerance", "2"], out, "--tolerance")
    _bad(capsys, base, out, "validation data")
    _bad(capsys, base + ["--val", data[1], "--schedule", "han", "--speedup", "3"], out, "only prunes")
    monkeypatch.setitem(sys.modules, "torch", None)
    _bad(capsys, base + ["--val", data[1]], out, "pip install")
