"""Caffe I/O against real Caffe's golden data: shapes, exact round trips, OpenCV re-reads.

Also the reader's legacy paths on small crafted files: phase / stage / level
rules, input headers, V1 and 4-D legacy blobs, double_data, weights merged by
name (unmatched ones noted), SSD fork layers and unknown layer types.
"""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from conftest import GOLDEN, GOLDEN_CASES, golden_case, load_npz, require_shared
from lrprune_caffe.ir.analysis import expected_weight_shapes, infer_shapes, validate
from lrprune_caffe.api import convert
from lrprune_caffe.io.caffe import load_net, net_to_prototxt, read_caffemodel, save_net
from lrprune_caffe.errors import BadFileError
from lrprune_caffe.ir.net import Layer, Net, array_to_blobproto
from lrprune_caffe.schema.proto import pb

CASES = [pytest.param(c, id=c) for c in GOLDEN_CASES]


def caffe_blobs(case_dir) -> dict:
    """Golden blobs without Caffe's auto-inserted ``*_split_*`` blobs."""
    return {k: v for k, v in load_npz(case_dir / "blobs.npz").items() if "_split_" not in k}


def last_writers(net) -> dict:
    """blob -> (layer name, top index) of the last layer writing it (in-place layers
    included): OpenCV names a layer's outputs by layer, and an in-place blob's final
    value is the last writer's output."""
    out = {}
    for layer in net.layers:
        if layer.type == "Input":
            continue
        for i, top in enumerate(layer.tops):
            out[top] = (layer.name, i)
    return out


def opencv_blobs(cv2, prototxt, caffemodel, net, inputs, names) -> dict:
    """Every blob in ``names`` as OpenCV's Caffe reader computes it.

    Fusion is off and each layer is asked for on its own: with fusion on, OpenCV
    4.14 writes Inception branch outputs straight into the Concat buffer and returns
    garbage for them, and asking for many layers in one forwardAndRetrieve call can
    hand back a reused buffer (seen on layer_zoo's second Slice top)."""
    cvnet = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    cvnet.enableFusion(False)
    where = last_writers(net)
    out = {}
    for name in names:
        layer, idx = where[name]
        for k, v in inputs.items():
            cvnet.setInput(np.ascontiguousarray(v, dtype=np.float32), k)
        out[name] = np.array(cvnet.forwardAndRetrieve([layer])[0][idx], copy=True)
    return out


# ---------------------------------------------------------------------------
# golden cases

@pytest.mark.parametrize("case", CASES)
def test_shapes_match_caffe(case):
    d = golden_case(case)
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    inputs = load_npz(d / "inputs.npz")
    shapes = infer_shapes(net, {k: v.shape for k, v in inputs.items()})
    blobs = caffe_blobs(d)
    assert blobs
    for name, arr in blobs.items():
        assert shapes.blobs.get(name) == arr.shape, f"{case}: blob {name}"
    assert not net.notes  # every weight layer matched


