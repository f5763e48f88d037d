"""ONNX lowering of Caffe's element-wise activations Exp, Log, BNLL, Threshold, Clip, Swish
and ReLU6, checked by onnxruntime against an independent consumer.

Each case is a one-layer net (Input 1x3x4x5 -> the layer) exported at opsets 11 and 13,
passing ``onnx.checker.check_model(full_check=True)``; 1e-5 relative (max abs error / max
abs reference).

* Against OpenCV's Caffe reader (``cv2.dnn.readNetFromCaffe`` on the files ``save_net``
  writes) where OpenCV 4.x has the layer AND honours its parameters: Exp (base/scale/shift),
  BNLL, ReLU6, Log with default log_param, Swish with the default beta. OpenCV's result is
  also checked against Caffe's formula, so the two references agree.
* Against Caffe's formula from its C++ source, computed in float64 numpy, where OpenCV
  cannot serve: it has no Threshold nor Clip layer ("Can't create layer"), and its Log and
  Swish ignore log_param and swish_param.beta (measured with OpenCV 4.14).

HardSigmoid stays unlowered (caffe.proto has no parameters for it): the CLI refuses it with
one line that does not list it among the lowered types.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import run_cli

from lrprune_caffe.io.caffe import read_net, save_net
from lrprune_caffe.ir.layers import get_spec
from lrprune_caffe.export.onnx import export_model, lowered_types
from lrprune_caffe.engines.runtime import ort_session

TOL = 1e-5
OPSETS = [11, 13]
SHAPE = (1, 3, 4, 5)
NEW_TYPES = ["Exp", "Log", "BNLL", "Threshold", "Clip", "Swish", "ReLU6"]


# ---- Caffe's forward formulas (BVLC src/caffe/layers/*_layer.cpp), float64 ----------------

def sigmoid(z):
    return 0.5 * np.tanh(0.5 * z) + 0.5  # sigmoid_layer.cpp


def caffe_exp(x, base=-1.0, scale=1.0, shift=0.0):
    """exp_layer.cpp: y = base^(shift + scale*x), base -1 meaning e."""
    log_base = 1.0 if base == -1 else np.log(base)
    return np.exp(log_base * (shift + scale * x))


def caffe_log(x, base=-1.0, scale=1.0, shift=0.0):
    """log_layer.cpp: y = log_base(shift + scale*x), base -1 meaning e."""
    log_base = 1.0 if base == -1 else np.log(base)
    return np.log(shift + scale * x) / log_base


def caffe_bnll(x):
    """bnll_layer.cpp: x > 0 ? x + log(1 + exp(-x)) : log(1 + exp(x))."""
    return np.where(x > 0, x + np.log1p(np.exp(-np.abs(x))), np.log1p(np.exp(np.minimum(x, 0))))


def caffe_threshold(x, threshold=0.0):
    """threshold_layer.cpp: (x > threshold) ? 1 : 0."""
    return (x > threshold).astype(np.float64)


def caffe_clip(x, lo, hi):
    """clip_layer.cpp: std::max(min, std::min(x, max))."""
    return np.maximum(lo, np.minimum(x, hi))


def caffe_swish(x, beta=1.0):
    """swish_layer.cpp: x * sigmoid(beta * x)."""
    return x * sigmoid(beta * x)


def caffe_relu6(x):
    """relu6_layer.cpp (the forks that add it): std::min(std::max(x, 0), 6)."""
    return np.minimum(np.maximum(x, 0.0), 6.0)


# ---- helpers --------------------------------------------------------------------------------

def one_layer_net(tmp_path, ltype, params="", name="act"):
    text = (f'name: "one"\n'
            f'layer {{ name: "data" type: "Input" top: "data" '
            f'input_param {{ shape {{ {" ".join(f"dim: {d}" for d in SHAPE)} }} }} }}\n'
            f'layer {{ name: "{name}" type: "{ltype}" bottom: "data" top: "{name}" {params} }}\n')
    p = tmp_path / "one.prototxt"
    p.write_text(text)
    return read_net(p)


def rel_err(got, want) -> float:
    want = np.asarray(want, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64).reshape(want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def run_onnx(net, x, opset, outputs=("act",)):
    model = export_model(net, opset=opset, extra_outputs=list(outputs))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == opset
    sess = ort_session(model.SerializeToString(), 1)
    return dict(zip(outputs, sess.run(list(outputs), {"data": x})))


def run_opencv(tmp_path, net, x, layer="act"):
    cv2 = pytest.importorskip("cv2")
    proto, weights = tmp_path / "cv.prototxt", tmp_path / "cv.caffemodel"
    save_net(net, proto, weights)
    cvnet = cv2.dnn.readNetFromCaffe(str(proto), str(weights))
    cvnet.setInput(x, "data")
    return cvnet.forward(layer)


def inputs(kind, seed=0):
    """float32 inputs of SHAPE: 'normal', 'wide' (x30: both BNLL branches, exp/log tails),
    'positive' (for Log's default domain), 'relu6' (x5: both clamps hit)."""
    x = np.random.default_rng(seed).standard_normal(SHAPE)
    if kind == "wide":
        x = x * 30
    elif kind == "positive":
        x = np.abs(x) + 0.05
    elif kind == "relu6":
        x = x * 5
    return np.ascontiguousarray(x, dtype=np.float32)


# ---- against OpenCV's Caffe reader ------------------------------------------------------------

OPENCV_CASES = {
    # id: (type, params, input kind, Caffe formula)
    "exp_base2": ("Exp", "exp_param { base: 2 scale: 0.5 shift: 0.3 }", "normal",
                  lambda x: caffe_exp(x, 2, 0.5, 0.3)),
    "exp_e_shift": ("Exp", "exp_param { scale: -0.7 shift: 0.4 }", "normal",
                    lambda x: caffe_exp(x, -1, -0.7, 0.4)),
    "log_default": ("Log", "", "positive", caffe_log),
    "bnll": ("BNLL", "", "wide", caffe_bnll),
    "relu6": ("ReLU6", "", "relu6", caffe_relu6),
    "swish_default": ("Swish", "", "normal", caffe_swish),
}


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("case", list(OPENCV_CASES))
def test_matches_opencv(tmp_path, case, opset):
    ltype, params, kind, formula = OPENCV_CASES[case]
    net = one_layer_net(tmp_path, ltype, params)
    x = inputs(kind)
    ref = run_opencv(tmp_path, net, x)
    assert rel_err(ref, formula(x.astype(np.float64))) <= TOL, "OpenCV and Caffe's formula disagree"
    got = run_onnx(net, x, opset)["act"]
    assert got.shape == SHAPE
    assert rel_err(got, ref) <= TOL, f"{case} opset {opset}: {rel_err(got, ref)}"


# ---- against Caffe's formula where OpenCV cannot serve -------------------------------------

def _at_threshold(x):
    x = x.copy()
    x.reshape(-1)[::7] = np.float32(0.2)  # x == threshold gives 0 (strict >)
    return x


FORMULA_CASES = {
    # id: (type, params, input kind, input tweak, Caffe formula); why not OpenCV: see docstring
    "log_base3": ("Log", "log_param { base: 3 scale: 0.7 shift: 4 }", "normal", None,
                  lambda x: caffe_log(x, 3, 0.7, 4)),
    "log_base10_scale": ("Log", "log_param { base: 10 scale: 2 }", "positive", None,
                         lambda x: caffe_log(x, 10, 2, 0)),
    # Caffe compares in float: threshold is float32(0.2), and x == it gives 0
    "threshold": ("Threshold", "threshold_param { threshold: 0.2 }", "normal", _at_threshold,
                  lambda x: caffe_threshold(x, float(np.float32(0.2)))),
    "clip": ("Clip", "clip_param { min: -0.5 max: 0.7 }", "normal", None,
             lambda x: caffe_clip(x, -0.5, 0.7)),
    "clip_min_above_max": ("Clip", "clip_param { min: 0.3 max: -0.2 }", "normal", None,
                           lambda x: caffe_clip(x, 0.3, -0.2)),  # Caffe: min everywhere
    "swish_beta": ("Swish", "swish_param { beta: 1.7 }", "normal", None,
                   lambda x: caffe_swish(x, 1.7)),
    "exp_base3_wide": ("Exp", "exp_param { base: 3 scale: 0.1 shift: -0.5 }", "wide", None,
                       lambda x: caffe_exp(x, 3, 0.1, -0.5)),
}


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("case", list(FORMULA_CASES))
def test_matches_caffe_formula(tmp_path, case, opset):
    ltype, params, kind, tweak, formula = FORMULA_CASES[case]
    net = one_layer_net(tmp_path, ltype, params)
    x = inputs(kind, seed=1)
    if tweak is not None:
        x = tweak(x)
    ref = formula(x.astype(np.float64))
    assert np.isfinite(ref).all()
    got = run_onnx(net, x, opset)["act"]
    assert rel_err(got, ref) <= TOL, f"{case} opset {opset}: {rel_err(got, ref)}"
    if ltype == "Threshold":
        assert set(np.unique(got)) <= {0.0, 1.0} and (got.reshape(-1)[::7] == 0).all()


def test_in_place_chain_with_dynamic_batch(tmp_path):
    """All new types in place on one blob (Caffe's usual style), batch dynamic, run at 3."""
    text = """
name: "chain"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 5 } } }
layer { name: "ip" type: "Power" bottom: "data" top: "b" power_param { scale: 1 } }
layer { name: "sw" type: "Swish" bottom: "b" top: "b" swish_param { beta: 0.5 } }
layer { name: "cl" type: "Clip" bottom: "b" top: "b" clip_param { min: -1 max: 2 } }
layer { name: "ex" type: "Exp" bottom: "b" top: "b" exp_param { base: 2 shift: 1 } }
layer { name: "lg" type: "Log" bottom: "b" top: "b" log_param { base: 5 scale: 3 shift: -1 } }
layer { name: "bn" type: "BNLL" bottom: "b" top: "b" }
layer { name: "r6" type: "ReLU6" bottom: "b" top: "b" }
layer { name: "th" type: "Threshold" bottom: "b" top: "t" threshold_param { threshold: 1.5 } }
"""
    p = tmp_path / "chain.prototxt"
    p.write_text(text)
    net = read_net(p)
    x = np.random.default_rng(3).standard_normal((3, 3, 4, 5)).astype(np.float32) * 2
    b = caffe_swish(x.astype(np.float64), 0.5)
    b = caffe_clip(b, -1, 2)
    b = caffe_exp(b, 2, 1, 1)
    b = caffe_log(b, 5, 3, -1)
    b = caffe_bnll(b)
    b = caffe_relu6(b)
    ref = {"b": b, "t": caffe_threshold(b, 1.5)}
    for opset in OPSETS:
        model = export_model(net, opset=opset, dynamic_batch=True, extra_outputs=["b"])
        onnx.checker.check_model(model, full_check=True)
        res = dict(zip(["t", "b"], ort_session(model.SerializeToString(), 1).run(["t", "b"], {"data": x})))
        for k in ref:
            assert rel_err(res[k], ref[k]) <= TOL, (k, opset, rel_err(res[k], ref[k]))


# ---- lowered_types() tells the truth ----------------------------------------------------------

def test_lowered_types_lists_what_exports(tmp_path):
    """Every element-wise type in lowered_types() exports; HardSigmoid is not listed."""
    lowered = lowered_types()
    for t in NEW_TYPES + ["Silence"]:
        assert t in lowered, t
    assert "HardSigmoid" not in lowered
    assert not get_spec("HardSigmoid").lowers()
    params = {"Clip": "clip_param { min: 0 max: 1 }"}
    for t in ("ReLU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log", "BNLL", "Threshold",
              "Dropout", "ELU", "Clip", "Swish", "ReLU6", "HardSigmoid", "Silence"):
        if t in lowered:
            d = tmp_path / t
            d.mkdir()
            export_model(one_layer_net(d, t, params.get(t, "")))  # must not raise


HARD_SIGMOID = """
name: "hs"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 5 } } }
layer { name: "hs" type: "HardSigmoid" bottom: "data" top: "hs" }
"""


def test_unlowered_type_cli_error(tmp_path, capsys):
    src = tmp_path / "src.prototxt"
    src.write_text(HARD_SIGMOID)
    proto, weights = tmp_path / "hs.prototxt", tmp_path / "hs.caffemodel"
    save_net(read_net(src), proto, weights)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, out, err = run_cli(capsys, "export-onnx", proto, weights, "-o", out_dir / "x.onnx")
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert "layer 'hs' (HardSigmoid)" in line and "no ONNX lowering for layer type 'HardSigmoid'" in line
    listed = line.split("(lowered types: ", 1)[1].rstrip(")").split(", ")
    assert "HardSigmoid" not in listed and "BNLL" in listed and "Clip" in listed
    assert list(out_dir.iterdir()) == []


def test_clip_without_bounds_is_refused(tmp_path):
    """No clip_param: Caffe would clip to [0, 0] (proto defaults); refused instead."""
    from lrprune_caffe.errors import UserError
    net = one_layer_net(tmp_path, "Clip", "")
    with pytest.raises(UserError, match="clip_param needs both min and max") as e:
        export_model(net)
    assert "layer 'act' (Clip)" in str(e.value)


@pytest.mark.parametrize("ltype,params,what", [
    ("Log", "log_param { base: 1 }", "base 1"),
    ("Log", "log_param { base: -2 }", "strictly positive"),
    ("Exp", "exp_param { base: 0 }", "strictly positive"),
])
def test_bases_caffe_rejects_are_refused(tmp_path, ltype, params, what):
    from lrprune_caffe.errors import UserError
    net = one_layer_net(tmp_path, ltype, params)
    with pytest.raises(UserError, match=what):
        export_model(net)
