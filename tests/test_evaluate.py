"""evaluate: accuracy by a real engine, data loading (npz, MNIST split, image folders), bad input."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import GOLDEN, ROOT, golden_case, load_npz, require_shared

from lrprune_caffe.io.caffe import load_net
from lrprune_caffe.cli.main import main
from lrprune_caffe.data.datasets import Preprocess, load_image_folder, load_mnist_split, load_npz_data
from lrprune_caffe.errors import BadFileError, UserError
from lrprune_caffe.engines.evaluate import evaluate, resolve_scores

SPLIT = GOLDEN.parent / "data" / "mnist5k_split.npz"


@pytest.fixture(scope="module")
def lenet():
    d = golden_case("lenet_mnist")
    return d / "model.prototxt", d / "model.caffemodel"


@pytest.fixture(scope="module")
def split():
    require_shared(SPLIT)
    return load_mnist_split(SPLIT)


def run_cli(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_mnist_split_is_the_golden_input(split):
    d = golden_case("lenet_mnist")
    train, test = split
    assert train.x.shape == (4000, 1, 28, 28) and train.x.dtype == np.float32 and train.y.dtype == np.int64
    np.testing.assert_array_equal(test.x, load_npz(d / "inputs.npz")["data"])
    np.testing.assert_array_equal(test.y, load_npz(d / "labels.npz")["labels"])


@pytest.mark.parametrize("engine", ["onnxruntime", "opencv"])
def test_lenet_accuracy_is_real_caffes(lenet, split, engine):
    if engine == "opencv":
        pytest.importorskip("cv2")
    net = load_net(*lenet)
    res = evaluate(net, split[1], engine=engine, batch_size=256)
    assert res["n"] == 1000 and res["classes"] == 10 and res["output"] == "prob"
    assert res["top1"] == pytest.approx(0.973)  # what real Caffe measured (golden README)
    assert res["correct_top1"] == 973 and "top5" in res and res["top5"] >= res["top1"]
    # the logits rank classes as the Softmax does
    res2 = evaluate(net, split[1], output="ip2", engine=engine, batch_size=100)
    assert res2["correct_top1"] == 973 and res2["output"] == "ip2"


def test_falls_back_to_opencv_without_onnx_export(lenet, split, monkeypatch):
    pytest.importorskip("cv2")
    monkeypatch.setitem(sys.modules, "lrprune_caffe.export.onnx", None)
    res = evaluate(load_net(*lenet), split[1].subset(slice(0, 300)))
    assert res["engine"] == "opencv" and "ONNX export not available" in res["notes"][0]


TINY = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 3 } }
"""


def test_few_classes_have_no_top5_and_counts_are_exact():
    from google.protobuf import text_format
    from lrprune_caffe.ir.analysis import validate
    from lrprune_caffe.ir.net import Layer, Net
    from lrprune_caffe.schema.proto import pb
    msg = text_format.Parse(TINY, pb.NetParameter())
    net = Net(name="tiny", layers=[Layer.from_proto(lp) for lp in msg.layer])
    rng = np.random.default_rng(0)
    net.layer("fc").blobs = [rng.standard_normal((3, 4)).astype(np.float32),
                             rng.standard_normal(3).astype(np.float32)]
    validate(net)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    layer = net.layer("fc")
    pred = np.argmax(x @ layer.blobs[0].T + layer.blobs[1], axis=1)
    res = evaluate(net, (x, y), batch_size=7)
    assert "top5" not in res and res["classes"] == 3
    assert res["correct_top1"] == int(np.sum(pred == y))


def test_score_blob_resolution():
    d = golden_case("mobilenet_mini")
    sb = resolve_scores(load_net(d / "model.prototxt"))
    assert (sb.blob, sb.logits, sb.classes, sb.softmax) == ("prob", "fc7", 10, True)  # N x 10 x 1 x 1
    z = golden_case("layer_zoo")
    zoo = load_net(z / "model.prototxt")
    with pytest.raises(UserError, match=r"'sm' has shape \(1, 3, 4\)"):
        resolve_scores(zoo)
    assert resolve_scores(zoo, "fc").classes == 12
    with pytest.raises(UserError, match="no layer produces blob 'nope'"):
        resolve_scores(zoo, "nope")


# ---- image folders -----------------------------------------------------------

def _write_digit_folder(root, x, y):
    Image = pytest.importorskip("PIL.Image")
    for i, (img, label) in enumerate(zip(x, y)):
        d = root / f"class_{label}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:04d}.png")
    (root / "class_0" / "notes.txt").write_text("not an image")