@pytest.mark.parametrize("case", CASES)
def test_read_write_read_is_exact(case, tmp_path):
    d = golden_case(case)
    first = load_net(d / "model.prototxt", d / "model.caffemodel")
    save_net(first, tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
    second = load_net(tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
    assert second.to_proto() == first.to_proto()
    assert [layer.name for layer in second.layers] == [layer.name for layer in first.layers]
    for a, b in zip(first.layers, second.layers):
        assert len(a.blobs) == len(b.blobs), a.name
        for x, y in zip(a.blobs, b.blobs):
            assert x.dtype == y.dtype == np.float32 and x.shape == y.shape
            assert x.tobytes() == y.tobytes(), a.name  # bit-identical, NaN-safe
    # writing is deterministic: the second write is byte for byte the first
    save_net(second, tmp_path / "b.prototxt", tmp_path / "b.caffemodel")
    assert (tmp_path / "b.caffemodel").read_bytes() == (tmp_path / "a.caffemodel").read_bytes()
    assert (tmp_path / "b.prototxt").read_text() == (tmp_path / "a.prototxt").read_text()


@pytest.mark.parametrize("case", CASES)
def test_opencv_reproduces_every_golden_blob_from_converted_files(case, tmp_path):
    """convert (the user's path; for lenet_mnist_v1 this is the V1 upgrade) -> OpenCV."""
    cv2 = pytest.importorskip("cv2")
    d = golden_case(case)
    res = convert(d / "model.prototxt", d / "model.caffemodel", tmp_path / "out")
    proto, model = tmp_path / "out" / "model.prototxt", tmp_path / "out" / "model.caffemodel"
    assert res["written"] == {"prototxt": str(proto), "caffemodel": str(model)}
    text = proto.read_text()
    assert "layers {" not in text and "input_dim" not in text  # current format only

    net = load_net(proto, model)
    inputs = load_npz(d / "inputs.npz")
    golden = caffe_blobs(d)
    names = [n for n in golden if n not in inputs]
    assert set(names) <= set(last_writers(net))  # OpenCV can give us every one
    ours = opencv_blobs(cv2, proto, model, net, inputs, names)
    for name in names:
        got, want = ours[name], golden[name]
        assert got.shape == want.shape, name
        # Absolute 1e-5 for blobs of magnitude <= 1. OpenCV on Caffe's OWN files
        # differs from Caffe by up to 6e-5 on resnet_mini blobs reaching 39
        # (float32 summation order), so larger blobs get 1e-5 of their magnitude.
        tol = 1e-5 * max(1.0, float(np.abs(want).max()))
        err = float(np.abs(got - want).max())
        assert err <= tol, f"{case}: blob {name}: max error {err:.3g} > {tol:.3g}"
    # and what we wrote means exactly what Caffe's own files mean to OpenCV
    ref_net = load_net(d / "model.prototxt", d / "model.caffemodel")
    ref = opencv_blobs(cv2, d / "model.prototxt", d / "model.caffemodel", ref_net, inputs, names)
    for name in names:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)


def test_v1_lenet_converts_to_the_current_lenet(tmp_path):
    """The V1 LeNet (layers {} + enum types + 4-D blobs + input_dim) upgrades to
    the same layers and bit-identical weights as the current-format LeNet."""
    v1, cur = golden_case("lenet_mnist_v1"), golden_case("lenet_mnist")
    convert(v1 / "model.prototxt", v1 / "model.caffemodel", tmp_path / "out")
    up = load_net(tmp_path / "out" / "model.prototxt", tmp_path / "out" / "model.caffemodel")
    ref = load_net(cur / "model.prototxt", cur / "model.caffemodel")
    assert [(lr.type, lr.tops) for lr in up.layers] == [(lr.type, lr.tops) for lr in ref.layers]
    assert infer_shapes(up).blobs == infer_shapes(ref).blobs
    for a, b in zip(up.layers, ref.layers):
        assert [x.shape for x in a.blobs] == [x.shape for x in b.blobs], a.name
        assert all(x.tobytes() == y.tobytes() for x, y in zip(a.blobs, b.blobs)), a.name
    # the caffemodel itself was V1 with 4-D legacy blob shapes
    raw = read_caffemodel(v1 / "model.caffemodel")
    ip1 = next(wl for wl in raw if wl.name == "ip1")
    assert ip1.legacy == [True, True] and ip1.blobs[0].ndim == 4


def test_converted_v1_lenet_keeps_caffes_accuracy(tmp_path):
    cv2 = pytest.importorskip("cv2")
    d = golden_case("lenet_mnist_v1")
    require_shared(d / "labels.npz")
    convert(d / "model.prototxt", d / "model.caffemodel", tmp_path / "out")
    cvnet = cv2.dnn.readNetFromCaffe(str(tmp_path / "out" / "model.prototxt"),
                                     str(tmp_path / "out" / "model.caffemodel"))
    x = load_npz(d / "inputs.npz")["data"]
    labels = next(iter(load_npz(d / "labels.npz").values())).ravel()
    cvnet.setInput(x, "data")
    acc = float((cvnet.forward("prob").reshape(len(x), -1).argmax(1) == labels).mean())
    assert acc == pytest.approx(0.973, abs=1e-9)  # real Caffe's accuracy, README


# ---------------------------------------------------------------------------
# phases, stages, levels

def test_train_and_test_views_of_lenet_train_test():
    path = require_shared(GOLDEN / "lenet_mnist" / "train_test.prototxt")
    train = load_net(path, phase="TRAIN")
    test = load_net(path, phase="TEST")
    tnames = [lr.name for lr in train.layers]
    assert "accuracy" not in tnames and tnames[-1] == "loss"
    assert [lr.name for lr in test.layers][-2:] == ["accuracy", "loss"]
    # the two Data layers share a name; each phase keeps its own
    assert train.layer("mnist").param_msg("data_param").source == "mnist_train_lmdb"
    assert train.layer("mnist").param_msg("data_param").batch_size == 64
    assert test.layer("mnist").param_msg("data_param").source == "mnist_test_lmdb"
    # Data layers are not modelled: their outputs (and everything after) are unknown
    shapes = validate(train)
    assert shapes.blobs["data"] is None and shapes.blobs["loss"] is None
    # rules are consumed by the filter and kept on the layer for the writer
    assert list(test.layer("mnist").msg.include)[0].phase == pb.TEST


RULES = """
name: "rules"
{state}
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 2 }} }} }}
layer {{ name: "always" type: "ReLU" bottom: "data" top: "data" }}
layer {{ name: "train_only" type: "ReLU" bottom: "data" top: "data" include {{ phase: TRAIN }} }}
layer {{ name: "not_test" type: "ReLU" bottom: "data" top: "data" exclude {{ phase: TEST }} }}
layer {{ name: "deploy_stage" type: "ReLU" bottom: "data" top: "data" include {{ stage: "deploy" }} }}
layer {{ name: "not_deploy" type: "ReLU" bottom: "data" top: "data" include {{ not_stage: "deploy" }} }}
layer {{ name: "both_stages" type: "ReLU" bottom: "data" top: "data" include {{ stage: "a" stage: "b" }} }}
layer {{ name: "either_stage" type: "ReLU" bottom: "data" top: "data"
        include {{ stage: "a" }} include {{ stage: "b" }} }}
layer {{ name: "level_ge_2" type: "ReLU" bottom: "data" top: "data" include {{ min_level: 2 }} }}
layer {{ name: "level_le_1" type: "ReLU" bottom: "data" top: "data" include {{ max_level: 1 }} }}
layer {{ name: "test_level_2_a" type: "ReLU" bottom: "data" top: "data"
        include {{ phase: TEST min_level: 2 stage: "a" }} }}
layer {{ name: "excl_b" type: "ReLU" bottom: "data" top: "data" exclude {{ stage: "b" }} }}
"""


@pytest.mark.parametrize("phase, stages, level, state, kept", [
    ("TEST", (), 0, "", ["not_deploy", "level_le_1", "excl_b"]),
    ("TRAIN", (), 0, "", ["train_only", "not_test", "not_deploy", "level_le_1", "excl_b"]),
    ("TEST", ("deploy",), 0, "", ["deploy_stage", "level_le_1", "excl_b"]),
    ("TEST", ("a",), 0, "", ["not_deploy", "either_stage", "level_le_1", "excl_b"]),
    ("TEST", ("a", "b"), 0, "", ["not_deploy", "both_stages", "either_stage", "level_le_1"]),
    ("TEST", ("a",), 2, "", ["not_deploy", "either_stage", "level_ge_2", "test_level_2_a", "excl_b"]),
    ("TRAIN", ("a",), 2, "", ["train_only", "not_test", "not_deploy", "either_stage", "level_ge_2", "excl_b"]),
    # a state {} in the file adds its stages and level (the phase comes from the caller)
    ("TEST", (), 0, 'state { stage: "deploy" level: 3 }', ["deploy_stage", "level_ge_2", "excl_b"]),
])
def test_phase_stage_level_rules(tmp_path, phase, stages, level, state, kept):
    path = tmp_path / "rules.prototxt"
    path.write_text(RULES.format(state=state))
    net = load_net(path, phase=phase, stages=stages, level=level)
    assert [lr.name for lr in net.layers] == ["data", "always"] + kept


def test_train_net_with_v1_weights_gets_caffes_blob_shapes(tmp_path):
    """A train net (Data layers: input shapes unknown) with a V1 caffemodel: the
    legacy 4-D IP / bias blobs still get the shapes Caffe expects, so the converted
    caffemodel loads in Caffe (its ShapeEquals only forgives 4-D *legacy* blobs)."""
    path = require_shared(GOLDEN / "lenet_mnist" / "train_test.prototxt")
    v1 = golden_case("lenet_mnist_v1")
    net = load_net(path, v1 / "model.caffemodel", phase="TRAIN")
    assert [b.shape for b in net.layer("ip1").blobs] == [(500, 800), (500,)]
    assert [b.shape for b in net.layer("conv1").blobs] == [(20, 1, 5, 5), (20,)]
    ref = load_net(v1 / "model.prototxt", v1 / "model.caffemodel")
    for name in ("conv1", "conv2", "ip1", "ip2"):
        assert all(a.tobytes() == b.tobytes() for a, b in zip(net.layer(name).blobs, ref.layer(name).blobs))
    assert not net.notes


def test_include_and_exclude_together_is_rejected(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 } } }\n'
                    'layer { name: "r" type: "ReLU" bottom: "data" top: "data" '
                    'include { phase: TEST } exclude { phase: TRAIN } }\n')
    with pytest.raises(BadFileError, match=r"layer 'r' \(ReLU\).*include and exclude"):
        load_net(path)


