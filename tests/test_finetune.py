"""finetune: Caffe's solver math, masks held at zero, outputs OpenCV loads, bad input."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from conftest import GOLDEN, golden_case, require_shared

torch = pytest.importorskip("torch")

from lrprune_caffe.io.caffe import load_net  # noqa: E402
from lrprune_caffe.cli.main import main  # noqa: E402
from lrprune_caffe.data.datasets import load_mnist_split  # noqa: E402
from lrprune_caffe.errors import BadFileError, UserError  # noqa: E402
from lrprune_caffe.train import SolverSettings, finetune, read_solver  # noqa: E402
from lrprune_caffe.train.solver import CaffeOptimizer  # noqa: E402
from lrprune_caffe.train.torch_model import run_torch  # noqa: E402

SPLIT = GOLDEN.parent / "data" / "mnist5k_split.npz"

LENET_SOLVER = """
# Caffe's examples/mnist/lenet_solver.prototxt
net: "examples/mnist/lenet_train_test.prototxt"
test_iter: 100
test_interval: 500
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.0001
power: 0.75
display: 100
max_iter: 10000
snapshot: 5000
snapshot_prefix: "examples/mnist/lenet"
solver_mode: CPU
"""


@pytest.fixture(scope="module")
def lenet():
    d = golden_case("lenet_mnist")
    return d / "model.prototxt", d / "model.caffemodel"


@pytest.fixture(scope="module")
def digits():
    require_shared(SPLIT)
    train, test = load_mnist_split(SPLIT)
    return train.subset(slice(0, 256)), test.subset(slice(0, 200))


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


# ---- solver -----------------------------------------------------------------------

def test_read_caffe_solver(tmp_path):
    p = tmp_path / "solver.prototxt"
    p.write_text(LENET_SOLVER)
    s = read_solver(p)
    assert (s.base_lr, s.momentum, s.weight_decay, s.lr_policy, s.max_iter, s.type) == \
        (0.01, pytest.approx(0.9), pytest.approx(0.0005), "inv", 10000, "SGD")
    assert s.gamma == pytest.approx(1e-4) and s.power == pytest.approx(0.75)
    assert any("'net'" in n for n in s.notes)
    # Caffe's inv policy: base_lr * (1 + gamma * iter) ^ -power
    assert s.lr_at(5000) == pytest.approx(0.01 * (1 + 1e-4 * 5000) ** -0.75)


@pytest.mark.parametrize("policy,kw,it,expected", [
    ("fixed", {}, 123, 0.1),
    ("step", {"gamma": 0.5, "stepsize": 10}, 25, 0.1 * 0.25),
    ("exp", {"gamma": 0.9}, 3, 0.1 * 0.9 ** 3),
    ("inv", {"gamma": 0.01, "power": 0.5}, 100, 0.1 * 2 ** -0.5),
    ("multistep", {"gamma": 0.1, "stepvalue": (10, 20)}, 20, 0.1 * 0.01),
    ("multistep", {"gamma": 0.1, "stepvalue": (10, 20)}, 19, 0.1 * 0.1),
    ("poly", {"power": 2, "max_iter": 100}, 50, 0.1 * 0.25),
    ("sigmoid", {"gamma": 0.1, "stepsize": 10}, 10, 0.05),
])
def test_lr_policies(policy, kw, it, expected):
    s = SolverSettings(base_lr=0.1, lr_policy=policy, **kw)
    assert s.lr_at(it) == pytest.approx(expected)


def test_bad_solver_files(tmp_path):
    p = tmp_path / "s.prototxt"
    p.write_text('base_lr: 0.1 lr_policy: "cosine"')
    with pytest.raises(BadFileError, match="lr_policy 'cosine'"):
        read_solver(p)
    p.write_text("base_lr: 0.1 max_iter: {")
    with pytest.raises(BadFileError, match="not a valid solver"):
        read_solver(p)
    p.write_text('base_lr: 0.1 type: "AdaDelta"')
    with pytest.raises(BadFileError, match="AdaDelta"):
        read_solver(p)


def test_caffe_sgd_update_math():
    """Caffe scales the momentum history by the rate (not torch.optim.SGD's rule); lr/decay mults."""
    w0 = np.array([1.0, -2.0, 0.5], np.float32)
    grads = [np.array([0.1, 0.2, -0.3], np.float32), np.array([-0.4, 0.0, 0.2], np.float32),
             np.array([0.3, 0.1, 0.1], np.float32)]
    s = SolverSettings(base_lr=0.1, momentum=0.9, weight_decay=0.01, lr_policy="step", gamma=0.5, stepsize=1)
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = CaffeOptimizer([(p, 2.0, 3.0)], s)
    w, v = w0.astype(np.float64), np.zeros(3)
    for it, g in enumerate(grads):
        p.grad = torch.from_numpy(g.copy())
        opt.step(it)
        rate = 0.1 * 0.5 ** it * 2.0
        v = 0.9 * v + rate * (g + 0.01 * 3.0 * w)
        w = w - v
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-6, atol=1e-7)
    frozen = torch.nn.Parameter(torch.ones(2))
    opt = CaffeOptimizer([(frozen, 0.0, 1.0)], s)
    frozen.grad = torch.ones(2)
    opt.step(0)
    assert torch.equal(frozen.detach(), torch.ones(2))



