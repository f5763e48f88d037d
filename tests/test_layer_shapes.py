"""The layer registry's shape rules (ir/layers/*) against OpenCV's Caffe reader, which
computes Caffe's shapes (conv/deconv arithmetic, ceil-rounded pooling with Caffe's
clip of a last window starting in the padding, axis handling of IP, Concat, Slice,
Flatten, Reshape, Crop), and the inputs Caffe refuses, worked out from Caffe's checks."""

from __future__ import annotations

import numpy as np
import pytest

from lrprune_caffe.errors import BadFileError
from lrprune_caffe.io.caffe import read_net, save_net
from lrprune_caffe.ir.analysis import expected_weight_shapes, infer_shapes

cv2 = pytest.importorskip("cv2")

SHAPES = """
name: "shapes"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 17 dim: 13 } } }
layer { name: "small" type: "Input" top: "small" input_param { shape { dim: 2 dim: 3 dim: 5 dim: 7 } } }
layer { name: "c_s2" type: "Convolution" bottom: "data" top: "c_s2"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "c_rect" type: "Convolution" bottom: "data" top: "c_rect"
  convolution_param { num_output: 5 kernel_h: 5 kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 2 pad_w: 0 } }
layer { name: "c_dil" type: "Convolution" bottom: "data" top: "c_dil"
  convolution_param { num_output: 2 kernel_size: 3 dilation: 2 bias_term: false } }
layer { name: "c_grp" type: "Convolution" bottom: "data" top: "c_grp"
  convolution_param { num_output: 6 kernel_size: 1 group: 3 } }
layer { name: "dc" type: "Deconvolution" bottom: "data" top: "dc"
  convolution_param { num_output: 4 kernel_size: 4 stride: 2 pad: 1 } }
layer { name: "dc_rect" type: "Deconvolution" bottom: "data" top: "dc_rect"
  convolution_param { num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 3 stride_w: 2 group: 3 } }
layer { name: "p_max" type: "Pooling" bottom: "data" top: "p_max" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "p_ave" type: "Pooling" bottom: "data" top: "p_ave"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "p_clip" type: "Pooling" bottom: "small" top: "p_clip"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "p_rect" type: "Pooling" bottom: "data" top: "p_rect"
  pooling_param { pool: MAX kernel_h: 4 kernel_w: 2 stride_h: 3 stride_w: 2 pad_h: 1 pad_w: 1 } }
layer { name: "p_glob" type: "Pooling" bottom: "data" top: "p_glob" pooling_param { pool: AVE global_pooling: true } }
layer { name: "ip" type: "InnerProduct" bottom: "p_max" top: "ip" inner_product_param { num_output: 7 } }
layer { name: "ip_ax2" type: "InnerProduct" bottom: "p_max" top: "ip_ax2" inner_product_param { num_output: 5 axis: 2 } }
layer { name: "c_grp_pool" type: "Pooling" bottom: "c_grp" top: "c_grp_pool" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "cat1" type: "Concat" bottom: "c_s2" bottom: "c_grp_pool" top: "cat1" }
layer { name: "cat2" type: "Concat" bottom: "data" bottom: "data" top: "cat2" concat_param { axis: 2 } }
layer { name: "sl" type: "Slice" bottom: "c_grp" top: "sl_a" top: "sl_b" top: "sl_c" slice_param { slice_point: 1 slice_point: 4 } }
layer { name: "fl" type: "Flatten" bottom: "data" top: "fl" }
layer { name: "fl_ax" type: "Flatten" bottom: "data" top: "fl_ax" flatten_param { axis: 1 end_axis: 2 } }
layer { name: "rs" type: "Reshape" bottom: "data" top: "rs" reshape_param { shape { dim: 0 dim: -1 dim: 13 } } }
layer { name: "rs_ax" type: "Reshape" bottom: "data" top: "rs_ax"
  reshape_param { shape { dim: 51 } axis: 1 num_axes: 2 } }
layer { name: "crop" type: "Crop" bottom: "data" bottom: "p_ave" top: "crop" crop_param { axis: 2 offset: 2 offset: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "data" bottom: "data" top: "sum" }
layer { name: "sm" type: "Softmax" bottom: "data" top: "sm" }
layer { name: "lrn" type: "LRN" bottom: "data" top: "lrn" }
"""

