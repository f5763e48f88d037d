"""ONNX export checked by real runtimes: onnxruntime (and MNN where it installs) against
the blobs real Caffe computed (../shared/golden), and OpenCV's Caffe reader for layers
the golden corpus does not cover.

Every golden case, at opsets 11, 13 and the highest the installed onnx knows; every
non-split golden blob is exposed as a graph output and compared (1e-4 relative: max
abs error / max abs golden). Also: compressed (full-rank SVD-factorized) versions of
each case, --fold-bn, --dynamic-batch on LeNet's 1,000 digits, names, and bad input.
"""

from __future__ import annotations

import copy
import functools
import os

import numpy as np
import onnx
import onnxruntime
import pytest

from conftest import GOLDEN_CASES, golden_case, load_npz

from lrprune_caffe.ir.analysis import expected_weight_shapes, validate
from lrprune_caffe.io.caffe import load_net, read_net, save_net
from lrprune_caffe.cli.main import main
from lrprune_caffe.errors import UserError
from lrprune_caffe.ir.net import Layer, clone_msg
from lrprune_caffe.ir.layers.conv import conv_geometry, set_conv_geometry
from lrprune_caffe.export.onnx import export_model, max_opset, save_onnx
from lrprune_caffe.engines.runtime import ort_session, run_net

TOL = 1e-4
OPSETS = [11, 13, max_opset()]


# ---- helpers -------------------------------------------------------------------------------

def rel_err(got, want) -> float:
    want = np.asarray(want, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64).reshape(want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def golden(case):
    d = golden_case(case)
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    return net, load_npz(d / "inputs.npz"), load_npz(d / "blobs.npz")


def comparable_blobs(net, blobs) -> list:
    """Golden blobs that are the net's own (not Caffe's auto-inserted splits, not inputs)."""
    tops = {t for layer in net.layers for t in layer.tops}
    names = [k for k in blobs if k in tops and k not in net.inputs()]
    return names


def run_model(model, inputs, outputs=None, threads=1):
    sess = ort_session(model.SerializeToString(), threads)
    outputs = outputs or [o.name for o in model.graph.output]
    return dict(zip(outputs, sess.run(outputs, {k: np.ascontiguousarray(v, np.float32)
                                                for k, v in inputs.items()})))


def assert_matches(res, ref, names, tol=TOL, what=""):
    bad = {n: rel_err(res[n], ref[n]) for n in names}
    bad = {n: e for n, e in bad.items() if not e <= tol}
    assert not bad, f"{what}: blobs off by more than {tol} relative: {bad}"


def check_and_run(net, inputs, blobs, opset, dynamic=False, fold_bn=False, names=None):
    names = comparable_blobs(net, blobs) if names is None else names
    model = export_model(net, opset=opset, dynamic_batch=dynamic, fold_bn=fold_bn, extra_outputs=names)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:  # pragma: no cover - shows which node
        pytest.fail(f"check_model: {e}")
    if opset > 13 and not ort_loads_opset(opset):  # an older runtime may not know the newest opset
        pytest.skip(f"onnxruntime {onnxruntime.__version__} cannot load a one-node model at opset {opset}")
    return model, run_model(model, inputs, names), names


@functools.lru_cache(maxsize=None)
def ort_loads_opset(opset: int) -> bool:
    """Whether onnxruntime loads a one-node Identity model at ``opset``: decided apart from our
    exporter, so a failure of an exported model is never mistaken for the runtime's age."""
    from onnx import TensorProto, helper
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, NotImplemented
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    ops = [helper.make_opsetid("", opset)]
    m = helper.make_model(g, opset_imports=ops, ir_version=helper.find_min_ir_version_for(ops))
    try:
        ort_session(m.SerializeToString())
    except (Fail, InvalidGraph, NotImplemented):
        return False
    return True


# ---- every golden case, every opset --------------------------------------------------------

@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_case_matches_caffe(case, opset):
    net, inputs, blobs = golden(case)
    # every golden blob is either ours or one of Caffe's auto-inserted splits
    tops = {t for layer in net.layers for t in layer.tops}
    assert all(k in tops or "_split_" in k for k in blobs), sorted(set(blobs) - tops)
    lenet = case.startswith("lenet")  # LeNet: all 1,000 digits in one dynamic batch
    model, res, names = check_and_run(net, inputs, blobs, opset, dynamic=lenet)
    assert names, "no golden blob to compare"
    assert_matches(res, blobs, names, what=f"{case} opset {opset}")
    assert model.opset_import[0].version == opset
    assert model.ir_version == onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])
    init = {t.name for t in model.graph.initializer}
    assert not init & {i.name for i in model.graph.input}, "weights must not be graph inputs"
    assert [o.name for o in model.graph.output][:len(net.outputs())] == net.outputs()
    if lenet:
        labels = load_npz(golden_case(case) / "labels.npz")["labels"]
        assert res["prob"].shape[0] == 1000
        acc = float((res["prob"].argmax(1) == labels).mean())
        assert acc == pytest.approx(0.973, abs=1e-9)  # real Caffe's top-1 on these digits


