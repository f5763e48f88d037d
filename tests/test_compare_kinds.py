"""Every output compared by its kind (engines/compare.py), in verify and compress, and verify on
MODEL.onnx: class scores (Softmax) by top-1 / top-5 / KL, DetectionOutput lists by matched
detections, box regressions and the rest by rel L2 / max abs / SNR.

References: scipy's entropy for KL, OpenCV's Caffe reader on the Caffe files and onnxruntime on the
ONNX file (verify --engine opencv puts them side by side), real Caffe's ssd_mini detections.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import golden_case, lenet_files, load_npz, run_cli

from lrprune_caffe.api import verify_paths
from lrprune_caffe.engines.compare import compare_outputs, describe, output_kinds
from lrprune_caffe.io.caffe import load_net, save_net

# an MTCNN-like head: class scores (Softmax over 2) and a 4-value box regression
MTCNN_LIKE = '''name: "pnet_like"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 12 } } }
layer { name: "fc1" type: "InnerProduct" bottom: "data" top: "fc1" inner_product_param { num_output: 16 } }
layer { name: "relu1" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "cls" type: "InnerProduct" bottom: "fc1" top: "cls" inner_product_param { num_output: 2 } }
layer { name: "prob" type: "Softmax" bottom: "cls" top: "prob" }
layer { name: "bbox" type: "InnerProduct" bottom: "fc1" top: "bbox" inner_product_param { num_output: 4 } }
'''


def mtcnn_like(tmp_path, seed=0, noise=0.0):
    (tmp_path / "m.prototxt").write_text(MTCNN_LIKE)
    net = load_net(tmp_path / "m.prototxt")
    rng = np.random.default_rng(seed)
    sizes = {"fc1": (16, 12), "cls": (2, 16), "bbox": (4, 16)}
    noise_rng = np.random.default_rng(seed + 1)
    for layer in net.layers:
        if layer.name in sizes:
            w = rng.standard_normal(sizes[layer.name]).astype(np.float32) * 0.5
            w += noise * noise_rng.standard_normal(w.shape).astype(np.float32)
            layer.blobs = [w, rng.normal(0, 0.1, sizes[layer.name][0]).astype(np.float32)]
    proto, model = tmp_path / f"m{noise}.prototxt", tmp_path / f"m{noise}.caffemodel"
    save_net(net, proto, model)
    return load_net(proto, model), str(proto), str(model)


def softmax(z, axis=1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_kinds_by_producing_layer(tmp_path):
    net, _, _ = mtcnn_like(tmp_path)
    assert output_kinds(net) == {"prob": "class_scores", "bbox": "tensor"}


def test_box_regression_gets_no_top1_and_few_samples_are_counted(tmp_path):
    pytest.importorskip("cv2")
    _, p1, w1 = mtcnn_like(tmp_path)
    _, p2, w2 = mtcnn_like(tmp_path, noise=0.2)
    x = np.random.default_rng(3).standard_normal((8, 12)).astype(np.float32)
    np.savez(tmp_path / "x.npz", data=x)
    res = verify_paths([p1, w1, p2, w2], engine="opencv", inputs=str(tmp_path / "x.npz"))
    assert res["kinds"] == {"prob": "class_scores", "bbox": "tensor"}
    bbox, prob = res["blobs"]["bbox"], res["blobs"]["prob"]
    assert bbox["top1_agreement"] is None and bbox["rel_l2"] > 0 and "samples" not in bbox
    assert prob["samples"] == 8 and prob["few_samples"] and prob["top1_agreement"] is not None
    assert prob["top5_agreement"] is None  # 2 classes
    assert "over only 8 samples" in describe("prob", prob)
    assert res["min_top1_agreement"] == prob["top1_agreement"]


def test_class_scores_by_values_top5_and_kl():
    from scipy.stats import entropy
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((150, 10))
    ref = softmax(logits)
    test = softmax(logits + 0.5 * rng.standard_normal(logits.shape))
    res = compare_outputs({"p": ref, "box": logits[:, :4]}, {"p": test, "box": logits[:, :4] + 0.1})
    p, box = res["blobs"]["p"], res["blobs"]["box"]
    assert p["kind"] == "class_scores" and box["kind"] == "tensor" and box["top1_agreement"] is None
    assert p["samples"] == 150 and not p["few_samples"]
    assert p["kl"] == pytest.approx(np.mean([entropy(a, b) for a, b in zip(ref, test)]), rel=1e-9)
    top5 = np.argsort(-test, axis=1)[:, :5]
    assert p["top5_agreement"] == pytest.approx(np.mean([r in t for r, t in zip(ref.argmax(1), top5)]))
    assert p["top1_agreement"] == pytest.approx(np.mean(ref.argmax(1) == test.argmax(1)))


def test_detection_list_is_matched_never_an_l2():
    ref = np.zeros((1, 1, 3, 7))
    ref[0, 0, 0] = [0, 1, 0.9, 0.1, 0.1, 0.4, 0.4]
    ref[0, 0, 1] = [0, 2, 0.8, 0.5, 0.5, 0.9, 0.9]
    test = np.zeros((1, 1, 2, 7))  # another length and order: one box found, moved a little
    test[0, 0, 0] = [0, 1, 0.85, 0.11, 0.1, 0.4, 0.41]
    res = compare_outputs({"det": ref}, {"det": test})
    assert "det" not in res["blobs"] and res["kinds"] == {"det": "detections"}
    d = res["detections"]["det"]
    assert (d["ref"], d["test"], d["matched"]) == (2, 1, 1)
    assert d["recall"] == 0.5 and d["precision"] == 1.0 and d["max_score_change"] == pytest.approx(0.05)
    assert "rel_l2" not in d and res["min_recall"] == 0.5 and res["worst_rel_l2"] is None


def test_verify_lenet_caffe_vs_onnx(tmp_path, capsys):
    pytest.importorskip("cv2")
    pytest.importorskip("onnxruntime")
    d, proto, model = lenet_files()
    x = load_npz(d / "inputs.npz")
    np.savez(tmp_path / "x.npz", **{k: v[:200] for k, v in x.items()})
    onnx_path = tmp_path / "lenet.onnx"
    assert run_cli(capsys, "export-onnx", proto, model, "-o", onnx_path)[0] == 0
    for order in ([proto, model, onnx_path], [onnx_path, proto, model]):
        rc, out, err = run_cli(capsys, "verify", *order, "--engine", "opencv", "--inputs", tmp_path / "x.npz",
                               "--json", "--max-rel-l2", "1e-4")
        assert rc == 0, err
        res = json.loads(out)
        assert res["runs"] == ({"a": "opencv", "b": "onnxruntime"} if order[0] == proto
                               else {"a": "onnxruntime", "b": "opencv"})
        prob = res["blobs"]["prob"]
        assert prob["kind"] == "class_scores" and prob["top1_agreement"] == 1.0 and prob["samples"] == 200
        assert prob["rel_l2"] < 1e-5 and prob["kl"] < 1e-8


def test_verify_ssd_caffe_vs_onnx_and_compress_reports_recall(tmp_path, capsys):
    pytest.importorskip("cv2")
    pytest.importorskip("onnxruntime")
    d = golden_case("ssd_mini")
    proto, model, inputs = d / "model.prototxt", d / "model.caffemodel", d / "inputs.npz"
    onnx_path = tmp_path / "ssd.onnx"
    assert run_cli(capsys, "export-onnx", proto, model, "-o", onnx_path)[0] == 0
    rc, out, err = run_cli(capsys, "verify", proto, model, onnx_path, "--engine", "opencv", "--inputs", inputs,
                           "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert "detection_out" not in res["blobs"]
    m = res["detections"]["detection_out"]
    caffe_count = int((load_npz(d / "blobs.npz")["detection_out"].reshape(-1, 7)[:, 1] >= 0).sum())
    assert m["ref"] == m["test"] == m["matched"] == caffe_count > 0
    assert m["recall"] == m["precision"] == 1.0 and m["mean_iou"] > 0.9999 and m["max_score_change"] < 1e-4

    out_dir = tmp_path / "o"
    rc, out, err = run_cli(capsys, "compress", proto, model, "-o", out_dir, "--speedup", "1.5", "--inputs", inputs)
    assert rc == 0, err
    assert "detection_out: detections recall" in out
    ver = json.loads((out_dir / "report.json").read_text())["verification"]
    det = ver["detections"]["detection_out"]
    assert "detection_out" not in ver["blobs"] and 0 < det["recall"] <= 1 and det["ref"] == caffe_count
    # verify the written files the same way: OpenCV's Caffe reader on both
    rc, out, err = run_cli(capsys, "verify", proto, model, out_dir / "model.prototxt", out_dir / "model.caffemodel",
                           "--engine", "opencv", "--inputs", inputs)
    assert rc == 0, err
    assert "detection_out: detections recall" in out and "matched" in out