# ---------------------------------------------------------------------------
# input headers

BODY = 'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" ' \
       'convolution_param { num_output: 4 kernel_size: 3 } }\n' \
       'layer { name: "sum" type: "Eltwise" bottom: "conv" bottom: "conv2" top: "sum" }\n'
HEADERS = {
    "input_dim": 'input: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 8\ninput_dim: 8\n'
                 'input: "conv2"\ninput_dim: 1\ninput_dim: 4\ninput_dim: 6\ninput_dim: 6\n',
    "input_shape": 'input: "data"\ninput_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
                   'input: "conv2"\ninput_shape { dim: 1 dim: 4 dim: 6 dim: 6 }\n',
    "input_layer": 'layer { name: "input" type: "Input" top: "data" top: "conv2" input_param { '
                   'shape { dim: 1 dim: 3 dim: 8 dim: 8 } shape { dim: 1 dim: 4 dim: 6 dim: 6 } } }\n',
}


@pytest.mark.parametrize("form", list(HEADERS))
def test_input_header_forms_give_the_same_net(tmp_path, form):
    path = tmp_path / f"{form}.prototxt"
    path.write_text(f'name: "inputs"\n{HEADERS[form]}{BODY}')
    net = load_net(path)
    assert net.inputs() == ["data", "conv2"]
    assert net.input_shapes() == {"data": (1, 3, 8, 8), "conv2": (1, 4, 6, 6)}
    assert infer_shapes(net).blobs["sum"] == (1, 4, 6, 6)
    ref = tmp_path / "ref.prototxt"
    ref.write_text(f'name: "inputs"\n{HEADERS["input_layer"]}{BODY}')
    assert net.to_proto() == load_net(ref).to_proto()
    assert "input_dim" not in net_to_prototxt(net) and "input:" not in net_to_prototxt(net)


