"""compress --calib (issue 10): unlabeled calibration data fits the compressed LeNet back to the
original's accuracy, the check runs on held-out data, and the quality gate stops a broken net.

Calibration = the first 512 of the split's 4,000 training digits (pixels / 256, labels unused);
top-1 on the golden LeNet's 1,000 held-out digits (real Caffe: 97.3%). No fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import GOLDEN, SHARED, golden_case, lenet_files, load_npz, require_shared, run_cli

SPLIT = SHARED / "data" / "mnist5k_split.npz"


def _split():
    require_shared(SPLIT)
    return SPLIT


def _compress(capsys, tmp_path, *flags, check=True):
    d, proto, model = lenet_files()
    args = ["compress", proto, model, "-o", tmp_path / "out", "--json", *flags]
    if check:
        args += ["--inputs", d / "inputs.npz", "--labels", d / "labels.npz"]
    rc, out, err = run_cli(capsys, *args)
    return rc, (json.loads(out) if out.strip() else None), err


ROWS = [  # (flags, least top-1 with --calib, top-1 without: as before)
    (["--speedup", "3", "--scheme", "channel"], 0.960, 0.887),
    (["--prune", "0.9", "--prune-scope", "global"], 0.965, 0.943),
    (["--prune", "0.95", "--prune-scope", "global"], 0.960, 0.899),
    (["--speedup", "2", "--scheme", "channel", "--prune", "0.8", "--prune-scope", "global"], 0.965, 0.951),
    (["--speedup", "3", "--scheme", "spatial", "--prune", "0.9", "--prune-scope", "global"], 0.955, 0.755),
]


@pytest.mark.slow
@pytest.mark.parametrize("flags,least,_", ROWS)
def test_done_when_rows_with_512_unlabeled_digits(tmp_path, capsys, flags, least, _):
    rc, rep, err = _compress(capsys, tmp_path, *flags, "--calib", _split())
    assert rc == 0, err
    v = rep["verification"]["blobs"]["prob"]
    assert v["top1_ref"] == pytest.approx(0.973)
    assert v["top1_test"] >= least, (flags, v["top1_test"])
    cal = rep["calibration"]
    assert cal["samples"] == 512 and cal["held_out"] == 0  # --inputs given: every sample fits
    assert rep["warnings"] == []


@pytest.mark.parametrize("flags,_,before", [ROWS[0], ROWS[1]])
def test_without_calib_results_are_as_before(tmp_path, capsys, flags, _, before):
    rc, rep, err = _compress(capsys, tmp_path, *flags)
    assert rc == 0, err
    assert rep["verification"]["blobs"]["prob"]["top1_test"] == pytest.approx(before, abs=1e-9)
    assert "calibration" not in rep


def test_held_out_calibration_part_is_the_check_and_sparsegpt(tmp_path, capsys):
    rc, rep, err = _compress(capsys, tmp_path, "--prune", "0.9", "--prune-scope", "global", "--prune-method",
                             "sparsegpt", "--calib", _split(), "--calib-n", "256", check=False)
    assert rc == 0, err
    cal, ver = rep["calibration"], rep["verification"]
    assert cal["samples"] + cal["held_out"] == 256 and cal["held_out"] == 64
    assert ver["batch"] == 64 and "held-out calibration samples" in ver["inputs"] and not ver["weak"]
    assert "SparseGPT" in cal["pruned"]["method"]
    assert ver["blobs"]["prob"]["top1_agreement"] >= 0.95
    assert (tmp_path / "out" / "masks.npz").exists()
    masks = np.load(tmp_path / "out" / "masks.npz")
    assert 0.89 < 1 - np.mean(np.concatenate([m.ravel() for m in masks.values()])) < 0.91


def test_gate_fails_a_broken_net_without_writing_model_files(tmp_path, capsys):
    rc, rep, err = _compress(capsys, tmp_path, "--speedup", "3", "--prune", "0.9", "--prune-scope", "global",
                             "--min-agree", "0.95", "--max-drop", "1")
    assert rc == 1
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    gate = json.loads((out / "report.json").read_text())["gate"]
    assert gate["passed"] is False
    by = {f["measure"]: f for f in gate["failures"]}
    assert by["top1_agreement"]["output"] == "prob" and by["top1_agreement"]["by"] > 0.1
    assert by["top1_drop"]["value"] > 10  # points of top-1 lost
    md = (out / "report.md").read_text()
    assert "Quality gate: FAILED" in md and "output 'prob': top-1 agreement" in md
    assert any("top-1 agreement" in w for w in rep["warnings"])


def test_gate_passes_and_console_says_fail(tmp_path, capsys):
    d, proto, model = lenet_files()
    rc, out, err = run_cli(capsys, "compress", proto, model, "-o", tmp_path / "a", "--rank", "ip1=200",
                           "--max-rel-l2", "0.5", "--inputs", d / "inputs.npz")
    assert rc == 0, err
    assert (tmp_path / "a" / "model.caffemodel").exists()
    rc, out, err = run_cli(capsys, "compress", proto, model, "-o", tmp_path / "b", "--rank", "2",
                           "--max-rel-l2", "0.01", "--inputs", d / "inputs.npz")
    assert rc == 1 and "FAIL: output 'prob': relative L2 error" in err
    assert not (tmp_path / "b" / "model.caffemodel").exists()


def test_weak_check_is_said_and_scaled_to_declared_preprocessing(tmp_path, capsys):
    d, proto, model = lenet_files()
    rc, rep, err = _compress(capsys, tmp_path, "--rank", "ip1=200", check=False)
    assert rc == 0 and rep["verification"]["weak"]
    assert any("check is weak" in w for w in rep["warnings"])
    rc, out, err = run_cli(capsys, "compress", proto, model, "-o", tmp_path / "b", "--rank", "ip1=200",
                           "--train-net", d / "train_test.prototxt", "--json")
    assert rc == 0, err
    ver = json.loads(out)["verification"]
    assert "scale 0.00390625" in ver["inputs"] and ver["weak"]


def test_usage_errors(tmp_path, capsys):
    _, proto, model = lenet_files()
    for flags, expect in [(["--prune", "0.5", "--prune-method", "sparsegpt"], "give --calib"),
                          (["--prune", "0.5", "--max-drop", "1"], "--labels"),
                          (["--prune", "0.5", "--min-agree", "2"], "must be in [0, 1]")]:
        rc, _, err = run_cli(capsys, "compress", proto, model, "-o", tmp_path / "x", *flags)
        assert rc == 2 and expect in err, (flags, err)
        assert not (tmp_path / "x").exists()


def test_calib_from_a_train_val_and_an_lmdb():
    from lrprune_caffe.data.calib import load_calib
    from lrprune_caffe.data.datasets import Preprocess
    d = require_shared(GOLDEN / "lenet_lmdb" / "train_val.prototxt", "golden case lenet_lmdb").parent
    ref = load_npz(d / "data.npz")["data"]  # real Caffe's Data layer: (pixel - mean) * scale
    c = load_calib(d / "train_val.prototxt", ["data"], (1, 1, 28, 28), n=50)
    np.testing.assert_array_equal(c.arrays["data"], ref)
    raw = load_calib(d / "digits_lmdb", ["data"], (1, 1, 28, 28), n=50, pre=Preprocess(scale=0.00390625))
    assert raw.arrays["data"].shape == (50, 1, 28, 28) and raw.arrays["data"].max() < 1


def test_calib_from_an_image_folder_and_a_split(tmp_path):
    from PIL import Image
    from lrprune_caffe.data.calib import load_calib
    from lrprune_caffe.data.datasets import Preprocess
    split = load_calib(_split(), ["data"], (1, 1, 28, 28), n=7)
    x = split.arrays["data"]
    assert x.shape == (7, 1, 28, 28) and x.max() < 1
    folder = tmp_path / "digits"
    (folder / "b").mkdir(parents=True)
    for i, img in enumerate(np.round(x[:5, 0] * 256).astype(np.uint8)):  # flat files and a subfolder
        Image.fromarray(img).save(folder / ("b" if i >= 3 else "") / f"{i:02d}.png")
    imgs = load_calib(folder, ["data"], (1, 1, 28, 28), n=512, pre=Preprocess(scale=0.00390625))
    np.testing.assert_allclose(imgs.arrays["data"], x[[0, 1, 2, 3, 4]], atol=1e-7)
    assert "fewer than --calib-n 512" in imgs.notes[0]


def test_negligible_layers_are_left_alone(tmp_path, capsys):
    rc, rep, err = _compress(capsys, tmp_path, "--speedup", "2", check=False)
    assert rc == 0, err
    ip2 = next(r for r in rep["layers"] if r["name"] == "ip2")
    assert ip2["action"] == "kept" and "under 1%" in ip2["reason"]


@pytest.mark.parametrize("case", ["lenet_mnist", "alexnet_mini", "mobilenet_mini"])
def test_onnxruntime_layer_runner_matches_the_numpy_forward(case):
    from lrprune_caffe.core.calib import ort_runner
    from lrprune_caffe.io.caffe import load_net
    from lrprune_caffe.transforms.forward import run_layer
    d = golden_case(case)
    net = load_net(str(d / "model.prototxt"), str(d / "model.caffemodel"))
    a = load_npz(d / "inputs.npz")
    a = {k: np.concatenate([v] * (-(-11 // len(v))))[:11] for k, v in a.items()}  # 11: three ORT_BATCH calls
    b, run = dict(a), ort_runner()
    for layer in net.layers[1:]:
        for t, u, v in zip(layer.tops, run_layer(layer, [a[x] for x in layer.bottoms]),
                           run(layer, [b[x] for x in layer.bottoms])):
            a[t], b[t] = u, v
            np.testing.assert_allclose(v, u, atol=1e-5 * max(1.0, float(np.abs(u).max())), err_msg=layer.name)


def test_check_hands_onnxruntime_the_weights_from_memory_with_the_files_outputs():
    """compress's check runs the nets with their weights passed as external initializers (no 0.5 GB
    protobuf per VGG-sized net); the outputs are those of the whole exported model."""
    from lrprune_caffe.engines.runtime import ort_session, run_onnxruntime
    from lrprune_caffe.export.onnx import EXTERNAL_LOCATION, InMemoryWeights, export_model
    from lrprune_caffe.io.caffe import load_net
    d, proto, model = lenet_files()
    net = load_net(proto, model)
    x = load_npz(d / "inputs.npz")
    external = InMemoryWeights()
    placeholder = export_model(net, external=external)
    ext = [t for t in placeholder.graph.initializer if t.external_data]
    assert ext and all(not t.raw_data and t.external_data[0].value == EXTERNAL_LOCATION for t in ext)
    assert {t.name for t in ext} == set(external)
    whole = ort_session(export_model(net, dynamic_batch=True).SerializeToString(), 1).run(["prob"], x)[0]
    np.testing.assert_array_equal(run_onnxruntime(net, x, ["prob"], threads=1)["prob"], whole)