def test_lenet_cli_dynamic_batch_all_digits(tmp_path, capsys):
    d = golden_case("lenet_mnist")
    out = tmp_path / "lenet.onnx"
    rc = main(["export-onnx", str(d / "model.prototxt"), str(d / "model.caffemodel"), "-o", str(out),
               "--dynamic-batch"])
    assert rc == 0, capsys.readouterr().err
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "N"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    inputs, blobs = load_npz(d / "inputs.npz"), load_npz(d / "blobs.npz")
    res = run_model(model, inputs)
    assert res["prob"].shape == (1000, 10)
    assert rel_err(res["prob"], blobs["prob"]) <= TOL
    # and a batch of 7 (neither 1 nor 1000) works too
    res7 = run_model(model, {"data": inputs["data"][:7]})
    assert rel_err(res7["prob"], blobs["prob"][:7]) <= TOL


# ---- compressed versions: a conv replaced by two convs from a full-rank SVD ----------------

def _conv_layer(name, bottom, top, template, num_output, bias, kernel, stride, pad, dilation, blobs):
    msg = clone_msg(template.msg)
    cp = msg.convolution_param
    cp.num_output = num_output
    cp.bias_term = bias
    cp.group = 1
    set_conv_geometry(cp, kernel, stride, pad, dilation)
    del msg.param[:]
    return Layer(name, "Convolution", [bottom], [top], msg, [b.astype(np.float32) for b in blobs])


def factorize_full_rank(net):
    """Every group-1 conv split in two at full rank, exactly (up to rounding):

    * k x k kernels: spatial SVD (Jaderberg, Vedaldi & Zisserman 2014, scheme 2), a
      (kh x 1) conv to r = min(C*kh, N*kw) channels, then a (1 x kw) conv;
    * 1 x 1 kernels: channel SVD, a 1 x 1 conv to r = min(N, C) channels, then 1 x 1.

    Stands in for the factorization pass until ``lrprune_caffe.lowrank`` lands.
    """
    net = net.copy()
    layers = []
    count = 0
    for layer in net.layers:
        if layer.type != "Convolution" or len(layer.bottoms) != 1 or not layer.blobs:
            layers.append(layer)
            continue
        g = conv_geometry(layer)
        if g.group != 1:
            layers.append(layer)
            continue
        w = layer.blobs[0].astype(np.float64)
        n, c, kh, kw = w.shape
        bias = layer.blobs[1:] if g.bias else []
        mid = f"{layer.name}_lr"
        if kh > 1 and kw > 1:
            m = w.transpose(1, 2, 0, 3).reshape(c * kh, n * kw)
            u, s, vt = np.linalg.svd(m, full_matrices=False)
            r = s.size
            first = (u * np.sqrt(s)).T.reshape(r, c, kh, 1)
            second = (np.sqrt(s)[:, None] * vt).reshape(r, n, kw).transpose(1, 0, 2).reshape(n, r, 1, kw)
            a = _conv_layer(mid, layer.bottoms[0], mid, layer, r, False, (kh, 1), (g.stride[0], 1),
                            (g.pad[0], 0), (g.dilation[0], 1), [first])
            b = _conv_layer(layer.name, mid, layer.tops[0], layer, n, g.bias, (1, kw), (1, g.stride[1]),
                            (0, g.pad[1]), (1, g.dilation[1]), [second, *bias])
        else:
            m = w.reshape(n, c * kh * kw)
            u, s, vt = np.linalg.svd(m, full_matrices=False)
            r = s.size
            first = (np.sqrt(s)[:, None] * vt).reshape(r, c, kh, kw)
            second = (u * np.sqrt(s)).reshape(n, r, 1, 1)
            a = _conv_layer(mid, layer.bottoms[0], mid, layer, r, False, (kh, kw), g.stride, g.pad,
                            g.dilation, [first])
            b = _conv_layer(layer.name, mid, layer.tops[0], layer, n, g.bias, (1, 1), (1, 1), (0, 0),
                            (1, 1), [second, *bias])
        layers += [a, b]
        count += 1
    net.layers = layers
    validate(net)
    return net, count


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_compressed_golden_case_matches_caffe(case):
    net, inputs, blobs = golden(case)
    small, count = factorize_full_rank(net)
    assert count >= 1
    lenet = case.startswith("lenet")
    if lenet:
        inputs = {k: v[:50] for k, v in inputs.items()}
        blobs = {k: v[:50] for k, v in blobs.items()}
    for opset in (11, 13):
        _, res, names = check_and_run(small, inputs, blobs, opset, dynamic=lenet)
        assert_matches(res, blobs, names, what=f"factorized {case} opset {opset}")


