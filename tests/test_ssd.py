"""SSD fork layers exported to ONNX: onnxruntime on our file against OpenCV 4.x on the Caffe files.

* small SSD-style nets with seeded weights built here (two heads: Normalize, Permute,
  Flatten, PriorBox, Concat, Reshape + Softmax, DetectionOutput), over parameter
  combinations: flip on/off, clip, several aspect ratios and min sizes, step / step_h /
  step_w, offset, CORNER vs CENTER_SIZE, share_location false, a background label other
  than 0, variance_encoded_in_target, batch 2 (static and dynamic), no detection at all;
* DetectionOutput alone on seeded loc / conf / prior inputs with many overlapping boxes
  (NMS, top_k, keep_top_k across classes);
* the golden ssd_mini against the blobs real Caffe (SSD fork) computed, at opsets 11, 13
  and the highest; Flatten's axis / end_axis against OpenCV;
* what OpenCV does not implement as the fork does (integer min sizes, img_size / img_h /
  img_w, CORNER_SIZE, the empty result, the row order), against values worked out by hand
  from the fork's source.

Detections are compared as sets: OpenCV sorts all rows by score and pads with zero rows
to keep_top_k x batch; the fork (and our export) lists them by image, label, then score.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import golden_case, load_npz

from lrprune_caffe.engines.detection import match_detections
from lrprune_caffe.engines.runtime import ort_session, run_onnxruntime, run_opencv
from lrprune_caffe.errors import UserError
from lrprune_caffe.export.onnx import export_model, max_opset
from lrprune_caffe.io.caffe import load_net, read_net
from lrprune_caffe.ir.analysis import expected_weight_shapes, infer_shapes

TOL = 1e-4
V4 = "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2"


# ---- helpers -------------------------------------------------------------------------------

def opencv_rows(out) -> np.ndarray:
    """OpenCV's detections: its zero padding rows dropped (a real row has score > 0)."""
    rows = np.asarray(out, np.float64).reshape(-1, 7)
    return rows[rows[:, 2] > 0]


def canonical(rows) -> np.ndarray:
    rows = np.asarray(rows, np.float64).reshape(-1, 7)
    order = np.lexsort((rows[:, 3], -rows[:, 2], rows[:, 1], rows[:, 0]))
    return rows[order]


def assert_fork_order(rows):
    """By image, then label, then score descending (the fork's DetectionOutput order)."""
    rows = np.asarray(rows, np.float64).reshape(-1, 7)
    key = list(zip(rows[:, 0], rows[:, 1], -rows[:, 2]))
    assert key == sorted(key)


def assert_same_detections(ours, cv_out):
    ours = np.asarray(ours).reshape(-1, 7)
    theirs = opencv_rows(cv_out)
    assert len(ours) == len(theirs), f"{len(ours)} detections, OpenCV {len(theirs)}"
    assert len(ours) > 0
    assert_fork_order(ours)
    np.testing.assert_allclose(canonical(ours), canonical(theirs), atol=TOL, rtol=0)


def run_ours(net, feed, outputs=None, dynamic_batch=False):
    outputs = list(outputs or net.outputs())
    model = export_model(net, dynamic_batch=dynamic_batch,
                         extra_outputs=[o for o in outputs if o not in net.outputs()])
    onnx.checker.check_model(model, full_check=True)
    sess = ort_session(model.SerializeToString(), 1)
    return dict(zip(outputs, sess.run(outputs, {k: np.ascontiguousarray(v, np.float32)
                                                for k, v in feed.items()})))


def fill_weights(net, seed):
    """He-normal convs (loc and conf heads x0.3: boxes near their priors, softmax scores
    spread, without ties at 1.0), Normalize scales in [5, 20]."""
    rng = np.random.default_rng(seed)
    shapes = infer_shapes(net)
    for layer in net.layers:
        ws = expected_weight_shapes(net, layer, shapes)
        if not ws:
            continue
        if layer.type == "Normalize":
            layer.blobs = [rng.uniform(5, 20, ws[0]).astype(np.float32)]
            continue
        w = rng.standard_normal(ws[0]) * np.sqrt(2.0 / np.prod(ws[0][1:]))
        w *= 0.3 if layer.name.endswith(("_loc", "_conf")) else 1.0
        layer.blobs = [w.astype(np.float32)] + [rng.normal(0, 0.1, s).astype(np.float32) for s in ws[1:]]
    return net