# Caffe's arithmetic by hand, for the cases that matter most (OpenCV agrees on all of them)
HAND = {
    "c_s2": (2, 4, 9, 7),       # (17 + 2 - 3) / 2 + 1, (13 + 2 - 3) / 2 + 1
    "c_rect": (2, 5, 9, 11),    # (17 + 4 - 5) / 2 + 1, 13 - 3 + 1
    "c_dil": (2, 2, 13, 9),     # kernel extent 5
    "dc": (2, 4, 34, 26),       # 2 * (17 - 1) + 4 - 2
    "dc_rect": (2, 3, 51, 26),  # 3 * 16 + 3, 2 * 12 + 2
    "p_max": (2, 3, 8, 6),      # ceil((17 - 3) / 2) + 1, ceil(10 / 2) + 1
    "p_ave": (2, 3, 9, 7),
    "p_clip": (2, 3, 3, 4),     # ceil((5 + 2 - 2) / 2) + 1 = 4, but window 4 would start in the pad: 3
    "p_rect": (2, 3, 6, 7),     # ceil((17 + 2 - 4) / 3) + 1; ceil((13 + 2 - 2) / 2) + 1 = 8, clipped: 7 * 2 >= 13 + 1
    "p_glob": (2, 3, 1, 1),
    "ip": (2, 7), "ip_ax2": (2, 3, 5),
    "cat2": (2, 3, 34, 13), "sl_b": (2, 3, 17, 13),
    "fl": (2, 663), "fl_ax": (2, 51, 13), "rs": (2, 51, 13), "rs_ax": (2, 51, 13),
    "crop": (2, 3, 9, 7),
}


def test_shapes_match_opencv_and_caffes_arithmetic(tmp_path):
    p = tmp_path / "shapes.prototxt"
    p.write_text(SHAPES)
    net = read_net(p)
    shapes = infer_shapes(net)
    for name, want in HAND.items():
        assert shapes.blobs[name] == want, name
    assert shapes.blobs["cat1"] == (2, 10, 9, 7)
    assert [shapes.blobs[t] for t in ("sl_a", "sl_b", "sl_c")] == [(2, 1, 17, 13), (2, 3, 17, 13), (2, 2, 17, 13)]
    # OpenCV's reader, with weights of the shapes we say Caffe expects
    rng = np.random.default_rng(0)
    for layer in net.layers:
        layer.blobs = [rng.standard_normal(s).astype(np.float32)
                       for s in (expected_weight_shapes(net, layer, shapes) or [])]
    assert [b.shape for b in net.layer("c_grp").blobs] == [(6, 1, 1, 1), (6,)]
    assert [b.shape for b in net.layer("dc_rect").blobs] == [(3, 1, 3, 2), (3,)]
    assert [b.shape for b in net.layer("ip_ax2").blobs] == [(5, 48), (5,)]
    save_net(net, tmp_path / "w.prototxt", tmp_path / "w.caffemodel")
    cv = cv2.dnn.readNetFromCaffe(str(tmp_path / "w.prototxt"), str(tmp_path / "w.caffemodel"))
    cv.setInput(rng.standard_normal((2, 3, 17, 13)).astype(np.float32), "data")
    cv.setInput(rng.standard_normal((2, 3, 5, 7)).astype(np.float32), "small")
    names = [layer.name for layer in net.layers if layer.type not in ("Input", "Slice")]
    for name, out in zip(names, cv.forward(names)):
        (top,) = net.layer(name).tops
        assert tuple(out.shape) == shapes.blobs[top], name


def one_layer(tmp_path, text, shape=(2, 3, 8, 8)):
    dims = " ".join(f"dim: {d}" for d in shape)
    p = tmp_path / "bad.prototxt"
    p.write_text(f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}\n'
                 + text)
    return infer_shapes(read_net(p))