# ---------------------------------------------------------------------------
# crafted caffemodels: V1, legacy 4-D blobs, double_data, unmatched weights

TINY = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 4 } }
"""


def tiny_weights(seed=0):
    rng = np.random.default_rng(seed)
    return {"conv": [rng.standard_normal((3, 2, 3, 3)).astype(np.float32),
                     rng.standard_normal(3).astype(np.float32)],
            "fc": [rng.standard_normal((4, 27)).astype(np.float32),
                   rng.standard_normal(4).astype(np.float32)]}


def legacy_blob(arr, double=False):
    """A BlobProto with num/channels/height/width (shape padded to 4-D on the left)."""
    bp = pb.BlobProto()
    dims = (1,) * (4 - arr.ndim) + tuple(arr.shape)
    bp.num, bp.channels, bp.height, bp.width = dims
    if double:
        bp.double_data.extend(arr.astype(np.float64).ravel().tolist())
    else:
        bp.data.extend(arr.ravel().tolist())
    return bp


def write_tiny(tmp_path, msg):
    (tmp_path / "tiny.prototxt").write_text(TINY)
    (tmp_path / "tiny.caffemodel").write_bytes(msg.SerializeToString())
    return tmp_path / "tiny.prototxt", tmp_path / "tiny.caffemodel"


def assert_tiny_weights(net, weights):
    for name, blobs in weights.items():
        got = net.layer(name).blobs
        assert [b.shape for b in got] == [b.shape for b in blobs], name
        for g, w in zip(got, blobs):
            assert g.dtype == np.float32
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("double", [False, True], ids=["data", "double_data"])
def test_legacy_4d_blobs_current_layers(tmp_path, double):
    weights = tiny_weights()
    msg = pb.NetParameter(name="tiny")
    for name, blobs in weights.items():
        lp = msg.layer.add(name=name, type="Convolution" if name == "conv" else "InnerProduct")
        for b in blobs:
            lp.blobs.add().CopyFrom(legacy_blob(b, double))
    net = load_net(*write_tiny(tmp_path, msg))
    assert_tiny_weights(net, weights)  # (1,1,4,27) -> (4,27), (1,1,1,3) -> (3,)
    assert not net.notes


def test_v1_caffemodel_with_legacy_blobs(tmp_path):
    weights = tiny_weights(1)
    msg = pb.NetParameter(name="tiny")
    for name, blobs in weights.items():
        v1 = msg.layers.add(name=name)
        v1.type = pb.V1LayerParameter.CONVOLUTION if name == "conv" else pb.V1LayerParameter.INNER_PRODUCT
        for b in blobs:
            v1.blobs.add().CopyFrom(legacy_blob(b, double=(name == "fc")))
    proto, model = write_tiny(tmp_path, msg)
    raw = read_caffemodel(model)
    assert [(w.name, w.type) for w in raw] == [("conv", "Convolution"), ("fc", "InnerProduct")]
    net = load_net(proto, model)
    assert_tiny_weights(net, weights)
    # written back in the current form: shaped blobs, no V1 layers, float data
    save_net(net, tmp_path / "out.prototxt", tmp_path / "out.caffemodel")
    out = pb.NetParameter.FromString((tmp_path / "out.caffemodel").read_bytes())
    assert len(out.layers) == 0 and [lp.name for lp in out.layer] == ["data", "conv", "relu", "fc"]
    fc = out.layer[3]
    assert list(fc.blobs[0].shape.dim) == [4, 27] and not fc.blobs[0].HasField("num")
    assert len(fc.blobs[0].double_data) == 0 and len(fc.blobs[0].data) == 108


def test_shaped_blobs_and_split_packed_data(tmp_path):
    """Current-form blobs; float data split over two packed runs is joined, as
    protobuf's own parser joins repeated packed runs."""
    weights = tiny_weights(2)
    w = weights["fc"][0].ravel()
    head = pb.BlobProto()
    head.shape.dim.extend([4, 27])
    head.data.extend(w[:50].tolist())
    tail = pb.BlobProto()
    tail.data.extend(w[50:].tolist())
    blob = head.SerializeToString() + tail.SerializeToString()
    fc = (pb.LayerParameter(name="fc").SerializeToString()
          + bytes([0x3A]) + _varint(len(blob)) + blob  # LayerParameter.blobs = 7
          + pb.LayerParameter(blobs=[array_to_blobproto(weights["fc"][1])]).SerializeToString())
    conv = pb.LayerParameter(name="conv", blobs=[array_to_blobproto(b) for b in weights["conv"]])
    data = (pb.NetParameter(name="tiny", layer=[conv]).SerializeToString()
            + bytes([0xA2, 0x06]) + _varint(len(fc)) + fc)  # NetParameter.layer = 100
    parsed = pb.NetParameter.FromString(data).layer[1].blobs[0]
    assert list(parsed.shape.dim) == [4, 27] and len(parsed.data) == 108  # protobuf agrees
    (tmp_path / "tiny.prototxt").write_text(TINY)
    (tmp_path / "tiny.caffemodel").write_bytes(data)
    net = load_net(tmp_path / "tiny.prototxt", tmp_path / "tiny.caffemodel")
    assert_tiny_weights(net, weights)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_weights_merge_by_name_and_unmatched_are_noted(tmp_path):
    weights = tiny_weights(3)
    msg = pb.NetParameter(name="other")
    # order in the file does not matter; names do
    for name in ("fc", "ghost", "conv"):
        lp = msg.layer.add(name=name, type="InnerProduct")
        for b in weights.get(name, [np.ones((2, 2), np.float32)]):
            lp.blobs.add().CopyFrom(array_to_blobproto(b))
    net = load_net(*write_tiny(tmp_path, msg))
    assert_tiny_weights(net, weights)
    assert len(net.notes) == 1 and "ghost" in net.notes[0] and "ignored" in net.notes[0]