def head(name, bottom, priors, n_loc, n_classes, prior_param):
    return f'''
layer {{ name: "{name}_loc" type: "Convolution" bottom: "{bottom}" top: "{name}_loc"
  convolution_param {{ num_output: {priors * n_loc * 4} kernel_size: 3 pad: 1 }} }}
layer {{ name: "{name}_loc_perm" type: "Permute" bottom: "{name}_loc" top: "{name}_loc_perm"
  permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}
layer {{ name: "{name}_loc_flat" type: "Flatten" bottom: "{name}_loc_perm" top: "{name}_loc_flat"
  flatten_param {{ axis: 1 }} }}
layer {{ name: "{name}_conf" type: "Convolution" bottom: "{bottom}" top: "{name}_conf"
  convolution_param {{ num_output: {priors * n_classes} kernel_size: 3 pad: 1 }} }}
layer {{ name: "{name}_conf_perm" type: "Permute" bottom: "{name}_conf" top: "{name}_conf_perm"
  permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}
layer {{ name: "{name}_conf_flat" type: "Flatten" bottom: "{name}_conf_perm" top: "{name}_conf_flat"
  flatten_param {{ axis: 1 }} }}
layer {{ name: "{name}_priorbox" type: "PriorBox" bottom: "{bottom}" bottom: "data" top: "{name}_priorbox"
  prior_box_param {{ {prior_param} }} }}
'''


def ssd_net(tmp_path, case, seed=0):
    """Input (n, 3, 32, 40) > conv 8 > pool (16x20) > Normalize > head 1; pool (8x10) > conv 16 > head 2."""
    n_cls, share = case["classes"], case.get("share", True)
    n_loc = 1 if share else n_cls
    p1, p2 = case["priors"]
    venc = "variance_encoded_in_target: true" in case["det"]
    text = f'''name: "ssd_test"
layer {{ name: "data" type: "Input" top: "data"
  input_param {{ shape {{ dim: {case.get("n", 1)} dim: 3 dim: 32 dim: 40 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "norm" type: "Normalize" bottom: "pool1" top: "norm" norm_param {{ {case.get("norm", "")} }} }}
layer {{ name: "pool2" type: "Pooling" bottom: "pool1" top: "pool2" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool2" top: "conv2" convolution_param {{ num_output: 16 kernel_size: 3 pad: 1 }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
{head("h1", "norm", p1[0], n_loc, n_cls, p1[1])}
{head("h2", "conv2", p2[0], n_loc, n_cls, p2[1])}
layer {{ name: "mbox_loc" type: "Concat" bottom: "h1_loc_flat" bottom: "h2_loc_flat" top: "mbox_loc" concat_param {{ axis: 1 }} }}
layer {{ name: "mbox_conf" type: "Concat" bottom: "h1_conf_flat" bottom: "h2_conf_flat" top: "mbox_conf" concat_param {{ axis: 1 }} }}
layer {{ name: "mbox_priorbox" type: "Concat" bottom: "h1_priorbox" bottom: "h2_priorbox" top: "mbox_priorbox"
  concat_param {{ axis: 2 }} }}
layer {{ name: "conf_reshape" type: "Reshape" bottom: "mbox_conf" top: "conf_reshape"
  reshape_param {{ shape {{ dim: 0 dim: -1 dim: {n_cls} }} }} }}
layer {{ name: "conf_softmax" type: "Softmax" bottom: "conf_reshape" top: "conf_softmax" softmax_param {{ axis: 2 }} }}
layer {{ name: "conf_flatten" type: "Flatten" bottom: "conf_softmax" top: "conf_flatten" flatten_param {{ axis: 1 }} }}
'''
    prior_blob = "mbox_priorbox"
    if venc:  # OpenCV wants a 1-channel prior blob when the variances are in the target
        text += ('layer { name: "prior_boxes" type: "Slice" bottom: "mbox_priorbox" top: "prior_boxes" '
                 'top: "prior_variances" slice_param { axis: 1 slice_point: 1 } }\n')
        prior_blob = "prior_boxes"
    text += f'''layer {{ name: "detection_out" type: "DetectionOutput" bottom: "mbox_loc" bottom: "conf_flatten"
  bottom: "{prior_blob}" top: "detection_out"
  detection_output_param {{ num_classes: {n_cls} share_location: {str(share).lower()} {case["det"]} }} }}
'''
    path = tmp_path / "ssd.prototxt"
    path.write_text(text)
    return fill_weights(read_net(path), seed)


