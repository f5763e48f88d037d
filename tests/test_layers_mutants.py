"""Layer-registry rules the mutation run (tools/mutation.py) found untested, each checked
against an independent reference: OpenCV's Caffe reader refusing what Caffe refuses, Caffe's
own checks (quoted), and onnxruntime running the lowered graph against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from lrprune_caffe.errors import BadFileError, UserError
from lrprune_caffe.export.onnx import export_model
from lrprune_caffe.io.caffe import read_net
from lrprune_caffe.ir.analysis import infer_shapes

cv2 = pytest.importorskip("cv2")


def _net_file(tmp_path, text, name="bad.prototxt"):
    p = tmp_path / name
    p.write_text(text)
    return p


PRIORBOX = """
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 3 dim: 32 dim: 32 }} }} }}
layer {{ name: "f" type: "Input" top: "f" input_param {{ shape {{ dim: 1 dim: 4 dim: 4 dim: 4 }} }} }}
layer {{ name: "pb" type: "PriorBox" bottom: "f" bottom: "data" top: "pb"
  prior_box_param {{ {sizes} aspect_ratio: 2 flip: true variance: 0.1 }} }}
"""


@pytest.mark.parametrize("sizes, ok", [("min_size: 8 min_size: 12 max_size: 16", False),
                                       ("min_size: 8 max_size: 16 max_size: 20", False),
                                       ("min_size: 8 min_size: 12 max_size: 16 max_size: 20", True)])
def test_priorbox_needs_as_many_max_size_as_min_size(tmp_path, sizes, ok):
    """The SSD fork: CHECK_EQ(min_size_size(), max_size_size()) when max_size is given;
    OpenCV asserts the same (_minSize.size() == _maxSize.size()); we refuse it when lowering
    (shape inference does not check PriorBox parameters)."""
    p = _net_file(tmp_path, PRIORBOX.format(sizes=sizes))
    cv = cv2.dnn.readNetFromCaffe(str(p))
    cv.setInput(np.zeros((1, 3, 32, 32), np.float32), "data")
    cv.setInput(np.zeros((1, 4, 4, 4), np.float32), "f")
    if ok:
        want = cv.forward("pb").shape
        assert infer_shapes(read_net(p)).blobs["pb"] == tuple(want)
        export_model(read_net(p))
        return
    with pytest.raises(cv2.error, match="_minSize.size"):
        cv.forward("pb")
    with pytest.raises(UserError, match=r"'pb'.* max_size for \d min_size \(need as many\)"):
        export_model(read_net(p))


def test_reshape_dim_0_past_the_input_axes_is_a_bad_input(tmp_path):
    """Caffe's ReshapeLayer: CHECK_GT(bottom[0]->num_axes(), start_axis + copy_axis_index)
    ("new shape contains a 0, but there was no corresponding bottom axis to copy"): a 0 at
    position 2 of a 2-D input is refused with one line, not an IndexError; position 1 copies."""
    head = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }\n'
    bad = _net_file(tmp_path, head + 'layer { name: "r" type: "Reshape" bottom: "data" top: "r" '
                                     'reshape_param { shape { dim: 0 dim: 0 dim: 0 } } }\n')
    with pytest.raises(BadFileError, match="copies a missing input axis"):
        infer_shapes(read_net(bad))
    good = _net_file(tmp_path, head + 'layer { name: "r" type: "Reshape" bottom: "data" top: "r" '
                                      'reshape_param { shape { dim: 0 dim: 0 dim: 1 } } }\n', "good.prototxt")
    cv = cv2.dnn.readNetFromCaffe(str(good))
    cv.setInput(np.zeros((2, 3), np.float32), "data")
    assert infer_shapes(read_net(good)).blobs["r"] == tuple(cv.forward("r").shape) == (2, 3, 1)


@pytest.mark.parametrize("crop_param, want", [
    ("axis: 2 offset: 1", (slice(None), slice(None), slice(1, 5), slice(1, 4))),          # one offset: every axis
    ("axis: 2 offset: 2 offset: 1", (slice(None), slice(None), slice(2, 6), slice(1, 4))),  # one per axis
    ("axis: 1 offset: 0 offset: 1 offset: 2", (slice(None), slice(0, 2), slice(1, 5), slice(2, 5))),
])
def test_crop_offsets_against_numpy(tmp_path, crop_param, want):
    """Caffe's Crop: one offset applies to every axis from ``axis`` on, else one per axis;
    the ONNX graph's output (onnxruntime) is numpy's slice of the input."""
    from lrprune_caffe.engines.runtime import ort_session
    p = _net_file(tmp_path,
                  'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 7 dim: 5 } } }\n'
                  'layer { name: "r" type: "Input" top: "r" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 3 } } }\n'
                  f'layer {{ name: "c" type: "Crop" bottom: "x" bottom: "r" top: "c" crop_param {{ {crop_param} }} }}\n',
                  "crop.prototxt")
    x = np.arange(70, dtype=np.float32).reshape(1, 2, 7, 5)
    cv = cv2.dnn.readNetFromCaffe(str(p))
    cv.setInput(x, "x")
    cv.setInput(np.zeros((1, 2, 4, 3), np.float32), "r")
    ref = cv.forward("c")
    np.testing.assert_array_equal(ref, x[want])  # OpenCV agrees with the hand-written slice
    (c,) = ort_session(export_model(read_net(p), opset=13).SerializeToString()).run(
        ["c"], {"x": x, "r": np.zeros((1, 2, 4, 3), np.float32)})
    np.testing.assert_array_equal(c, x[want])


def test_noop_crop_passes_the_first_bottom_through(tmp_path):
    """Nothing to crop: the output is the first bottom, not the reference one of the same shape."""
    from lrprune_caffe.engines.runtime import ort_session
    p = _net_file(tmp_path,
                  'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 3 } } }\n'
                  'layer { name: "r" type: "Input" top: "r" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 3 } } }\n'
                  'layer { name: "c" type: "Crop" bottom: "x" bottom: "r" top: "c" }\n', "crop.prototxt")
    x = np.arange(24, dtype=np.float32).reshape(1, 2, 4, 3)
    (c,) = ort_session(export_model(read_net(p), opset=13).SerializeToString()).run(
        ["c"], {"x": x, "r": np.zeros_like(x)})
    np.testing.assert_array_equal(c, x)


def test_structured_prune_through_a_flatten_layer(tmp_path):
    """Conv -> Flatten -> InnerProduct: removing a filter removes its whole H*W block of the
    IP's columns (channel c = columns c*H*W ... (c+1)*H*W - 1); OpenCV's output of the pruned
    net equals the dense net with those filters zeroed."""
    from lrprune_caffe.engines.runtime import run_net
    from lrprune_caffe.ir.analysis import expected_weight_shapes
    from lrprune_caffe.transforms import run_pass
    from lrprune_caffe.transforms.prune import PruneSpec
    from lrprune_caffe.transforms.structured_prune import prune_structured
    p = _net_file(tmp_path,
                  'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 2 dim: 3 dim: 4 } } }\n'
                  'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                  'convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }\n'
                  'layer { name: "f" type: "Flatten" bottom: "c" top: "f" }\n'
                  'layer { name: "ip" type: "InnerProduct" bottom: "f" top: "ip" inner_product_param { num_output: 3 } }\n',
                  "flat.prototxt")
    net = read_net(p)
    shapes = infer_shapes(net)
    rng = np.random.default_rng(2)
    for layer in net.layers:
        layer.blobs = [rng.standard_normal(s).astype(np.float32) for s in (expected_weight_shapes(net, layer, shapes) or [])]
    dense = net.copy()
    result = run_pass(prune_structured, net, spec=PruneSpec(per_layer={"c": 0.5}, structured=True))
    (d,) = [x for x in result.details if x["layer"] == "c"]
    removed = sorted(d["removed"])
    keep = [c for c in range(4) if c not in removed]
    assert len(keep) == 2
    ip_w = np.asarray(dense.layer("ip").blobs[0]).reshape(3, 4, 12)  # (out, channel, H*W)
    np.testing.assert_array_equal(net.layer("ip").blobs[0], ip_w[:, keep].reshape(3, 24))
    ref = dense.copy()
    w, b = np.array(ref.layer("c").blobs[0]), np.array(ref.layer("c").blobs[1])
    w[removed], b[removed] = 0, 0
    ref.layer("c").blobs = [w, b]
    x = {"data": rng.standard_normal((2, 2, 3, 4)).astype(np.float32)}
    got = run_net(net, x, outputs=["ip"], engine="opencv")["ip"]
    want = run_net(ref, x, outputs=["ip"], engine="opencv")["ip"]
    np.testing.assert_allclose(got, want, atol=1e-5)