def test_clip_gradients_bounds_the_global_norm():
    """Caffe's clip_gradients: all blobs' gradients scaled together to a global L2 norm of N when above it
    (before weight decay); below it they are untouched."""
    s = SolverSettings(base_lr=1.0, momentum=0.0, weight_decay=0.0, clip_gradients=10.0)
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    opt = CaffeOptimizer([(a, 1.0, 1.0), (b, 1.0, 1.0)], s)
    a.grad, b.grad = torch.tensor([30.0, 0.0]), torch.tensor([40.0])  # global norm 50 -> scaled by 10 / 50
    opt.step(0)
    np.testing.assert_allclose(a.detach().numpy(), [-6.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(b.detach().numpy(), [-8.0], rtol=1e-6)
    step = math.sqrt(float((a.detach() ** 2).sum() + (b.detach() ** 2).sum()))
    assert step == pytest.approx(10.0)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # norm 5 <= 10: as is
    opt.step(1)
    np.testing.assert_allclose(a.detach().numpy(), [-9.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(b.detach().numpy(), [-12.0], rtol=1e-6)

def test_adam_and_nesterov_follow_caffe():
    g = np.array([0.5, -1.0], np.float32)
    w0 = np.array([1.0, 1.0], np.float32)
    s = SolverSettings(base_lr=0.01, momentum=0.9, momentum2=0.999, weight_decay=0, type="Adam")
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = CaffeOptimizer([(p, 1.0, 1.0)], s)
    p.grad = torch.from_numpy(g.copy())
    opt.step(0)
    m, v = 0.1 * g, 0.001 * g * g
    expected = w0 - 0.01 * math.sqrt(1 - 0.999) / (1 - 0.9) * m / (np.sqrt(v) + 1e-8)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-5)
    s = SolverSettings(base_lr=0.1, momentum=0.9, weight_decay=0, type="Nesterov")
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = CaffeOptimizer([(p, 1.0, 1.0)], s)
    for it in range(2):
        p.grad = torch.from_numpy(g.copy())
        opt.step(it)
    v1 = 0.1 * g
    v2 = 0.9 * v1 + 0.1 * g
    expected = w0 - 1.9 * v1 - (1.9 * v2 - 0.9 * v1)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-5)


# ---- finetune API ---------------------------------------------------------------

@pytest.mark.slow
def test_finetune_lenet_and_opencv_reads_it(lenet, digits, tmp_path):
    cv2 = pytest.importorskip("cv2")
    from lrprune_caffe.api import write_net
    net = load_net(*lenet)
    before = [b.copy() for layer in net.layers for b in layer.blobs]
    train, val = digits
    trained, hist = finetune(net, train, val, solver=SolverSettings(base_lr=0.005), epochs=2, batch_size=64)
    # the input net is untouched, the trained one changed
    assert all(np.array_equal(a, b) for a, b in zip(before, (b for layer in net.layers for b in layer.blobs)))
    assert any(not np.array_equal(a, b) for a, b in zip(before, (b for x in trained.layers for b in x.blobs)))
    assert hist["iterations"] == 8 and len(hist["epochs"]) == 2
    assert hist["loss_blob"] == "ip2" and hist["score_blob"] == "prob"
    assert hist["preflight"]["engine"] in ("opencv", "onnxruntime")
    assert hist["preflight"]["max_rel_err"] < 1e-4
    assert 0.9 < hist["epochs"][-1]["val_top1"] <= 1.0
    assert all(b.dtype == np.float32 for x in trained.layers for b in x.blobs)
    # the written files, read by OpenCV's Caffe reader, compute what the torch model computes
    written = write_net(trained, tmp_path / "out")
    cv = cv2.dnn.readNetFromCaffe(written["prototxt"], written["caffemodel"])
    cv.setInput(val.x[:16], "data")
    ref = np.asarray(cv.forward("prob"))
    ours = run_torch(trained, {"data": val.x[:16]})["prob"]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.slow
def test_masks_stay_exactly_zero(lenet, digits):
    net = load_net(*lenet)
    rng = np.random.default_rng(0)
    masks = {"ip1/0": rng.random(net.layer("ip1").blobs[0].shape) > 0.7,
             "conv2/0": rng.random(net.layer("conv2").blobs[0].shape) > 0.5}
    train, _ = digits
    s = SolverSettings(base_lr=0.02, momentum=0.9, weight_decay=0.01)
    trained, hist = finetune(net, train, masks=masks, solver=s, epochs=2, batch_size=32)
    for key, m in masks.items():
        layer, idx = key.split("/")
        w = trained.layer(layer).blobs[int(idx)]
        assert np.all(w.view(np.uint32)[~m] == 0), key  # +0.0 exactly, not -0.0, not tiny
        old = net.layer(layer).blobs[int(idx)]
        assert np.mean(w[m] != old[m]) > 0.9, key  # the kept weights did train
    assert hist["masks"] == {"blobs": 2, "masked": int(sum((~m).sum() for m in masks.values()))}


def test_lr_mult_zero_freezes_a_blob(lenet, digits):
    from lrprune_caffe.schema.proto import pb
    net = load_net(*lenet)
    conv1 = net.layer("conv1")
    del conv1.msg.param[:]
    conv1.msg.param.add().CopyFrom(pb.ParamSpec(lr_mult=0))
    conv1.msg.param.add().CopyFrom(pb.ParamSpec(lr_mult=2, decay_mult=0))
    trained, _ = finetune(net, digits[0], solver=SolverSettings(base_lr=0.01), epochs=1, check=False)
    assert np.array_equal(trained.layer("conv1").blobs[0], conv1.blobs[0])
    assert not np.array_equal(trained.layer("conv1").blobs[1], conv1.blobs[1])


@pytest.mark.slow
def test_max_iter_overrides_epochs_and_runs_repeat(lenet, digits):
    net = load_net(*lenet)
    s = SolverSettings(base_lr=0.01, max_iter=5)
    a, ha = finetune(net, digits[0], solver=s, epochs=3, batch_size=100, seed=7, check=False)
    b, hb = finetune(net, digits[0], solver=s, epochs=3, batch_size=100, seed=7, check=False)
    assert ha["iterations"] == 5 and [e["iterations"] for e in ha["epochs"]] == [3, 5]
    for x, y in zip(a.layers, b.layers):
        assert all(np.array_equal(p, q) for p, q in zip(x.blobs, y.blobs))


def test_divergence_is_reported(lenet, digits):
    net = load_net(*lenet)
    with pytest.raises(UserError, match="diverged"):
        finetune(net, digits[0], solver=SolverSettings(base_lr=1e12, max_iter=20), check=False)


def test_trains_a_net_with_batchnorm_dropout_and_a_conv_classifier():
    """mobilenet_mini: BatchNorm (frozen statistics), Scale, grouped convs, 1x1-conv classifier."""
    d = golden_case("mobilenet_mini")
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3, 64, 64)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    trained, hist = finetune(net, (x, y), solver=SolverSettings(base_lr=0.01), epochs=2, batch_size=8)
    assert hist["loss_blob"] == "fc7" and hist["preflight"]["max_rel_err"] < 1e-4
    bn = [(a.blobs, b.blobs) for a, b in zip(net.layers, trained.layers) if a.type == "BatchNorm"]
    assert bn and all(np.array_equal(p, q) for pa, pb_ in bn for p, q in zip(pa, pb_))


# ---- CLI -----------------------------------------------------------------------

def run_cli(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.slow
def test_cli_finetune_writes_model_history_and_masks(lenet, digits, tmp_path, capsys):
    train, val = digits
    tr = save_npz(tmp_path / "train.npz", x=train.x, y=train.y)
    va = save_npz(tmp_path / "val.npz", x=val.x, y=val.y)
    net = load_net(*lenet)
    mk = save_npz(tmp_path / "masks.npz", **{"ip1/0": np.abs(net.layer("ip1").blobs[0]) > 0.02})
    solver = tmp_path / "solver.prototxt"
    solver.write_text(LENET_SOLVER)
    out = tmp_path / "ft"
    rc, stdout, err = run_cli(["finetune", *lenet, "--data", tr, "--val", va, "-o", out, "--masks", mk,
                               "--solver", solver, "--max-iter", 6, "--lr", 0.002, "--json"], capsys)
    assert rc == 0, err
    res = json.loads(stdout)
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "masks.npz", "model.caffemodel",
                                                     "model.prototxt"]
    hist = json.loads((out / "history.json").read_text())
    assert hist["iterations"] == 6 and hist["solver"]["base_lr"] == 0.002
    assert hist["solver"]["lr_policy"] == "inv" and res["history"]["final_eval"]["top1"] > 0.9
    back = load_net(out / "model.prototxt", out / "model.caffemodel")
    m = np.load(out / "masks.npz")["ip1/0"]
    assert np.all(back.layer("ip1").blobs[0][~m] == 0)


def _bad(argv, capsys, outdir, match):
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrprune-caffe: error:"), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]
    assert not outdir.exists(), "nothing may be written on error"
    return lines[0]


def test_cli_bad_inputs(lenet, digits, tmp_path, capsys):
    train, _ = digits
    out = tmp_path / "out"
    wrong_shape = save_npz(tmp_path / "shape.npz", x=np.zeros((4, 1, 32, 32), np.float32), y=np.zeros(4, int))
    line = _bad(["finetune", *lenet, "--data", wrong_shape, "-o", out], capsys, out, "(1, 32, 32)")
    assert "shape.npz" in line and "(1, 28, 28)" in line
    labels = save_npz(tmp_path / "labels.npz", x=train.x[:4], y=np.array([0, 3, 10, 2]))
    line = _bad(["finetune", *lenet, "--data", labels, "-o", out], capsys, out, "out of range")
    assert "labels.npz" in line and "0..9" in line
    good = save_npz(tmp_path / "good.npz", x=train.x[:8], y=train.y[:8])
    other = save_npz(tmp_path / "other.npz", **{"fc6/0": np.ones((4, 4), bool)})
    line = _bad(["finetune", *lenet, "--data", good, "-o", out, "--masks", other], capsys, out, "another net")
    assert "other.npz" in line and "fc6/0" in line
    shape = save_npz(tmp_path / "mshape.npz", **{"ip1/0": np.ones((500, 10), bool)})
    _bad(["finetune", *lenet, "--data", good, "-o", out, "--masks", shape], capsys, out, "another net")
    uint8 = save_npz(tmp_path / "u8.npz", x=np.zeros((2, 1, 28, 28), np.uint8), y=np.zeros(2, int))
    _bad(["finetune", *lenet, "--data", uint8, "-o", out], capsys, out, "expected float32")
    bad_solver = tmp_path / "s.prototxt"
    bad_solver.write_text('base_lr: 0.1 lr_policy: "warmup"')
    _bad(["finetune", *lenet, "--data", good, "-o", out, "--solver", bad_solver], capsys, out, "lr_policy")


def test_cli_without_torch_says_how_to_install(lenet, digits, tmp_path, capsys, monkeypatch):
    train, _ = digits
    good = save_npz(tmp_path / "good.npz", x=train.x[:8], y=train.y[:8])
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" now raises ImportError
    out = tmp_path / "out"
    line = _bad(["finetune", *lenet, "--data", good, "-o", out], capsys, out, "pip install")
    assert "PyTorch" in line and "lrprune-caffe[train]" in line


def test_masks_from_prune_tuple_keys(lenet, digits):
    """prune.load_masks gives {(layer, idx): mask}; finetune takes those as they are."""
    net = load_net(*lenet)
    m = np.abs(net.layer("ip2").blobs[0]) > 0.05
    trained, hist = finetune(net, digits[0], masks={("ip2", 0): m}, solver=SolverSettings(base_lr=0.01),
                             check=False)
    assert np.all(trained.layer("ip2").blobs[0][~m] == 0) and hist["masks"]["blobs"] == 1