NET_CASES = {
    "center_size": dict(
        classes=3, norm="across_spatial: false channel_shared: false",
        priors=[(4, f"min_size: 8 max_size: 16 aspect_ratio: 2 flip: true clip: false {V4}"),
                (4, f"min_size: 16 max_size: 28 aspect_ratio: 2 flip: true clip: false {V4} step: 4")],
        det="background_label_id: 0 nms_param { nms_threshold: 0.45 top_k: 40 } code_type: CENTER_SIZE "
            "keep_top_k: 25 confidence_threshold: 0.3"),
    "corner_noflip_clip_steps": dict(
        classes=3, norm="across_spatial: true channel_shared: true eps: 1e-6",
        priors=[(3, "min_size: 6 aspect_ratio: 2 aspect_ratio: 3 flip: false clip: true variance: 0.1 "
                    "step_h: 2.5 step_w: 1.5 offset: 0.5"),
                (4, f"min_size: 12 max_size: 20 aspect_ratio: 3 flip: true clip: true {V4} offset: 0.25")],
        det="background_label_id: 0 nms_param { nms_threshold: 0.5 top_k: 60 } code_type: CORNER "
            "keep_top_k: 40 confidence_threshold: 0.25"),
    "per_class_locations": dict(
        classes=4, share=False, norm="across_spatial: false channel_shared: true",
        priors=[(8, f"min_size: 6 min_size: 10 max_size: 10 max_size: 18 aspect_ratio: 0.5 flip: true "
                    f"clip: false {V4}"),
                (3, f"min_size: 16 aspect_ratio: 2 aspect_ratio: 0.5 aspect_ratio: 1 flip: true clip: false {V4}")],
        det="background_label_id: 1 nms_param { nms_threshold: 0.3 top_k: 30 } code_type: CENTER_SIZE "
            "keep_top_k: 20 confidence_threshold: 0.2"),
    "variance_in_target": dict(
        classes=3, norm="across_spatial: false channel_shared: false",
        priors=[(4, f"min_size: 8 max_size: 16 aspect_ratio: 2 flip: true clip: false {V4}"),
                (2, f"min_size: 16 aspect_ratio: 2 flip: false clip: false {V4}")],
        det="background_label_id: 0 variance_encoded_in_target: true nms_param { nms_threshold: 0.45 top_k: 50 } "
            "code_type: CENTER_SIZE keep_top_k: 30 confidence_threshold: 0.3"),
    "all_candidates_keep_all": dict(  # no top_k; keep_top_k above any count
        classes=3, norm="across_spatial: false channel_shared: false",
        priors=[(4, f"min_size: 8 max_size: 16 aspect_ratio: 2 flip: true clip: false {V4}"),
                (4, f"min_size: 16 max_size: 28 aspect_ratio: 2 flip: true clip: false {V4}")],
        det="background_label_id: 0 nms_param { nms_threshold: 0.45 } code_type: CENTER_SIZE "
            "keep_top_k: 5000 confidence_threshold: 0.4"),
}


def image(n=1, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 40)).astype(np.float32)


# ---- small SSD nets ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(NET_CASES))
def test_ssd_net_matches_opencv(tmp_path, name):
    pytest.importorskip("cv2")
    net = ssd_net(tmp_path, NET_CASES[name])
    x = {"data": image()}
    blobs = ["norm", "mbox_priorbox", "detection_out"]
    ours = run_ours(net, x, blobs)
    cv = run_opencv(net, x, blobs)
    for b in ("norm", "mbox_priorbox"):
        np.testing.assert_allclose(ours[b], cv[b], atol=TOL * max(1.0, np.abs(cv[b]).max()), rtol=0)
    assert_same_detections(ours["detection_out"], cv["detection_out"])


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_ssd_net_batch_of_two(tmp_path, dynamic):
    pytest.importorskip("cv2")
    case = dict(NET_CASES["center_size"], n=2)
    net = ssd_net(tmp_path, case, seed=3)
    x = {"data": image(2, seed=4)}
    ours = run_ours(net, x, dynamic_batch=dynamic)["detection_out"]
    cv = run_opencv(net, x)["detection_out"]
    assert set(np.asarray(ours).reshape(-1, 7)[:, 0]) == {0.0, 1.0}
    assert_same_detections(ours, cv)