def test_layers_without_weights_are_noted(tmp_path):
    weights = tiny_weights(4)
    msg = pb.NetParameter(name="tiny")
    lp = msg.layer.add(name="conv")
    for b in weights["conv"]:
        lp.blobs.add().CopyFrom(array_to_blobproto(b))
    net = load_net(*write_tiny(tmp_path, msg))
    assert net.layer("fc").blobs == []
    assert any("no weights" in n and "fc" in n for n in net.notes)


# ---------------------------------------------------------------------------
# SSD fork layers and unknown layer types

SSD = """name: "ssd_snippet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 300 dim: 300 } } }
layer { name: "conv4_3" type: "Convolution" bottom: "data" top: "conv4_3"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 8 } }
layer { name: "relu4_3" type: "ReLU" bottom: "conv4_3" top: "conv4_3" }
layer { name: "conv4_3_norm" type: "Normalize" bottom: "conv4_3" top: "conv4_3_norm"
  norm_param { across_spatial: false scale_filler { type: "constant" value: 20 } channel_shared: false } }
layer { name: "loc" type: "Convolution" bottom: "conv4_3_norm" top: "loc"
  convolution_param { num_output: 16 pad: 1 kernel_size: 3 } }
layer { name: "loc_perm" type: "Permute" bottom: "loc" top: "loc_perm"
  permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "loc_flat" type: "Flatten" bottom: "loc_perm" top: "loc_flat" flatten_param { axis: 1 } }
layer { name: "conf" type: "Convolution" bottom: "conv4_3_norm" top: "conf"
  convolution_param { num_output: 84 pad: 1 kernel_size: 3 } }
layer { name: "conf_perm" type: "Permute" bottom: "conf" top: "conf_perm"
  permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conf_flat" type: "Flatten" bottom: "conf_perm" top: "conf_flat" flatten_param { axis: 1 } }
layer { name: "priorbox" type: "PriorBox" bottom: "conv4_3_norm" bottom: "data" top: "priorbox"
  prior_box_param { min_size: 30.0 max_size: 60.0 aspect_ratio: 2 flip: true clip: false
    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: 8 offset: 0.5 } }
layer { name: "conf_reshape" type: "Reshape" bottom: "conf_flat" top: "conf_reshape"
  reshape_param { shape { dim: 0 dim: -1 dim: 21 } } }
layer { name: "conf_softmax" type: "Softmax" bottom: "conf_reshape" top: "conf_softmax"
  softmax_param { axis: 2 } }
layer { name: "conf_flatten" type: "Flatten" bottom: "conf_softmax" top: "conf_flatten"
  flatten_param { axis: 1 } }
layer { name: "detection_out" type: "DetectionOutput"
  bottom: "loc_flat" bottom: "conf_flatten" bottom: "priorbox" top: "detection_out"
  include { phase: TEST }
  detection_output_param { num_classes: 21 share_location: true background_label_id: 0
    nms_param { nms_threshold: 0.45 top_k: 400 } code_type: CENTER_SIZE keep_top_k: 200
    confidence_threshold: 0.01 } }
"""