def _project_factorize(net, full_rank: bool):
    """The project's own factorize pass on every factorizable layer, schemes in rotation."""
    from lrprune_caffe.transforms import Precondition, run_pass
    from lrprune_caffe.transforms.factorize import LayerPlan, layer_info
    from lrprune_caffe.ir.analysis import infer_shapes
    shapes = infer_shapes(net)
    plan, schemes = {}, ["spatial", "channel", "tucker2"]
    for layer in net.layers:
        if layer.type not in ("Convolution", "InnerProduct"):
            continue
        try:
            info = layer_info(layer, shapes.inputs[layer.name][0], shapes.outputs[layer.name][0])
        except Precondition:
            continue  # depthwise, several bottoms...: not factorized
        if info.kind == "ip" and min(info.n_out, info.c_in) > 256:
            continue  # keeps the suite fast: big FC SVDs add seconds, not lowering coverage
        scheme = schemes[len(plan) % 3]
        if info.kind == "conv" and scheme == "spatial" and info.kernel == (1, 1):
            scheme = "channel"
        maxr = info.max_ranks(info.scheme_for(scheme))
        ranks = tuple(maxr) if full_rank else tuple(max(1, m // 2) for m in maxr)
        plan[layer.name] = LayerPlan(scheme, ranks)
    small = net.copy()
    res = run_pass("factorize", small, plan=plan)
    assert res.changed, res.reason
    return small


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_project_factorized_golden_case(case):
    """Full rank: the chain computes the original layer, so golden blobs still hold.
    Half rank: the ONNX file means what OpenCV's Caffe reader makes of the written Caffe files."""
    net, inputs, blobs = golden(case)
    if case.startswith("lenet"):
        inputs = {k: v[:20] for k, v in inputs.items()}
        blobs = {k: v[:20] for k, v in blobs.items()}
    full = _project_factorize(net, full_rank=True)
    _, res, names = check_and_run(full, inputs, blobs, 13, dynamic=case.startswith("lenet"))
    assert_matches(res, blobs, names, what=f"full-rank factorized {case}")
    half = _project_factorize(net, full_rank=False)
    out = half.outputs()
    ref = run_net(half, inputs, out, engine="opencv")
    _, res, _ = check_and_run(half, inputs, ref, 13, dynamic=case.startswith("lenet"), names=out)
    assert_matches(res, ref, out, what=f"half-rank factorized {case} vs OpenCV")


# ---- --fold-bn ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["resnet_mini", "mobilenet_mini"])
def test_fold_bn_keeps_outputs(case):
    net, inputs, blobs = golden(case)
    before = [(layer.name, [b.copy() for b in layer.blobs]) for layer in net.layers]
    n_bn = sum(layer.type == "BatchNorm" for layer in net.layers)
    for opset in (11, 13):
        model, res, names = check_and_run(net, inputs, blobs, opset, fold_bn=True)
        ops = [n.op_type for n in model.graph.node]
        assert "BatchNormalization" not in ops and n_bn > 0
        assert ops.count("Mul") == 0, "every Scale after a BatchNorm folds too"
        assert_matches(res, blobs, names, what=f"{case} --fold-bn opset {opset}")
    # the caller's net is untouched
    assert [(layer.name, layer.blobs) for layer in net.layers].__len__() == len(before)
    for layer, (name, blobs0) in zip(net.layers, before):
        assert layer.name == name and all(np.array_equal(a, b) for a, b in zip(layer.blobs, blobs0))


def test_fold_bn_pass_folds_and_reports():
    from lrprune_caffe.transforms import run_pass, fold_bn as fb
    net, inputs, blobs = golden("resnet_mini")
    assert "Before" in fb.__doc__ and "After" in fb.__doc__ and "Precondition" in fb.__doc__ \
        and "Formula" in fb.__doc__
    res = run_pass("fold_bn", net)
    assert res.changed and len(res.details) == 12 and all(d["folded"] for d in res.details)
    assert not any(layer.type in ("BatchNorm", "Scale") for layer in net.layers)
    out = run_net(net, inputs, ["prob", "res3a"])  # the folded IR itself, on onnxruntime
    assert rel_err(out["prob"], blobs["prob"]) <= TOL and rel_err(out["res3a"], blobs["res3a"]) <= TOL
    # the folded Caffe files mean the same to OpenCV's Caffe reader
    ref = run_net(net, inputs, ["prob"], engine="opencv")
    assert rel_err(ref["prob"], blobs["prob"]) <= TOL


BN_BRANCH = """
name: "bnbranch"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "c"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "c" top: "b" }
layer { name: "also" type: "ReLU" bottom: "c" top: "r" }
layer { name: "sum" type: "Eltwise" bottom: "b" bottom: "r" top: "out" }
"""

NO_BN = """
name: "nobn"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "c"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
"""

BN_NOT_IN_PLACE = """
name: "bnchain"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "c"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_term: true } }
layer { name: "bn" type: "BatchNorm" bottom: "c" top: "b" batch_norm_param { eps: 0.01 } }
layer { name: "sc" type: "Scale" bottom: "b" top: "s" scale_param { bias_term: false } }
layer { name: "relu" type: "ReLU" bottom: "s" top: "s" }
"""


def synthetic_net(tmp_path, text, seed=0, name="net"):
    """A net from prototxt text with seeded random weights (BatchNorm: positive variance, factor 3)."""
    p = tmp_path / f"{name}.prototxt"
    p.write_text(text)
    net = read_net(p)
    shapes = validate(net, weights=False)
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        ws = expected_weight_shapes(net, layer, shapes) or []
        if layer.type == "BatchNorm":
            c = ws[0][0]
            factor = 0.0 if "zero_factor" in layer.name else 3.0
            layer.blobs = [(rng.standard_normal(c) * 3).astype(np.float32),
                           ((rng.random(c) * 2 + 0.5) * 3).astype(np.float32),
                           np.array([factor], np.float32)]
        else:
            layer.blobs = [rng.standard_normal(s).astype(np.float32) for s in ws]
    validate(net)
    return net


def test_fold_bn_precondition_leaves_net_untouched(tmp_path):
    from lrprune_caffe.transforms import run_pass
    from lrprune_caffe.transforms import fold_bn  # noqa: F401
    for text, why in ((BN_BRANCH, "also read by 'also'"), (NO_BN, "no BatchNorm")):
        net = synthetic_net(tmp_path, text)
        snapshot = net.copy()
        res = run_pass("fold_bn", net)
        assert not res.changed and why in res.reason
        assert [layer.name for layer in net.layers] == [layer.name for layer in snapshot.layers]
        assert all(np.array_equal(a, b) for l1, l2 in zip(net.layers, snapshot.layers)
                   for a, b in zip(l1.blobs, l2.blobs))
    # the export still works, BatchNorm kept as a BatchNormalization node
    net = synthetic_net(tmp_path, BN_BRANCH)
    rep = {}
    model = export_model(net, fold_bn=True, report=rep)
    assert not rep["fold_bn"]["changed"]
    assert "BatchNormalization" in [n.op_type for n in model.graph.node]


def test_fold_bn_not_in_place_matches_opencv(tmp_path):
    from lrprune_caffe.transforms import run_pass
    from lrprune_caffe.transforms import fold_bn  # noqa: F401
    net = synthetic_net(tmp_path, BN_NOT_IN_PLACE)
    x = {"data": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    ref = run_net(net, x, ["relu"], engine="opencv")["relu"]  # OpenCV names outputs by layer
    folded = net.copy()
    res = run_pass("fold_bn", folded)
    assert res.changed and [layer.type for layer in folded.layers] == ["Input", "Convolution", "ReLU"]
    assert folded.layers[1].tops == ["s"]
    assert rel_err(run_net(folded, x, ["s"])["s"], ref) <= TOL
    assert rel_err(run_net(folded, x, ["relu"], engine="opencv")["relu"], ref) <= TOL


# ---- layers the golden corpus does not cover, against OpenCV's Caffe reader ----------------

EXTRAS = """
name: "Extras"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 dim: 7 dim: 9 } } }
layer { name: "sm1" type: "Softmax" bottom: "data" top: "sm1" }
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param { eps: 0.001 } }
layer { name: "bn_zero_factor" type: "BatchNorm" bottom: "data" top: "bn_zero_factor" }
layer { name: "sc_ax" type: "Scale" bottom: "bn" top: "sc_ax" scale_param { axis: 1 num_axes: 2 bias_term: true } }
layer { name: "prelu_s" type: "PReLU" bottom: "sc_ax" top: "sc_ax" prelu_param { channel_shared: true } }
layer { name: "pool_in" type: "Pooling" bottom: "sc_ax" top: "pool_in"
  pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "pool_ceil" type: "Pooling" bottom: "sc_ax" top: "pool_ceil"
  pooling_param { pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 2 pad_h: 1 pad_w: 1 } }
layer { name: "pool_ave_ceil" type: "Pooling" bottom: "sc_ax" top: "pool_ave_ceil"
  pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "pool_ave_both" type: "Pooling" bottom: "sc_ax" top: "pool_ave_both"
  pooling_param { pool: AVE kernel_h: 3 kernel_w: 4 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 2 } }
layer { name: "deconv_g" type: "Deconvolution" bottom: "pool_in" top: "deconv_g"
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2 } }
layer { name: "crop" type: "Crop" bottom: "deconv_g" bottom: "pool_ceil" top: "crop" crop_param { axis: 2 offset: 1 offset: 2 } }
layer { name: "sc2" type: "Scale" bottom: "data" bottom: "sm1" top: "sc2" scale_param { axis: 0 } }
layer { name: "spl" type: "Split" bottom: "sc2" top: "s1" top: "s2" }
layer { name: "sum3" type: "Eltwise" bottom: "s1" bottom: "s2" bottom: "data" top: "sum3" }
layer { name: "cat2" type: "Concat" bottom: "sum3" bottom: "data" top: "cat2" concat_param { axis: 2 } }
layer { name: "resh" type: "Reshape" bottom: "cat2" top: "resh" reshape_param { shape { dim: 0 dim: -1 } axis: 1 num_axes: 2 } }
layer { name: "flat2" type: "Flatten" bottom: "resh" top: "flat2" flatten_param { axis: 1 end_axis: 1 } }
layer { name: "ip_ax" type: "InnerProduct" bottom: "flat2" top: "ip_ax" inner_product_param { num_output: 5 axis: 2 } }
layer { name: "sm_last" type: "Softmax" bottom: "ip_ax" top: "sm_last" softmax_param { axis: 1 } }
layer { name: "pw" type: "Power" bottom: "sm_last" top: "pw" power_param { power: 0.5 shift: 0.25 } }
layer { name: "drop" type: "Dropout" bottom: "pw" top: "drop" }
"""


@pytest.mark.parametrize("opset", [11, 13])
def test_uncovered_layers_match_opencv(tmp_path, opset):
    """Softmax on axis 1 of a 4-D blob (opset 11: Transpose), BatchNorm with eps and with
    factor 0, Scale axis/num_axes and two-bottom, channel-shared PReLU in place, padded and ceil-rounded AVE/MAX pooling,
    grouped Deconvolution, Crop, Split, 3-way Eltwise, Concat on axis 2, Reshape with
    axis/num_axes, Flatten axis/end_axis, InnerProduct on axis 2, Power, Dropout; at the
    prototxt's batch and, with --dynamic-batch, at batch 3."""
    import cv2
    net = synthetic_net(tmp_path, EXTRAS)
    # OpenCV names outputs by layer; an in-place layer's output is its blob's final value
    layer_of = {layer.tops[0]: layer.name for layer in net.layers if layer.type not in ("Input", "Split")}
    names = list(layer_of)
    for dynamic, batch in ((False, 2), (True, 3)):
        x = {"data": np.random.default_rng(batch).standard_normal((batch, 6, 7, 9)).astype(np.float32)}
        ref = {blob: run_net(net, x, [name], engine="opencv")[name] for blob, name in layer_of.items()}
        model = export_model(net, opset=opset, dynamic_batch=dynamic, extra_outputs=names)
        onnx.checker.check_model(model, full_check=True)
        res = run_model(model, x, names)
        assert_matches(res, ref, names, what=f"extras opset {opset} batch {batch}")
    del cv2


CAFFE_ONLY = """
name: "CaffeOnly"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 5 dim: 3 } } }
layer { name: "prelu_s" type: "PReLU" bottom: "data" top: "prelu_s" prelu_param { channel_shared: true } }
layer { name: "bias" type: "Bias" bottom: "prelu_s" top: "bias" bias_param { axis: 1 num_axes: 2 } }
layer { name: "ip_t" type: "InnerProduct" bottom: "bias" top: "ip_t"
  inner_product_param { num_output: 3 transpose: true bias_term: false } }
"""


def test_layers_opencv_gets_wrong_match_caffe_formulas(tmp_path):
    """OpenCV's reader has no Bias layer and ignores InnerProduct's ``transpose: true``,
    so these are checked against Caffe's formulas (prelu_layer.cpp, bias_layer.cpp,
    inner_product_layer.cpp) in float64."""
    net = synthetic_net(tmp_path, CAFFE_ONLY)
    x = np.random.default_rng(5).standard_normal((2, 4, 5, 3))
    a = float(net.layer("prelu_s").blobs[0].reshape(-1)[0])
    prelu = np.where(x > 0, x, a * x)
    bias = prelu + net.layer("bias").blobs[0].astype(np.float64)[None, :, :, None]
    ip = bias.reshape(2, -1) @ net.layer("ip_t").blobs[0].astype(np.float64)  # W stored (K, N)
    ref = {"prelu_s": prelu, "bias": bias, "ip_t": ip}
    for opset in (11, 13):
        model = export_model(net, opset=opset, extra_outputs=list(ref))
        onnx.checker.check_model(model, full_check=True)
        res = run_model(model, {"data": x.astype(np.float32)}, list(ref))
        assert_matches(res, ref, list(ref), what=f"opset {opset}")


LRN_K = """
name: "LrnK"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 dim: 7 dim: 9 } } }
layer { name: "within3" type: "LRN" bottom: "data" top: "within3"
  lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 norm_region: WITHIN_CHANNEL } }
layer { name: "within5" type: "LRN" bottom: "data" top: "within5"
  lrn_param { local_size: 5 alpha: 2 beta: 0.6 k: 3 norm_region: WITHIN_CHANNEL } }
layer { name: "across5" type: "LRN" bottom: "data" top: "across5"
  lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 } }
layer { name: "across3" type: "LRN" bottom: "data" top: "across3"
  lrn_param { local_size: 3 alpha: 1.5 beta: 0.9 k: 0.5 norm_region: ACROSS_CHANNELS } }
"""


@pytest.mark.parametrize("opset", [11, 13])
def test_lrn_with_k_not_1(tmp_path, opset):
    """Caffe's lrn_layer.cpp: WITHIN_CHANNEL is x * (1 + alpha * AVEpool_n(x^2))^-beta, its
    power layer's shift fixed at 1 whatever k is, checked against OpenCV's Caffe reader
    (which computes the same). ACROSS_CHANNELS is x * (k + alpha/n * sum_n x^2)^-beta;
    OpenCV ignores k there, so it is checked against that formula in float64."""
    net = synthetic_net(tmp_path, LRN_K)
    x = np.random.default_rng(7).standard_normal((2, 6, 7, 9)).astype(np.float32)
    ref = {n: run_net(net, {"data": x}, [n], engine="opencv")[n] for n in ("within3", "within5")}
    x64 = x.astype(np.float64)
    for name, n, alpha, beta, k in (("across5", 5, 0.5, 0.75, 2.0), ("across3", 3, 1.5, 0.9, 0.5)):
        sq = np.pad(x64 * x64, ((0, 0), (n // 2, n // 2), (0, 0), (0, 0)))
        window = sum(sq[:, i:i + 6] for i in range(n))
        ref[name] = x64 * (k + alpha / n * window) ** -beta
    # the OpenCV reference is Caffe's shift-1 formula (count-including-pad AVE pool)
    sq = np.pad(x64 * x64, ((0, 0), (0, 0), (1, 1), (1, 1)))
    window = sum(sq[:, :, i:i + 7, j:j + 9] for i in range(3) for j in range(3)) / 9
    assert rel_err(ref["within3"], x64 * (1 + 0.5 * window) ** -0.75) <= 1e-5
    model = export_model(net, opset=opset, extra_outputs=list(ref))
    onnx.checker.check_model(model, full_check=True)
    res = run_model(model, {"data": x}, list(ref))
    assert_matches(res, ref, list(ref), what=f"LRN k != 1, opset {opset}")


# ---- names ---------------------------------------------------------------------------------

def test_names_are_caffe_names_with_ssa_for_in_place():
    net, inputs, blobs = golden("alexnet_mini")
    model = export_model(net, extra_outputs=["conv2"])
    g = model.graph
    nodes = {n.name: n for n in g.node}
    # node names are layer names (Dropout is removed)
    for layer in net.layers:
        if layer.type not in ("Input", "Dropout"):
            assert layer.name in nodes, layer.name
    assert not any(n.startswith("drop") for n in nodes)
    # conv1 is written by conv1 then in place by relu1: SSA names
    assert list(nodes["conv1"].output) == ["conv1"]
    assert list(nodes["relu1"].output) == ["conv1/relu1"]
    assert list(nodes["norm1"].input) == ["conv1/relu1"]
    # an exposed blob keeps its plain name for its final (post-ReLU) value
    assert list(nodes["relu2"].output) == ["conv2"]
    assert list(nodes["conv2"].output) == ["conv2/conv2"]
    # fc6 -> relu6 -> drop6 (removed): fc7 reads relu6's value
    assert list(nodes["fc7"].input)[0] == "fc6/relu6"
    assert [o.name for o in g.output] == ["prob", "conv2"]
    assert {t.name for t in g.initializer} >= {"conv1/weight", "conv1/bias", "fc8/weight"}
    assert [i.name for i in g.input] == ["data"]
    assert model.producer_name == "lrprune-caffe"
    assert len({n.name for n in g.node}) == len(g.node)
    res = run_model(model, inputs)
    assert rel_err(res["conv2"], blobs["conv2"]) <= TOL


def test_runtime_engine_uses_exporter_and_accepts_input_names():
    net, inputs, blobs = golden("cifar10_quick")
    out = run_net(net, inputs, ["data", "conv1", "prob"])
    assert np.array_equal(out["data"], inputs["data"])
    assert rel_err(out["conv1"], blobs["conv1"]) <= TOL and rel_err(out["prob"], blobs["prob"]) <= TOL


# ---- MNN, where it installs ---------------------------------------------------------------

def _mnn_convert(onnx_path, mnn_path):
    """MNN's converter function itself (``_tools.mnnconvert``, what MNN.tools.mnnconvert wraps),
    not the wrapper script (which runs pip and sends telemetry)."""
    tools = pytest.importorskip("_tools", reason="MNN's converter module (_tools) is not installed")
    ok = tools.mnnconvert(["mnnconvert", "-f", "ONNX", "--modelFile", str(onnx_path),
                           "--MNNModel", str(mnn_path), "--bizCode", "lrprune-caffe"])
    assert ok and os.path.getsize(mnn_path) > 0


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_mnn_runs_exported_model(case, tmp_path):
    mnn = pytest.importorskip("MNN", reason="MNN is not installed (pip install \".[mobile]\")")
    import MNN.expr as F
    net, inputs, blobs = golden(case)
    names = comparable_blobs(net, blobs)
    path = tmp_path / "model.onnx"
    rep = save_onnx(net, path, extra_outputs=names)
    _mnn_convert(path, tmp_path / "model.mnn")
    outs = rep["outputs"]
    module = mnn.nn.load_module_from_file(str(tmp_path / "model.mnn"), net.inputs(), outs)
    x = inputs[net.inputs()[0]][:1].astype(np.float32)
    ys = module.forward([F.const(x, list(x.shape), F.NCHW)])
    res = {n: np.array(F.convert(y, F.NCHW).read()) for n, y in zip(outs, ys)}
    assert_matches(res, {k: v[:1] for k, v in blobs.items()}, names, tol=1e-3, what=f"MNN {case}")


# ---- bad input: one line, exit 2, no file ----------------------------------------------------

def _cli_error(capsys, argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrprune-caffe: error:"), err
    assert "Traceback" not in err
    return lines[0]


def _no_files(folder):
    return [p.name for p in folder.iterdir()] == []


@pytest.mark.parametrize("opset", [10, max_opset() + 1])
def test_bad_opset(tmp_path, capsys, opset):
    d = golden_case("cifar10_quick")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = _cli_error(capsys, ["export-onnx", d / "model.prototxt", d / "model.caffemodel",
                               "-o", out_dir / "m.onnx", "--opset", opset])
    assert f"opset {opset}" in line and f"11..{max_opset()}" in line
    assert _no_files(out_dir)
    with pytest.raises(UserError):
        export_model(load_net(d / "model.prototxt", d / "model.caffemodel"), opset=opset)


UNKNOWN = """
name: "unknown"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 2 kernel_size: 3 } }
layer { name: "mystery" type: "FancyNorm" bottom: "c" top: "f" }
"""

NO_LOWERING = """
name: "nolowering"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "am" type: "ArgMax" bottom: "data" top: "am" argmax_param { axis: 1 } }
"""


@pytest.mark.parametrize("text,layer,ltype", [(UNKNOWN, "mystery", "FancyNorm"),
                                              (NO_LOWERING, "am", "ArgMax")])
def test_layer_without_lowering(tmp_path, capsys, text, layer, ltype):
    net = synthetic_net(tmp_path, text) if ltype != "FancyNorm" else None
    proto = tmp_path / "n.prototxt"
    if net is None:
        proto.write_text(text)
        net = read_net(proto)
        net.layer("conv").blobs = [np.ones((2, 3, 3, 3), np.float32), np.zeros(2, np.float32)]
    save_net(net, proto, tmp_path / "n.caffemodel")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = _cli_error(capsys, ["export-onnx", proto, tmp_path / "n.caffemodel", "-o", out_dir / "m.onnx"])
    assert f"layer '{layer}' ({ltype})" in line and "no ONNX lowering" in line
    assert _no_files(out_dir)


def test_output_in_missing_folder(tmp_path, capsys):
    d = golden_case("cifar10_quick")
    target = tmp_path / "missing" / "m.onnx"
    line = _cli_error(capsys, ["export-onnx", d / "model.prototxt", d / "model.caffemodel", "-o", target])
    assert "does not exist" in line and "missing" in line
    assert not (tmp_path / "missing").exists()


def test_failed_export_leaves_no_partial_file(tmp_path, monkeypatch):
    """A failure while writing leaves neither the file nor a temporary beside it."""
    d = golden_case("cifar10_quick")
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")

    def boom(self):
        raise RuntimeError("disk full")
    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", boom)
    with pytest.raises(RuntimeError):
        save_onnx(net, target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_cli_export_writes_a_loadable_file(tmp_path, capsys):
    d = golden_case("inception_mini")
    out = tmp_path / "m.onnx"
    rc = main(["export-onnx", str(d / "model.prototxt"), str(d / "model.caffemodel"), "-o", str(out),
               "--opset", "11", "--json"])
    assert rc == 0
    import json
    rep = json.loads(capsys.readouterr().out)
    assert rep["opset"] == 11 and rep["ir_version"] == 6 and rep["outputs"] == ["prob"]
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    res = run_model(model, load_npz(d / "inputs.npz"))
    assert rel_err(res["prob"], load_npz(d / "blobs.npz")["prob"]) <= TOL


def test_dropout_only_net_output_is_an_identity(tmp_path):
    text = """
name: "d"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "drop" type: "Dropout" bottom: "ip" top: "ip" }
"""
    net = synthetic_net(tmp_path, text)
    model = export_model(net)
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["ip"]
    x = np.ones((1, 4), np.float32)
    w, b = net.layer("ip").blobs
    assert rel_err(run_model(model, {"data": x})["ip"], x @ w.T + b) <= TOL


def test_pooling_window_past_the_input_is_refused(tmp_path):
    text = """
name: "p"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 9 dim: 9 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 3 } }
"""
    net = synthetic_net(tmp_path, text)
    with pytest.raises(UserError, match=r"layer 'pool' \(Pooling\).*past the input"):
        export_model(net)


def test_export_model_signature_used_by_runtime():
    net, inputs, blobs = golden("layer_zoo")
    m = export_model(net, extra_outputs=["cat"], dynamic_batch=True)
    assert [o.name for o in m.graph.output] == ["sm", "cat"]
    copy.deepcopy(m)  # a plain ModelProto