def test_ssd_net_dynamic_batch_runs_other_batch_sizes(tmp_path):
    """One file, batch 1 and 3: image ids follow the batch; each image as when run alone."""
    net = ssd_net(tmp_path, NET_CASES["center_size"], seed=5)
    xs = image(3, seed=6)
    model = export_model(net, dynamic_batch=True)
    sess = ort_session(model.SerializeToString(), 1)
    three = sess.run(None, {"data": xs})[0].reshape(-1, 7)
    for i in range(3):
        alone = sess.run(None, {"data": xs[i:i + 1]})[0].reshape(-1, 7)
        mine = three[three[:, 0] == i]
        np.testing.assert_allclose(mine[:, 1:], alone[:, 1:], atol=1e-6)
    assert run_onnxruntime(net, {"data": xs})["detection_out"].shape[:2] == (1, 1)


def test_no_detection_is_the_forks_placeholder_rows(tmp_path):
    """The fork writes [i, -1, -1, -1, -1, -1, -1] per image when nothing passes;
    OpenCV leaves its keep_top_k x batch rows at zero."""
    pytest.importorskip("cv2")
    case = dict(NET_CASES["center_size"], n=2)
    case["det"] = case["det"].replace("confidence_threshold: 0.3", "confidence_threshold: 0.9999")
    net = ssd_net(tmp_path, case)
    x = {"data": image(2)}
    ours = run_ours(net, x)["detection_out"]
    assert ours.shape == (1, 1, 2, 7)
    np.testing.assert_array_equal(ours[0, 0], [[0, -1, -1, -1, -1, -1, -1], [1, -1, -1, -1, -1, -1, -1]])
    cv = run_opencv(net, x)["detection_out"]
    assert cv.shape == (1, 1, 50, 7) and not cv.any()


# ---- DetectionOutput alone on crafted inputs -------------------------------------------------------

def detection_net(tmp_path, n, n_priors, n_classes, det, share=True):
    n_loc = 1 if share else n_classes
    text = f'''name: "det"
layer {{ name: "loc" type: "Input" top: "loc" input_param {{ shape {{ dim: {n} dim: {n_priors * n_loc * 4} }} }} }}
layer {{ name: "conf" type: "Input" top: "conf" input_param {{ shape {{ dim: {n} dim: {n_priors * n_classes} }} }} }}
layer {{ name: "prior" type: "Input" top: "prior" input_param {{ shape {{ dim: 1 dim: 2 dim: {n_priors * 4} }} }} }}
layer {{ name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" top: "det"
  detection_output_param {{ num_classes: {n_classes} share_location: {str(share).lower()} {det} }} }}
'''
    path = tmp_path / "det.prototxt"
    path.write_text(text)
    return read_net(path)