def random_weights(net, seed=0):
    rng = np.random.default_rng(seed)
    shapes = infer_shapes(net)
    for layer in net.layers:
        layer.blobs = [(0.1 * rng.standard_normal(s)).astype(np.float32)
                       for s in expected_weight_shapes(net, layer, shapes) or []]
    validate(net)
    return net


def test_ssd_layers_shapes_and_round_trip(tmp_path):
    path = tmp_path / "ssd.prototxt"
    path.write_text(SSD)
    net = random_weights(load_net(path))
    shapes = infer_shapes(net).blobs
    # 38x38 feature map, priors: aspect ratios {1, 2, 1/2} x 1 min_size + 1 max_size = 4
    assert shapes["conv4_3_norm"] == (1, 8, 38, 38)
    assert shapes["priorbox"] == (1, 2, 38 * 38 * 4 * 4)
    assert shapes["loc_perm"] == (1, 38, 38, 16) and shapes["loc_flat"] == (1, 38 * 38 * 16)
    assert shapes["conf_reshape"] == (1, 38 * 38 * 4, 21)
    assert shapes["detection_out"] is None  # data-dependent
    assert [b.shape for b in net.layer("conv4_3_norm").blobs] == [(8,)]
    # the fork's parameters survive a write/read round trip untouched
    save_net(net, tmp_path / "w.prototxt", tmp_path / "w.caffemodel")
    back = load_net(tmp_path / "w.prototxt", tmp_path / "w.caffemodel")
    assert back.to_proto() == net.to_proto()
    src = text_format.Parse(SSD, pb.NetParameter())
    for lp, layer in zip(src.layer, back.layers):
        for f in ("norm_param", "permute_param", "prior_box_param", "detection_output_param", "include"):
            assert getattr(layer.msg, f) == getattr(lp, f), (layer.name, f)
    for a, b in zip(net.layers, back.layers):
        assert all(x.tobytes() == y.tobytes() for x, y in zip(a.blobs, b.blobs))
    # OpenCV (which implements the SSD layers) agrees on every shape we know
    cv2 = pytest.importorskip("cv2")
    cvnet = cv2.dnn.readNetFromCaffe(str(tmp_path / "w.prototxt"), str(tmp_path / "w.caffemodel"))
    cvnet.setInput(np.random.default_rng(0).standard_normal((1, 3, 300, 300)).astype(np.float32), "data")
    known = [lr.name for lr in back.layers[1:] if shapes[lr.tops[0]] is not None and not lr.in_place]
    for name, out in zip(known, cvnet.forward(known)):
        assert out.shape == shapes[name], name