@pytest.mark.parametrize("text, shape, why", [
    ('layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 2 kernel_size: 1 } }',
     (2, 3), "expects an N x C x spatial input"),
    ('layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
     'convolution_param { num_output: 2 kernel_size: 3 group: 2 } }', (2, 3, 8, 8), "not divisible by group 2"),
    ('layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
     'convolution_param { num_output: 3 kernel_size: 3 group: 3 } }', (2, 6, 8, 8), None),
    ('layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 2 kernel_size: 9 } }',
     (2, 3, 8, 8), "larger than the padded input"),
    ('layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { kernel_h: 3 kernel_size: 2 } }',
     (2, 3, 8, 8), "are not valid"),  # Caffe: kernel_size OR kernel_h and kernel_w, not both
    ('layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { kernel_size: 2 pad: 2 } }',
     (2, 3, 8, 8), "must be smaller than kernel"),
    ('layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { global_pooling: true kernel_size: 2 } }',
     (2, 3, 8, 8), "cannot be combined"),
    ('layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { kernel_size: 11 pad: 1 } }',
     (2, 3, 8, 8), "larger than the padded input 10x10"),
    ('layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { stride: 2 } }',
     (2, 3, 8, 8), "has no kernel_size"),
    ('layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "b" slice_param { axis: 1 } }',
     (2, 3, 8, 8), "does not split evenly"),
    ('layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "b" slice_param { slice_point: 3 } }',
     (2, 3, 8, 8), "do not split axis 1"),
    ('layer { name: "r" type: "Reshape" bottom: "data" top: "r" reshape_param { shape { dim: -1 dim: -1 } } }',
     (2, 3, 8, 8), "at most one -1"),
    ('layer { name: "r" type: "Reshape" bottom: "data" top: "r" reshape_param { shape { dim: 5 dim: -1 } } }',
     (2, 3, 8, 8), "cannot reshape"),
    ('layer { name: "e" type: "Eltwise" bottom: "data" bottom: "data" top: "e" '
     'eltwise_param { coeff: 1 coeff: 2 coeff: 3 } }', (2, 3, 8, 8), "3 coeffs for 2 bottoms"),
    ('layer { name: "l" type: "LRN" bottom: "data" top: "l" }', (2, 3), "expects a 4-D input"),
])
def test_inputs_caffe_refuses(tmp_path, text, shape, why):
    if why is None:  # the valid neighbour of the case above
        assert one_layer(tmp_path, text, shape).blobs[text.split('top: "')[1].split('"')[0]] == (2, 3, 6, 6)
        return
    with pytest.raises(BadFileError, match=why) as e:
        one_layer(tmp_path, text, shape)
    assert "bad.prototxt" in str(e.value)


def test_crop_lowering_defaults_to_offset_0(tmp_path):
    """Caffe's Crop: offsets default to 0; nothing to crop is an Identity."""
    from lrprune_caffe.engines.runtime import ort_session
    from lrprune_caffe.export.onnx import export_model
    p = tmp_path / "crop.prototxt"
    p.write_text('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 6 dim: 5 } } }\n'
                 'layer { name: "r" type: "Input" top: "r" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 3 } } }\n'
                 'layer { name: "c" type: "Crop" bottom: "x" bottom: "r" top: "c" crop_param { axis: 2 } }\n'
                 'layer { name: "same" type: "Crop" bottom: "x" bottom: "x" top: "same" }\n')
    model = export_model(read_net(p), opset=13)
    x = np.arange(60, dtype=np.float32).reshape(1, 2, 6, 5)
    c, same = ort_session(model.SerializeToString()).run(["c", "same"], {"x": x, "r": np.zeros((1, 2, 4, 3), np.float32)})
    np.testing.assert_array_equal(c, x[:, :, :4, :3])
    np.testing.assert_array_equal(same, x)
    assert "Identity" in [n.op_type for n in model.graph.node]
