"""transforms.forward against real Caffe's blobs, and the calibration passes (transforms.calibrate):
the original net is never written, masks are kept, grouped convs and every scheme fit, and on the
real-Caffe LeNet the calibrated nets score near the original's 97.3% on held-out digits."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import SHARED, golden_case, lenet_files, load_npz, require_shared
from lrprune_caffe.io.caffe import load_net
from lrprune_caffe.transforms import Precondition, run_pass
from lrprune_caffe.transforms.calibrate import calibrate_factorized, calibrate_pruned
from lrprune_caffe.transforms.factorize import LayerPlan, factorize
from lrprune_caffe.transforms.forward import forward
from lrprune_caffe.ir.masks import apply_masks
from lrprune_caffe.transforms.prune import PruneSpec, compute_masks

FORWARD_CASES = ["lenet_mnist", "lenet_mnist_v1", "cifar10_quick", "alexnet_mini", "resnet_mini",
                 "inception_mini", "mobilenet_mini"]


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_numpy_forward_matches_real_caffe(case):
    d = golden_case(case)
    net = load_net(str(d / "model.prototxt"), str(d / "model.caffemodel"))
    blobs = load_npz(d / "blobs.npz")
    out = forward(net, load_npz(d / "inputs.npz"))
    common = [k for k in blobs if k in out]
    assert len(common) >= 0.75 * len(blobs)  # the rest are Caffe's automatic split blobs
    for k in common:
        scale = max(1.0, float(np.max(np.abs(blobs[k]))))
        np.testing.assert_allclose(out[k], blobs[k], atol=2e-5 * scale, err_msg=f"{case} blob {k}")


def test_unsupported_layer_is_a_precondition_and_leaves_the_net_alone():
    d = golden_case("layer_zoo")
    net = load_net(str(d / "model.prototxt"), str(d / "model.caffemodel"))
    with pytest.raises(Precondition, match="Deconvolution"):
        forward(net, load_npz(d / "inputs.npz"))
    before = [[b.copy() for b in layer.blobs] for layer in net.layers]
    res = run_pass(calibrate_pruned, net, original=net, masks={}, calib_inputs=load_npz(d / "inputs.npz"))
    assert not res.changed and "no numpy forward" in res.reason
    assert all(np.array_equal(a, b) for layer, bl in zip(net.layers, before) for a, b in zip(layer.blobs, bl))


def test_feeds_relu_only_when_every_reader_is_a_plain_relu():
    from lrprune_caffe.transforms.calibrate import feeds_relu
    _, proto, weights = lenet_files()
    net = load_net(proto, weights)
    idx = {layer.name: i for i, layer in enumerate(net.layers)}
    assert feeds_relu(net, idx["ip1"])  # relu1 works in place on ip1
    assert not feeds_relu(net, idx["conv2"]) and not feeds_relu(net, idx["ip2"])
    net.layer("relu1").msg.relu_param.negative_slope = 0.1
    assert not feeds_relu(net, idx["ip1"])


def _blobs(net):
    return {layer.name: [b.copy() for b in layer.blobs] for layer in net.layers}


def _same(net, saved):
    return all(np.array_equal(a, b) for layer in net.layers for a, b in zip(layer.blobs, saved[layer.name]))


@pytest.mark.parametrize("scheme,ranks", [("channel", (12,)), ("spatial", (12,)), ("tucker2", (8, 12))])
def test_grouped_conv_and_fc_chains_fit_better_than_data_free(scheme, ranks):
    d = golden_case("alexnet_mini")
    orig = load_net(str(d / "model.prototxt"), str(d / "model.caffemodel"))
    saved = _blobs(orig)
    x = load_npz(d / "inputs.npz")["data"]
    g = np.random.default_rng(0)
    cal = {"data": (g.standard_normal((12, *x.shape[1:])) * x.std() + x.mean()).astype(np.float32)}
    test = {"data": (g.standard_normal((6, *x.shape[1:])) * x.std() + x.mean()).astype(np.float32)}
    assert orig.layer("conv2").param_msg("convolution_param").group == 2
    new = copy.deepcopy(orig)
    plan = {"conv2": LayerPlan(scheme, ranks), "fc6": LayerPlan("fc", (24,))}
    assert run_pass(factorize, new, plan=plan).changed
    free = copy.deepcopy(new)
    res = run_pass(calibrate_factorized, new, original=orig, plan=plan, calib_inputs=cal, max_positions=64)
    assert res.changed, res.reason
    assert _same(orig, saved)
    for det in res.details:
        assert det["calib_rel_l2_after"] < det["calib_rel_l2_before"], det
    ref, a, b = forward(orig, test), forward(free, test), forward(new, test)

    def rel(out, k):
        return np.linalg.norm(out[k] - ref[k]) / np.linalg.norm(ref[k])

    assert rel(b, "fc8") < rel(a, "fc8")


@pytest.fixture(scope="module")
def lenet():
    _, proto, weights = lenet_files()
    split = SHARED / "data" / "mnist5k_split.npz"
    require_shared(split)
    z = load_npz(split)
    cal = {"data": z["x_train"][:512, None].astype(np.float32) / 256}
    return load_net(proto, weights), cal, z["x_test"][:, None].astype(np.float32) / 256, z["y_test"]


def top1(net, x, y):
    return float(np.mean(forward(net, {"data": x})["prob"].argmax(1) == y))


def test_lenet_channel_factorization_calibrated(lenet):
    orig, cal, x, y = lenet
    saved = _blobs(orig)
    plan = {"conv2": LayerPlan("channel", (7,)), "ip1": LayerPlan("fc", (173,))}  # `--speedup 3` picks these
    new = copy.deepcopy(orig)
    run_pass(factorize, new, plan=plan)
    free = top1(new, x, y)
    res = run_pass(calibrate_factorized, new, original=orig, plan=plan, calib_inputs=cal)
    assert res.changed and _same(orig, saved)
    got = top1(new, x, y)
    assert free < 0.90 and got >= 0.96, (free, got)


def test_lenet_global_pruning_calibrated_keeps_masks(lenet):
    orig, cal, x, y = lenet
    saved = _blobs(orig)
    new = copy.deepcopy(orig)
    masks = compute_masks(new, PruneSpec(fraction=0.95, scope="global"))
    apply_masks(new, masks)
    free = top1(new, x, y)
    res = run_pass(calibrate_pruned, new, original=orig, masks=masks, calib_inputs=cal, dense=orig)
    assert res.changed and _same(orig, saved)
    for name, mask in ((k.rpartition("/")[0], m) for k, m in masks.items()):
        assert not new.layer(name).blobs[0][~mask].any()
    got = top1(new, x, y)
    assert free < 0.91 and got >= 0.96, (free, got)
    # SparseGPT chooses new masks at the same sparsity per layer
    sg = copy.deepcopy(orig)
    masks2 = {k: v.copy() for k, v in masks.items()}
    apply_masks(sg, masks2)
    run_pass(calibrate_pruned, sg, original=orig, masks=masks2, calib_inputs=cal, dense=orig,
             prune_method="sparsegpt")
    for k, mask in masks2.items():
        assert int(mask.sum()) == int(masks[k].sum())
        assert not sg.layer(k.rpartition("/")[0]).blobs[0][~mask].any()
    assert top1(sg, x, y) >= 0.96


def test_injected_forward_is_used_and_gives_the_same_fit(lenet):
    from lrprune_caffe.transforms.forward import run_layer
    orig, cal, _, _ = lenet
    cal = {"data": cal["data"][:64]}
    plan = {"conv2": LayerPlan("channel", (7,)), "ip1": LayerPlan("fc", (64,))}
    a = copy.deepcopy(orig)
    run_pass(factorize, a, plan=plan)
    b = copy.deepcopy(a)
    seen = []

    def run(layer, bottoms):
        seen.append(layer.name)
        return run_layer(layer, bottoms)

    run_pass(calibrate_factorized, a, original=orig, plan=plan, calib_inputs=cal)
    run_pass(calibrate_factorized, b, original=orig, plan=plan, calib_inputs=cal, run=run)
    assert {"conv1", "conv2", "conv2_lr1", "ip1_lr2"} <= set(seen)
    for la, lb in zip(a.layers, b.layers):
        for x, y in zip(la.blobs, lb.blobs):
            np.testing.assert_array_equal(x, y)


def test_reference_targets_original_outputs_and_dense_inner_factors():
    from lrprune_caffe.transforms.calibrate import _reference
    _, proto, weights = lenet_files()
    orig = load_net(proto, weights)
    new = copy.deepcopy(orig)
    run_pass(factorize, new, plan={"conv2": LayerPlan("channel", (5,))})
    dense = copy.deepcopy(new)
    new.layer("conv2_lr1").blobs[0][:] = 0  # as if pruned: the target must come from `dense`
    ref = dict(zip([layer.name for layer in new.layers], _reference(orig, new, dense=dense)))
    assert ref["conv1"] is orig.layer("conv1") and ref["conv2_lr2"] is orig.layer("conv2")
    assert ref["conv2_lr1"] is not dense.layer("conv2_lr1")  # a copy of the dense factor
    np.testing.assert_array_equal(ref["conv2_lr1"].blobs[0], dense.layer("conv2_lr1").blobs[0])
    assert ref["conv2_lr1"].bottoms == ["pool1"]


def test_runner_writes_a_relu_in_place_only_where_nobody_else_sees_the_values():
    from lrprune_caffe.ir.net import Layer
    from lrprune_caffe.transforms.calib_run import Runner
    x = np.array([[-1.0, 2.0, -3.0]], np.float32)
    layers = [Layer("in", "Input", [], ["x"]), Layer("split", "Split", ["x"], ["a", "b"]),
              Layer("relu_a", "ReLU", ["a"], ["a"]), Layer("scale", "Power", ["b"], ["c"]),
              Layer("relu_c", "ReLU", ["c"], ["c"])]
    R = Runner(layers, {"x": x})
    N = Runner(layers, {"x": x}, peer=R)
    for i in range(1, 5):
        R.step(i)
    np.testing.assert_array_equal(x, [[-1, 2, -3]])  # an input, and the split's other branch: not overwritten
    np.testing.assert_array_equal(R.blobs["a"], [[0, 2, 0]])
    c = R.blobs["c"]
    assert R.step(4)[0] is c  # 'c' is R's own: rewritten in place
    N.blobs["a"] = R.blobs["a"]
    before = R.blobs["a"].copy()
    N.step(2)  # shared with the peer: a new array
    assert N.blobs["a"] is not R.blobs["a"]
    np.testing.assert_array_equal(R.blobs["a"], before)


def test_calibration_leaves_the_inputs_alone_and_reports_errors_at_sampled_positions(lenet):
    orig, cal, _, _ = lenet
    cal = {"data": cal["data"][:64]}
    kept = cal["data"].copy()
    new = copy.deepcopy(orig)
    plan = {"conv2": LayerPlan("channel", (7,)), "ip1": LayerPlan("fc", (64,))}
    run_pass(factorize, new, plan=plan)
    res = run_pass(calibrate_factorized, new, original=orig, plan=plan, calib_inputs=cal)
    np.testing.assert_array_equal(cal["data"], kept)
    for d in res.details:
        assert 0 < d["calib_rel_l2_after"] < d["calib_rel_l2_before"] < 1, d


def test_response_energies_of_few_samples_come_from_their_gram_matrix():
    from lrprune_caffe.core.calib import response_energies
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((300, 16)) * np.arange(1, 17)
    m = Y.mean(axis=1)
    cov = Y @ Y.T / 16 - np.outer(m, m)
    small = response_energies({"l": {"cov": cov, "centered": Y - m[:, None]}})["l"]
    full = response_energies({"l": {"cov": cov}})["l"]
    assert small.shape == full.shape == (300,)
    np.testing.assert_allclose(small, full, atol=1e-9 * full[0])


@pytest.mark.parametrize("case,plan", [
    ("lenet_mnist", {"conv2": LayerPlan("channel", (7,)), "ip1": LayerPlan("fc", (64,))}),
    ("alexnet_mini", {"conv2": LayerPlan("spatial", (12,)), "conv3": LayerPlan("tucker2", (8, 12))}),
])
def test_fused_reference_chunks_give_the_whole_batch_fit(case, plan, monkeypatch):
    """A large target computed a few images at a time with the ReLU / pooling after it, kept at the sampled
    positions only (fused_reference): the same fit as the whole-batch forward."""
    from lrprune_caffe.transforms import calib_run
    d = golden_case(case)
    orig = load_net(str(d / "model.prototxt"), str(d / "model.caffemodel"))
    x = load_npz(d / "inputs.npz")["data"]
    g = np.random.default_rng(1)
    cal = {"data": (g.standard_normal((11, *x.shape[1:])) * x.std() + x.mean()).astype(np.float32)}
    fits, calls = [], []
    real = calib_run.fused_reference

    def counted(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out
    monkeypatch.setattr("lrprune_caffe.transforms.calibrate.fused_reference", counted)
    for fuse in (False, True):
        monkeypatch.setattr(calib_run, "FUSE_BYTES", 0 if fuse else 1 << 40)
        monkeypatch.setattr(calib_run, "FUSE_CHUNK_BYTES", 1)  # one image per chunk
        new = copy.deepcopy(orig)
        run_pass(factorize, new, plan=plan)
        res = run_pass(calibrate_factorized, new, original=orig, plan=plan, calib_inputs=cal, max_positions=32)
        out = forward(new, cal)
        fits.append((res.details, out[new.layers[-1].tops[0]]))
    assert any(calls) and not all(calls)
    (d0, y0), (d1, y1) = fits
    for a, b in zip(d0, d1):  # float rounding apart (an under-determined fit's weights may differ, not its outputs)
        assert a["name"] == b["name"]
        assert a["calib_rel_l2_after"] == pytest.approx(b["calib_rel_l2_after"], rel=1e-3, abs=1e-6)
    assert np.linalg.norm(y1 - y0) <= 1e-4 * np.linalg.norm(y0)


def test_lockstep_rewrites_a_shared_relu_in_place_once():
    from lrprune_caffe.ir.net import Layer
    from lrprune_caffe.transforms.calib_run import Runner, lockstep
    from lrprune_caffe.ir.net import Net
    x = np.array([[-1.0, 2.0, -3.0]], np.float32)
    layers = [Layer("in", "Input", [], ["x"]), Layer("p", "Power", ["x"], ["a"]), Layer("relu", "ReLU", ["a"], ["a"])]
    net = Net("n", layers)
    R = Runner(layers, {"x": x})
    N = Runner(layers, {"x": x}, peer=R)
    lockstep(R, N, layers, net, 1)
    a = R.blobs["a"]
    assert N.blobs["a"] is a
    lockstep(R, N, layers, net, 2)
    assert R.blobs["a"] is a and N.blobs["a"] is a  # both nets' blob, rewritten once, no copy
    np.testing.assert_array_equal(a, [[0, 2, 0]])
    np.testing.assert_array_equal(x, [[-1, 2, -3]])