def crowded_inputs(n, n_priors, n_classes, share, seed):
    """Priors crowded into the unit square (many overlaps), seeded locs and scores."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.2, 0.8, (n_priors, 2))
    s = rng.uniform(0.1, 0.5, (n_priors, 2))
    boxes = np.concatenate([c - s / 2, c + s / 2], 1).reshape(-1)
    prior = np.stack([boxes, np.tile([0.1, 0.1, 0.2, 0.2], n_priors)])[None]
    n_loc = 1 if share else n_classes
    loc = rng.normal(0, 1.0, (n, n_priors * n_loc * 4))
    conf = rng.uniform(0, 1, (n, n_priors * n_classes))
    return {k: v.astype(np.float32) for k, v in dict(loc=loc, conf=conf, prior=prior).items()}


DET_CASES = [
    pytest.param("CENTER_SIZE", True, "nms_param { nms_threshold: 0.45 top_k: 40 } keep_top_k: 30 "
                 "confidence_threshold: 0.3", id="center-shared"),
    pytest.param("CENTER_SIZE", False, "nms_param { nms_threshold: 0.3 top_k: 25 } keep_top_k: 60 "
                 "confidence_threshold: 0.5", id="center-per-class"),
    pytest.param("CORNER", True, "nms_param { nms_threshold: 0.5 top_k: 100 } keep_top_k: 15 "
                 "confidence_threshold: 0.1", id="corner-shared"),
    pytest.param("CORNER", False, "nms_param { nms_threshold: 0.2 } keep_top_k: 500 confidence_threshold: 0.6",
                 id="corner-per-class-no-top-k"),  # many decoded boxes are inverted here
]


@pytest.mark.parametrize("code,share,det", DET_CASES)
@pytest.mark.parametrize("bg", [0, 2], ids=["bg0", "bg2"])
def test_detection_output_matches_opencv(tmp_path, code, share, det, bg):
    cv2 = pytest.importorskip("cv2")
    n, n_priors, n_classes = 2, 120, 4
    net = detection_net(tmp_path, n, n_priors, n_classes,
                        f"background_label_id: {bg} code_type: {code} {det}", share)
    feed = crowded_inputs(n, n_priors, n_classes, share, seed=bg + 7)
    ours = run_ours(net, feed)["det"]
    cvnet = cv2.dnn.readNetFromCaffe(str(tmp_path / "det.prototxt"))
    for k, v in feed.items():
        cvnet.setInput(v, k)
    assert_same_detections(ours, cvnet.forward("det"))


def one_class_net(tmp_path, priors, det):
    net = detection_net(tmp_path, 1, len(priors), 2, f"background_label_id: 0 code_type: CORNER {det}")
    prior = np.stack([np.asarray(priors, np.float32).reshape(-1), np.full(4 * len(priors), 0.1, np.float32)])[None]
    return net, prior


def test_top_k_applies_before_nms(tmp_path):
    """A (0.9) and B (0.8) overlap (IoU 0.81), C (0.7) stands apart. top_k 2 keeps only A and B
    as candidates, NMS drops B: just A (a top_k after NMS would give A and C)."""
    priors = [[0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.46], [0.6, 0.6, 0.9, 0.9]]
    scores = [0.9, 0.8, 0.7]
    conf = np.array([[1 - s, s] for s in scores], np.float32).reshape(1, -1)
    loc = np.zeros((1, 12), np.float32)
    for top_k, want in ((2, [0.9]), (3, [0.9, 0.7])):
        net, prior = one_class_net(tmp_path, priors, f"nms_param {{ nms_threshold: 0.5 top_k: {top_k} }} "
                                                     "keep_top_k: 10 confidence_threshold: 0.05")
        out = run_ours(net, dict(loc=loc, conf=conf, prior=prior))["det"].reshape(-1, 7)
        np.testing.assert_allclose(out[:, 2], want, atol=1e-6)


def test_inverted_box_has_zero_size(tmp_path):
    """The fork gives a box with xmax < xmin size 0: it suppresses nothing and nothing
    suppresses it, although its corners, reordered, would cover the others."""
    priors = [[0.5, 0.1, 0.1, 0.5], [0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.5, 0.5]]
    conf = np.array([[0.05, 0.95], [0.1, 0.9], [0.2, 0.8]], np.float32).reshape(1, -1)
    net, prior = one_class_net(tmp_path, priors, "nms_param { nms_threshold: 0.5 top_k: 10 } keep_top_k: 10 "
                                                 "confidence_threshold: 0.05")
    out = run_ours(net, dict(loc=np.zeros((1, 12), np.float32), conf=conf, prior=prior))["det"].reshape(-1, 7)
    np.testing.assert_allclose(out[:, 2], [0.95, 0.9], atol=1e-6)  # the third falls to the second
    np.testing.assert_allclose(out[0, 3:], priors[0], atol=1e-6)  # reported as decoded


def test_keep_top_k_ranks_across_classes_then_lists_by_label(tmp_path):
    """keep_top_k 3 over 2 classes: the 3 best scores of the image, listed class 1 first."""
    priors = [[0.0, 0.0, 0.1, 0.1], [0.3, 0.3, 0.4, 0.4], [0.6, 0.6, 0.7, 0.7]]
    conf = np.array([[0.0, 0.5, 0.9], [0.0, 0.6, 0.3], [0.0, 0.2, 0.8]], np.float32).reshape(1, -1)
    net = detection_net(tmp_path, 1, 3, 3, "background_label_id: 0 code_type: CORNER "
                                           "nms_param { nms_threshold: 0.5 } keep_top_k: 3 confidence_threshold: 0.1")
    prior = np.stack([np.asarray(priors, np.float32).reshape(-1), np.full(12, 0.1, np.float32)])[None]
    out = run_ours(net, dict(loc=np.zeros((1, 12), np.float32), conf=conf, prior=prior))["det"].reshape(-1, 7)
    np.testing.assert_allclose(out[:, 1:3], [[1, 0.6], [2, 0.9], [2, 0.8]], atol=1e-6)


def test_corner_size_decoding(tmp_path):
    """CORNER_SIZE (OpenCV reads it as CORNER): prior + variance * loc * prior size.
    Prior (0.1, 0.2, 0.5, 0.6), variances (0.1, 0.1, 0.2, 0.2), loc (1, 2, -1, 0.5):
    (0.1 + 0.1*1*0.4, 0.2 + 0.1*2*0.4, 0.5 - 0.2*1*0.4, 0.6 + 0.2*0.5*0.4)."""
    net = detection_net(tmp_path, 1, 1, 2, "background_label_id: 0 code_type: CORNER_SIZE "
                                           "nms_param { nms_threshold: 0.5 } keep_top_k: 5 confidence_threshold: 0.1")
    prior = np.array([[[0.1, 0.2, 0.5, 0.6], [0.1, 0.1, 0.2, 0.2]]], np.float32)
    out = run_ours(net, dict(loc=np.array([[1, 2, -1, 0.5]], np.float32), conf=np.array([[0.3, 0.7]], np.float32),
                             prior=prior))["det"].reshape(-1, 7)
    np.testing.assert_allclose(out, [[0, 1, 0.7, 0.14, 0.28, 0.42, 0.64]], atol=1e-6)


def test_adaptive_nms_is_refused(tmp_path):
    net = detection_net(tmp_path, 1, 3, 2, "background_label_id: 0 nms_param { nms_threshold: 0.5 eta: 0.9 } "
                                           "keep_top_k: 5")
    with pytest.raises(UserError, match="eta"):
        export_model(net)


# ---- PriorBox where OpenCV is not the fork ---------------------------------------------------

def prior_net(tmp_path, feat_hw, image_hw, param):
    text = f'''name: "pb"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 3 dim: {image_hw[0]} dim: {image_hw[1]} }} }} }}
layer {{ name: "feat" type: "Input" top: "feat" input_param {{ shape {{ dim: 1 dim: 2 dim: {feat_hw[0]} dim: {feat_hw[1]} }} }} }}
layer {{ name: "pb" type: "PriorBox" bottom: "feat" bottom: "data" top: "pb" prior_box_param {{ {param} }} }}
'''
    path = tmp_path / "pb.prototxt"
    path.write_text(text)
    return read_net(path)


def priors_of(net, feat_hw, image_hw):
    feed = {"data": np.zeros((1, 3, *image_hw), np.float32), "feat": np.zeros((1, 2, *feat_hw), np.float32)}
    return run_ours(net, feed, ["pb"])["pb"]


def test_prior_box_fractional_min_size_is_truncated(tmp_path):
    """``int min_size_ = min_sizes_[s]``: 10.7 is 10. Feature 2x2 on a 20x40 image: step
    (20, 10); cell (0, 0) centre (10, 5): (5/40, 0/20, 15/40, 10/20); variance 0.1."""
    net = prior_net(tmp_path, (2, 2), (20, 40), "min_size: 10.7 clip: false variance: 0.1")
    out = priors_of(net, (2, 2), (20, 40))
    assert out.shape == (1, 2, 16)
    np.testing.assert_allclose(out[0, 0, :4], [5 / 40, 0.0, 15 / 40, 10 / 20], atol=1e-7)
    np.testing.assert_allclose(out[0, 1], 0.1, atol=1e-7)


def test_prior_box_img_h_img_w_override_the_image(tmp_path):
    """img_h 60, img_w 80 on a 2x4 map: step (30, 20); cell (1, 3) centre (70, 45);
    min 10 max 20 ar 2 flip: sides 10, sqrt(200), 10*sqrt2 x 10/sqrt2, 10/sqrt2 x 10*sqrt2."""
    net = prior_net(tmp_path, (2, 4), (20, 40), f"min_size: 10 max_size: 20 aspect_ratio: 2 flip: true "
                                                f"clip: false img_h: 60 img_w: 80 {V4}")
    out = priors_of(net, (2, 4), (20, 40)).reshape(2, 2, 4, 4, 4)  # channel, h, w, prior, coord
    r2 = np.sqrt(2.0)
    sides = [(10, 10), (np.sqrt(200), np.sqrt(200)), (10 * r2, 10 / r2), (10 / r2, 10 * r2)]
    want = [[(70 - w / 2) / 80, (45 - h / 2) / 60, (70 + w / 2) / 80, (45 + h / 2) / 60] for w, h in sides]
    np.testing.assert_allclose(out[0, 1, 3], want, atol=1e-6)
    np.testing.assert_allclose(out[1, 1, 3], [[0.1, 0.1, 0.2, 0.2]] * 4, atol=1e-7)


def test_prior_box_img_size_and_clip(tmp_path):
    """img_size 100 on a 1x1 map: step 100, centre (50, 50); min 120 clipped to [0, 1]."""
    net = prior_net(tmp_path, (1, 1), (20, 40), "min_size: 120 img_size: 100 clip: true variance: 0.2")
    np.testing.assert_allclose(priors_of(net, (1, 1), (20, 40))[0], [[0, 0, 1, 1], [0.2] * 4], atol=1e-7)


def test_prior_box_bad_parameters_name_the_layer(tmp_path):
    net = prior_net(tmp_path, (2, 2), (20, 40), "min_size: 10 max_size: 8 variance: 0.1")
    with pytest.raises(UserError, match="'pb' .*max_size must be greater"):
        export_model(net)


# ---- the golden SSD -----------------------------------------------------------------------------

def test_golden_ssd_mini_equals_caffe_and_opencv():
    """Real Caffe's (the fork's) detection_out, in its own order, and OpenCV's as a set."""
    d = golden_case("ssd_mini")
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    x = load_npz(d / "inputs.npz")
    blobs = load_npz(d / "blobs.npz")
    ours = run_ours(net, x, ["conv2_norm", "mbox_priorbox", "detection_out"])
    for b in ("conv2_norm", "mbox_priorbox"):
        np.testing.assert_allclose(ours[b], blobs[b], atol=TOL * np.abs(blobs[b]).max(), rtol=0)
    assert ours["detection_out"].shape == blobs["detection_out"].shape == (1, 1, 50, 7)
    np.testing.assert_allclose(ours["detection_out"], blobs["detection_out"], atol=TOL, rtol=0)
    m = match_detections(blobs["detection_out"], ours["detection_out"])
    assert (m["matched"], m["recall"], m["precision"]) == (50, 1.0, 1.0)
    assert m["mean_iou"] > 0.9999 and m["max_score_change"] < 1e-5
    pytest.importorskip("cv2")
    assert_same_detections(ours["detection_out"], run_opencv(net, x)["detection_out"])


@pytest.mark.parametrize("opset", [11, 13, max_opset()])
def test_golden_ssd_mini_at_opsets(opset):
    d = golden_case("ssd_mini")
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    model = export_model(net, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    out = ort_session(model.SerializeToString(), 1).run(None, load_npz(d / "inputs.npz"))[0]
    np.testing.assert_allclose(out, load_npz(d / "blobs.npz")["detection_out"], atol=TOL, rtol=0)


@pytest.mark.parametrize("param", ["axis: 1 end_axis: 2", "axis: 2", "axis: 0 end_axis: -2", "axis: -3 end_axis: -1"])
def test_flatten_axis_end_axis_matches_opencv(tmp_path, param):
    pytest.importorskip("cv2")
    path = tmp_path / "flat.prototxt"
    path.write_text('name: "f"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 '
                    'dim: 4 dim: 5 } } }\n'
                    f'layer {{ name: "flat" type: "Flatten" bottom: "data" top: "flat" flatten_param {{ {param} }} }}\n')
    net = read_net(path)
    x = {"data": np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)}
    ours, cv = run_ours(net, x)["flat"], run_opencv(net, x)["flat"]
    assert ours.shape == cv.shape
    np.testing.assert_array_equal(ours, cv)
