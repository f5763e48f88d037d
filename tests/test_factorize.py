"""The ``factorize`` pass on real nets: golden outputs at full rank through OpenCV's Caffe
reader, names and geometry of the new layers, Eckart-Young through the written blobs,
MAC / param counts against ``inspect``, preconditions, training-net rewrite."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla

from conftest import first_inputs, golden_case, load_npz
from lrprune_caffe.ir.analysis import infer_shapes, layer_stats
from lrprune_caffe.api import inspect_net, write_net
from lrprune_caffe.io.caffe import load_net, read_net
from lrprune_caffe.engines.compare import compare_outputs
from lrprune_caffe.ir.net import Layer, Net
from lrprune_caffe.ir.layers.conv import conv_geometry
from lrprune_caffe.lowrank import decompose as dec
from lrprune_caffe.transforms import Precondition, run_pass
from lrprune_caffe.transforms.factorize import LayerPlan, factorize, layer_info

cv2 = pytest.importorskip("cv2")

SCHEMES = ["channel", "spatial", "tucker2"]


def load_case(name):
    d = golden_case(name)
    return d, load_net(d / "model.prototxt", d / "model.caffemodel")


def infos(net):
    shapes = infer_shapes(net)
    out = {}
    for layer in net.layers:
        try:
            out[layer.name] = layer_info(layer, (shapes.inputs[layer.name] or [None])[0],
                                         (shapes.outputs[layer.name] or [None])[0])
        except Precondition:
            pass
    return out


def full_rank_plan(net, scheme):
    return {n: LayerPlan(scheme, i.max_ranks(i.scheme_for(scheme))) for n, i in infos(net).items()}


def opencv_forward(outdir, inputs, outputs, net):
    cvnet = cv2.dnn.readNetFromCaffe(str(outdir / "model.prototxt"), str(outdir / "model.caffemodel"))
    for k, v in inputs.items():
        cvnet.setInput(np.ascontiguousarray(v, np.float32), k)
    writer = {l.tops[0]: l.name for l in net.layers if l.tops}  # OpenCV names outputs by layer
    return dict(zip(outputs, cvnet.forward([writer[o] for o in outputs])))


# --- (1) full rank reproduces real Caffe's outputs, every golden case, every scheme --------

@pytest.mark.parametrize("scheme", SCHEMES)
def test_full_rank_reproduces_golden_through_opencv(golden, scheme, tmp_path):
    case, d = golden
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    plan = full_rank_plan(net, scheme)
    assert plan, f"{case}: nothing to factorize"
    res = run_pass(factorize, net, plan=plan)
    assert res.changed, res.reason
    assert all(r["weight_rel_error"] < 1e-6 for r in res.details)
    write_net(net, tmp_path)
    n = 8
    inputs = first_inputs(load_npz(d / "inputs.npz"), n)
    golden_blobs = load_npz(d / "blobs.npz")
    outputs = net.outputs()
    got = opencv_forward(tmp_path, inputs, outputs, net)
    ref = {o: golden_blobs[o][:n] for o in outputs}
    cmp = compare_outputs(ref, got)
    assert not cmp["missing"] and not cmp["errors"]
    assert cmp["worst_rel_l2"] < 1e-4, cmp
    for name in plan:  # every factorized layer became its chain, the top kept
        assert name not in net
        assert f"{name}_lr1" in net and f"{name}_lr2" in net


# --- (2) names, geometry, ParamSpecs ---------------------------------------------------

def test_names_and_blobs_of_the_chains():
    _, net = load_case("lenet_mnist")
    plan = {"conv2": LayerPlan("tucker2", (8, 10)), "conv1": LayerPlan("spatial", (4,)),
            "ip1": LayerPlan("channel", (20,))}
    run_pass(factorize, net, plan=plan)
    names = [l.name for l in net.layers]
    i = names.index("conv2_lr1")
    assert names[i:i + 3] == ["conv2_lr1", "conv2_lr2", "conv2_lr3"]
    l1, l2, l3 = (net.layer(f"conv2_lr{k}") for k in (1, 2, 3))
    assert (l1.bottoms, l1.tops) == (["pool1"], ["conv2_lr1"])
    assert (l2.bottoms, l2.tops) == (["conv2_lr1"], ["conv2_lr2"])
    assert (l3.bottoms, l3.tops) == (["conv2_lr2"], ["conv2"])
    assert [b.shape for b in l1.blobs] == [(8, 20, 1, 1)]
    assert [b.shape for b in l2.blobs] == [(10, 8, 5, 5)]
    assert [b.shape for b in l3.blobs] == [(50, 10, 1, 1), (50,)]
    ip1, ip2 = net.layer("ip1_lr1"), net.layer("ip1_lr2")
    assert (ip1.tops, ip2.bottoms, ip2.tops) == (["ip1_lr1"], ["ip1_lr1"], ["ip1"])
    assert [b.shape for b in ip1.blobs] == [(20, 800)] and [b.shape for b in ip2.blobs] == [(500, 20), (500,)]
    assert not ip1.param_msg("inner_product_param").bias_term and ip2.param_msg("inner_product_param").bias_term


def test_spatial_splits_stride_pad_dilation():
    _, net = load_case("layer_zoo")
    run_pass(factorize, net, plan={"rect": LayerPlan("spatial", (4,)), "dil": LayerPlan("spatial", (6,))})
    for name, (k, s, p, d) in {"rect": ((3, 1), (2, 1), (1, 0), (1, 1)),
                               "dil": ((3, 3), (1, 1), (2, 2), (2, 2))}.items():
        g1, g2 = conv_geometry(net.layer(f"{name}_lr1")), conv_geometry(net.layer(f"{name}_lr2"))
        assert (g1.kernel, g1.stride, g1.pad, g1.dilation) == ((k[0], 1), (s[0], 1), (p[0], 0), (d[0], 1))
        assert (g2.kernel, g2.stride, g2.pad, g2.dilation) == ((1, k[1]), (1, s[1]), (0, p[1]), (1, d[1]))
        assert not g1.bias and g2.bias


def test_grouped_convs_keep_their_groups():
    _, net = load_case("alexnet_mini")
    run_pass(factorize, net, plan={"conv2": LayerPlan("channel", (5,)), "conv4": LayerPlan("tucker2", (6, 7))})
    assert [conv_geometry(net.layer(f"conv2_lr{k}")).group for k in (1, 2)] == [2, 2]
    assert [conv_geometry(net.layer(f"conv4_lr{k}")).group for k in (1, 2, 3)] == [2, 2, 2]
    assert net.layer("conv2_lr1").blobs[0].shape == (10, 12, 5, 5)  # g*r outputs, C/g inputs
    assert net.layer("conv2_lr2").blobs[0].shape == (64, 5, 1, 1)


def test_param_specs_and_fillers_follow_weights_and_bias():
    d = golden_case("lenet_mnist")
    net = read_net(d / "train_test.prototxt", phase="TRAIN")
    src = net.layer("conv2")
    src.blobs = []  # no weights: build_layers alone, as for training nets
    from lrprune_caffe.transforms.factorize import build_layers, LayerInfo
    info = LayerInfo("conv2", "Convolution", "conv", 50, 20, kernel=(5, 5))
    l1, l2 = build_layers(src, info, "channel", (7,))
    assert [p.lr_mult for p in l1.msg.param] == [1.0]
    assert [p.lr_mult for p in l2.msg.param] == [1.0, 2.0]
    assert l1.param_msg("convolution_param").weight_filler.type == "xavier"
    assert not l1.param_msg("convolution_param").HasField("bias_filler")
    assert l2.param_msg("convolution_param").bias_filler.type == "constant"


# --- (3) Eckart-Young through the pass: the error is the discarded energy ----------------

@pytest.mark.parametrize("name,scheme,rank", [("conv2", "channel", 10), ("conv2", "spatial", 12),
                                              ("ip1", "channel", 40)])
def test_written_weights_obey_eckart_young(name, scheme, rank, tmp_path):
    _, net = load_case("lenet_mnist")
    W = net.layer(name).blobs[0].astype(np.float64)
    res = run_pass(factorize, net, plan={name: LayerPlan(scheme, (rank,))})
    write_net(net, tmp_path)
    back = load_net(tmp_path / "model.prototxt", tmp_path / "model.caffemodel")
    f = [back.layer(f"{name}_lr{k}").blobs[0] for k in (1, 2)]
    if name.startswith("ip"):
        W_hat, M = dec.reconstruct("fc", f), W
    else:
        W_hat = dec.reconstruct(scheme, f)
        M = dec.channel_matrix(W) if scheme == "channel" else dec.spatial_matrix(W)
    s = sla.svdvals(M)
    discarded = float(np.sum(s[rank:] ** 2))
    assert float(np.sum((W - W_hat) ** 2)) == pytest.approx(discarded, rel=1e-5)
    rec = res.details[0]
    assert rec["weight_rel_error"] ** 2 * float(np.sum(W ** 2)) == pytest.approx(discarded, rel=1e-5)
    assert rec["energy_kept"] == pytest.approx(1 - discarded / float(np.sum(s ** 2)), rel=1e-6)


# --- (4) the cost model equals the layer registry's counts ------------------------------

@pytest.mark.parametrize("case", ["alexnet_mini", "layer_zoo", "inception_mini", "resnet_mini"])
def test_cost_model_matches_layer_stats(case):
    _, net = load_case(case)
    rng = np.random.default_rng(0)
    for scheme in SCHEMES:
        work = net.copy()
        plan = {}
        for name, info in infos(work).items():
            maxr = info.max_ranks(info.scheme_for(scheme))
            plan[name] = LayerPlan(scheme, tuple(int(rng.integers(1, m + 1)) for m in maxr), info)
        run_pass(factorize, work, plan=plan)
        stats = {r.name: r for r in layer_stats(work)}
        for name, lp in plan.items():
            macs, params = lp.info.cost(lp.info.scheme_for(scheme), lp.ranks)
            parts = [stats[l.name] for l in work.layers if l.name.startswith(name + "_lr")]
            assert sum(p.macs for p in parts) == int(macs), (case, scheme, name)
            assert sum(p.params for p in parts) == int(params), (case, scheme, name)


# --- (5) preconditions: the net is untouched and the reason says why ----------------------

def test_precondition_failures_leave_the_net_untouched():
    _, net = load_case("mobilenet_mini")
    before = [l.name for l in net.layers]
    for plan, why in [({"conv1/dw": LayerPlan("channel", (2,))}, "depthwise"),
                      ({"conv1": LayerPlan("channel", (17,))}, "outside 1..16"),
                      ({"conv1": LayerPlan("channel", (4,)), "nope": LayerPlan("channel", (1,))}, "no layer"),
                      ({"conv1": LayerPlan("tucker2", (4,))}, "needs 2 rank")]:
        res = run_pass(factorize, net, plan=plan)
        assert not res.changed and why in res.reason, res.reason
        assert [l.name for l in net.layers] == before


def test_name_clash_is_a_precondition():
    _, net = load_case("lenet_mnist")
    net.layer("pool2").name = "conv2_lr2"
    res = run_pass(factorize, net, plan={"conv2": LayerPlan("channel", (5,))})
    assert not res.changed and "already in use" in res.reason


# --- (6) InnerProduct axis / transpose, checked by onnxruntime ----------------------------

@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("axis", [1, 2, -1])
def test_inner_product_axis_and_transpose(axis, transpose):
    from lrprune_caffe.engines.runtime import run_net
    rng = np.random.default_rng(1)
    shape = (2, 3, 4, 5)
    ax = axis % 4
    k = int(np.prod(shape[ax:]))
    inp = Layer("data", "Input", [], ["data"])
    inp.msg.input_param.shape.add().dim.extend(shape)
    ip = Layer("fc", "InnerProduct", ["data"], ["fc"])
    p = ip.msg.inner_product_param
    p.num_output, p.axis, p.transpose = 6, axis, transpose
    W = rng.standard_normal((k, 6) if transpose else (6, k)).astype(np.float32)
    ip.blobs = [W, rng.standard_normal(6).astype(np.float32)]
    net = Net("t", [inp, ip])
    x = {"data": rng.standard_normal(shape).astype(np.float32)}
    ref = run_net(net, x)["fc"]
    for r in (min(W.shape), 3):
        work = net.copy()
        res = run_pass(factorize, work, plan={"fc": LayerPlan("channel", (r,))})
        assert res.changed, res.reason
        got = run_net(work, x)["fc"]
        W1, W2 = work.layer("fc_lr1").blobs[0], work.layer("fc_lr2").blobs[0]
        W_hat = (W2.T @ W1.T) if transpose else (W2 @ W1)
        expected = (x["data"].reshape(int(np.prod(shape[:ax])), -1) @ W_hat.T + ip.blobs[1]).reshape(got.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        if r == min(W.shape):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
        assert got.shape == ref.shape


# --- (7) the training net is rewritten the same way and takes the weights --------------

def test_rewrite_train_net_then_load_compressed_weights(tmp_path):
    from lrprune_caffe.api import compress_files as compress
    d = golden_case("lenet_mnist")
    out = tmp_path / "out"
    report, _ = compress(d / "model.prototxt", d / "model.caffemodel", out, rank="conv2=8,ip1=30",
                         train_net=d / "train_test.prototxt", verify=False)
    text = (out / "train_val.prototxt").read_text()
    assert text.count('name: "mnist"') == 2  # both Data layers, both phases
    for phase in ("TRAIN", "TEST"):
        net = load_net(out / "train_val.prototxt", out / "model.caffemodel", phase=phase)
        assert "conv2_lr1" in net and "conv2" not in net
        assert not any("no weights" in n for n in net.notes), net.notes
        l1, l2 = net.layer("ip1_lr1"), net.layer("ip1_lr2")
        assert [p.lr_mult for p in l1.msg.param] == [1.0] and [p.lr_mult for p in l2.msg.param] == [1.0, 2.0]
        assert l2.param_msg("inner_product_param").bias_filler.type == "constant"
    assert {r["name"] for r in report["layers"] if r["action"] == "factorized"} == {"conv2", "ip1"}


# --- (8) report numbers equal what inspect computes on the written net ------------------

@pytest.mark.parametrize("case,scheme", [("lenet_mnist", "channel"), ("alexnet_mini", "tucker2"),
                                         ("layer_zoo", "spatial")])
def test_report_counts_equal_inspect_of_written_net(case, scheme, tmp_path):
    from lrprune_caffe.api import compress_files as compress
    d = golden_case(case)
    report, _ = compress(d / "model.prototxt", d / "model.caffemodel", tmp_path / "o", scheme=scheme,
                         speedup=1.5, verify=False)
    before = inspect_net(d / "model.prototxt", d / "model.caffemodel")
    after = inspect_net(tmp_path / "o" / "model.prototxt", tmp_path / "o" / "model.caffemodel")
    rows = {r["name"]: r for r in after["layers"]}
    brows = {r["name"]: r for r in before["layers"]}
    assert report["totals"]["macs_before"] == before["totals"]["macs"]
    assert report["totals"]["params_before"] == before["totals"]["params"]
    assert report["totals"]["macs_after"] == after["totals"]["macs"]
    assert report["totals"]["params_after"] == after["totals"]["params"]
    factorized = [r for r in report["layers"] if r["action"] == "factorized"]
    assert factorized
    for r in report["layers"]:
        assert (r["macs_before"], r["params_before"]) == (brows[r["name"]]["macs"], brows[r["name"]]["params"])
        parts = [rows[n] for n in r.get("new_layers", [r["name"]])]
        assert r["macs_after"] == sum(p["macs"] for p in parts)
        assert r["params_after"] == sum(p["params"] for p in parts)
    sel = report["selected_totals"]
    assert sel["macs_before"] / sel["macs_after"] >= 1.5