def test_image_folder_matches_npz(lenet, tmp_path, capsys):
    """The same digits as PNGs, read with --gray --scale 1/256, score as the npz does."""
    require_shared(SPLIT)
    with np.load(SPLIT) as z:
        x, y = z["x_test"][:60], z["y_test"][:60].astype(np.int64)
    order = np.argsort(y, kind="stable")
    x, y = x[order], y[order]
    _write_digit_folder(tmp_path / "imgs", x, y)
    ds = load_image_folder(tmp_path / "imgs", (1, 1, 28, 28), Preprocess(scale=1 / 256, gray=True))
    assert ds.classes == [f"class_{c}" for c in range(10)]
    np.testing.assert_array_equal(ds.y, y)  # sorted class folders give labels 0..9
    np.testing.assert_array_equal(ds.x, x[:, None].astype(np.float32) / 256)
    np.savez(tmp_path / "d.npz", x=x[:, None].astype(np.float32) / 256, y=y)
    rc, out_a, err = run_cli(["evaluate", *lenet, "--data", tmp_path / "imgs", "--gray", "--scale", "0.00390625",
                              "--json"], capsys)
    assert rc == 0, err
    rc, out_b, err = run_cli(["evaluate", *lenet, "--data", tmp_path / "d.npz", "--json"], capsys)
    assert rc == 0, err
    a, b = json.loads(out_a), json.loads(out_b)
    assert a["n"] == b["n"] == 60 and a["correct_top1"] == b["correct_top1"] and a["top1"] > 0.9


def test_caffe_style_preprocessing(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)  # H=10, W=12
    (tmp_path / "a").mkdir()
    Image.fromarray(rgb).save(tmp_path / "a" / "img.png")
    ds = load_image_folder(tmp_path, (1, 3, 8, 8), Preprocess(mean=(104, 117, 123), scale=0.017, bgr=True))
    crop = rgb[1:9, 2:10].astype(np.float32)  # center crop 8x8
    expected = (crop[:, :, ::-1].transpose(2, 0, 1) - np.array([104, 117, 123], np.float32)[:, None, None]) * np.float32(0.017)
    np.testing.assert_allclose(ds.x[0], expected, rtol=1e-6, atol=1e-5)
    ds = load_image_folder(tmp_path, (1, 3, 8, 8), Preprocess(bgr=False))
    np.testing.assert_array_equal(ds.x[0], crop.transpose(2, 0, 1))
    assert ds.notes and "center-cropped without resizing" in ds.notes[0]  # a 12x10 image for an 8x8 input
    ds = load_image_folder(tmp_path, (1, 3, 5, 5), Preprocess(resize=5, bgr=False))  # short side 10 -> 5
    assert ds.x.shape == (1, 3, 5, 5) and not ds.notes
    with pytest.raises(BadFileError, match="smaller than the net input"):
        load_image_folder(tmp_path, (1, 3, 16, 16))


def test_missing_pillow_is_one_clear_error(lenet, tmp_path, capsys, monkeypatch):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "x.png").write_bytes(b"\x89PNG")
    monkeypatch.setitem(sys.modules, "PIL", None)
    rc, out, err = run_cli(["evaluate", *lenet, "--data", tmp_path / "imgs"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "needs Pillow" in err and "pip install" in err


# ---- bad input through the CLI ------------------------------------------------

def _bad(argv, capsys, match):
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrprune-caffe: error:") and match in lines[0], err
    return lines[0]


def test_cli_bad_data(lenet, tmp_path, capsys):
    np.savez(tmp_path / "shape.npz", x=np.zeros((3, 3, 28, 28), np.float32), y=np.zeros(3, int))
    line = _bad(["evaluate", *lenet, "--data", tmp_path / "shape.npz"], capsys, "(3, 28, 28)")
    assert "shape.npz" in line and "'data' takes (1, 28, 28)" in line
    np.savez(tmp_path / "labels.npz", x=np.zeros((3, 1, 28, 28), np.float32), y=np.array([0, -1, 12]))
    line = _bad(["evaluate", *lenet, "--data", tmp_path / "labels.npz"], capsys, "2 label(s) out of range")
    assert "0..9" in line
    np.savez(tmp_path / "keys.npz", data=np.zeros((3, 1, 28, 28), np.float32))
    _bad(["evaluate", *lenet, "--data", tmp_path / "keys.npz"], capsys, "expected arrays 'x' and 'y'")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    _bad(["evaluate", *lenet, "--data", tmp_path / "junk.npz"], capsys, "is not an .npz archive")
    _bad(["evaluate", *lenet, "--data", tmp_path / "none.npz"], capsys, "not found")
    np.savez(tmp_path / "ok.npz", x=np.zeros((3, 1, 28, 28), np.float32), y=np.zeros(3, int))
    _bad(["evaluate", *lenet, "--data", tmp_path / "ok.npz", "--mean", "1,2"], capsys, "apply to image folders")
    _bad(["evaluate", *lenet], capsys, "exactly one of --data")


def test_cli_human_output(lenet, capsys):
    require_shared(SPLIT)
    rc, out, err = run_cli(["evaluate", *lenet, "--data-split", SPLIT], capsys)
    assert rc == 0, err
    assert out.splitlines()[0] == "top-1 0.9730 (973/1000)   top-5 0.9990 (999/1000)"


def test_shipped_example_is_trained():
    """examples/lenet: the project's own trained LeNet on its held-out digits (>= 97%)."""
    ex = ROOT / "examples" / "lenet"
    if not (ex / "digits_test.npz").exists():
        pytest.skip("examples/lenet/digits_test.npz not generated (run examples/lenet/train_lenet.py)")
    net = load_net(ex / "lenet.prototxt", ex / "lenet.caffemodel")
    ds = load_npz_data(ex / "digits_test.npz")
    assert ds.x.shape == (1000, 1, 28, 28)
    assert evaluate(net, ds)["top1"] >= 0.97