UNKNOWN = """name: "custom"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "mystery" type: "MyCustomUpsample" bottom: "conv" top: "up" top: "aux" }
layer { name: "relu" type: "ReLU" bottom: "up" top: "up" }
layer { name: "fc" type: "InnerProduct" bottom: "up" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "side" type: "Pooling" bottom: "conv" top: "side" pooling_param { pool: AVE global_pooling: true } }
"""


def test_unknown_layer_type_makes_downstream_unknown(tmp_path):
    path = tmp_path / "custom.prototxt"
    path.write_text(UNKNOWN)
    net = load_net(path)
    shapes = validate(net).blobs
    assert shapes["conv"] == (1, 4, 6, 6) and shapes["side"] == (1, 4, 1, 1)
    assert shapes["up"] is None and shapes["aux"] is None and shapes["fc"] is None
    # an unknown layer keeps whatever blobs the file gives it, and writes them back
    net.layer("conv").blobs = [np.ones((4, 3, 3, 3), np.float32), np.zeros(4, np.float32)]
    net.layer("mystery").blobs = [np.arange(6, dtype=np.float32).reshape(2, 3)]
    save_net(net, tmp_path / "o.prototxt", tmp_path / "o.caffemodel")
    back = load_net(tmp_path / "o.prototxt", tmp_path / "o.caffemodel")
    assert back.layer("mystery").type == "MyCustomUpsample"
    np.testing.assert_array_equal(back.layer("mystery").blobs[0], net.layer("mystery").blobs[0])
    assert back.to_proto() == net.to_proto()


def test_ir_built_by_hand_writes_and_reads(tmp_path):
    """A net built in code (no file) writes and reads back equal."""
    inp = Layer("data", "Input", [], ["data"])
    inp.msg.input_param.shape.add().dim.extend([2, 6])
    fc = Layer("fc", "InnerProduct", ["data"], ["fc"])
    fc.msg.inner_product_param.num_output = 3
    fc.blobs = [np.full((3, 6), 0.5, np.float32), np.array([1, 2, 3], np.float32)]
    net = Net("hand", [inp, fc])
    validate(net)
    save_net(net, tmp_path / "h.prototxt", tmp_path / "h.caffemodel")
    back = load_net(tmp_path / "h.prototxt", tmp_path / "h.caffemodel")
    assert back.to_proto(with_blobs=True) == net.to_proto(with_blobs=True)


def test_input_layer_without_shape_is_unknown_until_given(tmp_path):
    path = tmp_path / "noshape.prototxt"
    path.write_text('layer { name: "data" type: "Input" top: "data" }\n'
                    'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                    'convolution_param { num_output: 2 kernel_size: 3 } }\n')
    net = load_net(path)
    assert infer_shapes(net).blobs == {"data": None, "c": None}
    assert infer_shapes(net, {"data": (1, 3, 8, 8)}).blobs["c"] == (1, 2, 6, 6)
