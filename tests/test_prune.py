"""Pruning: masks (exact counts, per-layer vs global thresholds, Han et al.'s std rule),
never-pruned blobs, masks.npz, bad requests, and structured pruning checked by OpenCV's
Caffe reader: the shrunk net must compute what the dense net computes with the removed
filters (and their biases / BatchNorm-Scale outputs) zeroed."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import golden_case, load_npz

from lrprune_caffe.ir.analysis import validate
from lrprune_caffe.api import write_net
from lrprune_caffe.io.caffe import load_net, read_caffemodel
from lrprune_caffe.errors import BadFileError, UserError
from lrprune_caffe.transforms import run_pass
from lrprune_caffe.transforms.structured_prune import prune_structured
from lrprune_caffe.ir.analysis import sparsity_rows
from lrprune_caffe.ir.masks import apply_masks, load_masks, masks_npz as save_masks, split_key
from lrprune_caffe.transforms.prune import PruneSpec, compute_masks, parse_prune_arg, prune_net, smallest_k_masks
from lrprune_caffe.engines.runtime import run_net


def golden_net(case):
    d = golden_case(case)
    return load_net(d / "model.prototxt", d / "model.caffemodel"), load_npz(d / "inputs.npz")


def blobs_of(net):
    return {(layer.name, i): np.array(b) for layer in net.layers for i, b in enumerate(layer.blobs)}


def same_blobs(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---- parsing -------------------------------------------------------------------------------

def test_parse_prune_arg():
    assert parse_prune_arg("0.5") == (0.5, {})
    assert parse_prune_arg("conv1=0.3,ip1=0.9") == (None, {"conv1": 0.3, "ip1": 0.9})
    assert parse_prune_arg("0.5, ip2=0") == (0.5, {"ip2": 0.0})
    assert parse_prune_arg("0.5,ip2=skip") == (0.5, {"ip2": 0.0})
    assert parse_prune_arg("a/b=0.2") == (None, {"a/b": 0.2})
    for bad in ("1", "1.0", "-0.1", "nan", "abc", "conv1=1.5", "0.5,0.6", "=0.3", "", "c=0.1,c=0.2"):
        with pytest.raises(UserError):
            parse_prune_arg(bad)


def test_resolve_targets_fractions_in_net_order():
    from lrprune_caffe.transforms.prune import resolve_targets
    net, _ = golden_net("lenet_mnist")  # prunable: conv1, conv2, ip1, ip2
    assert resolve_targets(net, PruneSpec(method="std", quality=1.0)) == {
        "conv1": 1.0, "conv2": 1.0, "ip1": 1.0, "ip2": 1.0}  # std without a fraction: every layer, 1.0
    assert resolve_targets(net, PruneSpec(method="std", quality=1.0, per_layer={"ip1": 0.0})) == {
        "conv1": 1.0, "conv2": 1.0, "ip2": 1.0}
    assert list(resolve_targets(net, PruneSpec(fraction=0.5, per_layer={"conv1": 0.25}, exclude=("ip2",))).items()) \
        == [("conv1", 0.25), ("conv2", 0.5), ("ip1", 0.5)]
    assert resolve_targets(net, PruneSpec(per_layer={"ip1": 0.3})) == {"ip1": 0.3}


def test_parse_layer_list():
    from lrprune_caffe.transforms.prune import parse_layer_list
    assert parse_layer_list("conv1, ip2,,a/b ") == ("conv1", "ip2", "a/b")
    assert parse_layer_list("") == () and parse_layer_list(None) == () and parse_layer_list(" , ") == ()


# ---- masks ---------------------------------------------------------------------------------

def test_smallest_k_exact_with_ties():
    a = np.array([[0.5, -0.1, 0.1], [0.1, 2.0, -0.1]], np.float32)
    b = np.array([0.1, 0.3], np.float32)
    for k in range(0, 9):
        ma, mb = smallest_k_masks([a, b], k)
        assert (~ma).sum() + (~mb).sum() == k
        pruned = np.concatenate([np.abs(a[~ma]), np.abs(b[~mb])])
        kept = np.concatenate([np.abs(a[ma]), np.abs(b[mb])])
        if pruned.size and kept.size:
            assert pruned.max() <= kept.min()
    for k, pruned in ((-3, 0), (-1, 0), (8, 8), (50, 8)):  # k is clamped to [0, size]
        ma, mb = smallest_k_masks([a, b], k)
        assert (~ma).sum() + (~mb).sum() == pruned, k
    ma, mb = smallest_k_masks([a, b], 3)  # ties at 0.1 pruned in order: a first, C order
    assert (~ma).tolist() == [[False, True, True], [True, False, False]] and mb.all()


def test_magnitude_per_layer_exact():
    net, _ = golden_net("lenet_mnist")
    masks = compute_masks(net, PruneSpec(fraction=0.7))
    assert set(masks) == {"conv1/0", "conv2/0", "ip1/0", "ip2/0"}
    for (name, idx), m in ((split_key(k), m) for k, m in masks.items()):
        w = net.layer(name).blobs[idx]
        assert m.dtype == bool and m.shape == w.shape
        assert (~m).sum() == round(0.7 * w.size)
        assert np.abs(w[~m]).max() <= np.abs(w[m]).min()


def test_global_vs_layer_thresholds():
    net, _ = golden_net("lenet_mnist")
    f = 0.8
    glob = compute_masks(net, PruneSpec(fraction=f, scope="global"))
    names = ["conv1", "conv2", "ip1", "ip2"]
    ws = [net.layer(n).blobs[0] for n in names]
    total = sum(w.size for w in ws)
    assert sum((~glob[f"{n}/0"]).sum() for n in names) == round(f * total)
    pruned_max = max(np.abs(w[~glob[f"{n}/0"]]).max() for n, w in zip(names, ws))
    kept_min = min(np.abs(w[glob[f"{n}/0"]]).min() for n, w in zip(names, ws))
    assert pruned_max <= kept_min  # one threshold for the whole net
    per_layer_sparsity = {n: float((~glob[f"{n}/0"]).mean()) for n in names}
    assert max(per_layer_sparsity.values()) - min(per_layer_sparsity.values()) > 0.05
    # an override is pruned on its own at its own fraction; the pool keeps one threshold
    mixed = compute_masks(net, PruneSpec(fraction=f, per_layer={"conv1": 0.1}, scope="global"))
    assert (~mixed["conv1/0"]).sum() == round(0.1 * ws[0].size)
    rest = names[1:]
    assert sum((~mixed[f"{n}/0"]).sum() for n in rest) == round(f * sum(w.size for w in ws[1:]))
    # per layer: every layer exactly f
    layer = compute_masks(net, PruneSpec(fraction=f))
    for n, w in zip(names, ws):
        assert (~layer[f"{n}/0"]).sum() == round(f * w.size)


def test_std_rule():
    net, _ = golden_net("lenet_mnist")
    q = 1.2
    masks = compute_masks(net, PruneSpec(method="std", quality=q))
    assert len(masks) == 4
    for (n, i), m in ((split_key(k), m) for k, m in masks.items()):
        w = net.layer(n).blobs[i]
        t = q * np.std(w.astype(np.float64))
        assert np.array_equal(m, np.abs(w) >= t)
    over = compute_masks(net, PruneSpec(method="std", quality=q, per_layer_quality={"ip1": 0.1},
                                        exclude=("ip2",)))
    assert "ip2/0" not in over
    w = net.layer("ip1").blobs[0]
    assert np.array_equal(over["ip1/0"], np.abs(w) >= 0.1 * np.std(w.astype(np.float64)))
    glob = compute_masks(net, PruneSpec(method="std", quality=q, scope="global"))
    allw = np.concatenate([net.layer(n).blobs[0].ravel() for n in ("conv1", "conv2", "ip1", "ip2")])
    t = q * np.std(allw.astype(np.float64))
    for (n, i), m in ((split_key(k), m) for k, m in glob.items()):
        assert np.array_equal(m, np.abs(net.layer(n).blobs[i]) >= t)
    with pytest.raises(UserError, match="quality"):
        compute_masks(net, PruneSpec(method="std"))


def test_prune_net_zeroes_exactly_and_never_touches_other_blobs():
    net, _ = golden_net("resnet_mini")
    before = blobs_of(net)
    masks, rows = prune_net(net, PruneSpec(fraction=0.6, per_layer={"conv1": 0.2}, exclude=("fc",)))
    assert "fc/0" not in masks
    after = blobs_of(net)
    for key, old in before.items():
        if f"{key[0]}/{key[1]}" in masks:
            m = masks[f"{key[0]}/{key[1]}"]
            assert np.array_equal(after[key][m], old[m]) and (after[key][~m] == 0).all()
            assert not np.signbit(after[key][~m]).any()  # +0.0, exactly
        else:  # biases, BatchNorm, Scale, excluded layers: bit for bit
            assert np.array_equal(after[key], old), key
    layer_types = {layer.name: layer.type for layer in net.layers}
    assert {layer_types[k.rpartition("/")[0]] for k in masks} == {"Convolution"}
    assert (~masks["conv1/0"]).sum() == round(0.2 * masks["conv1/0"].size)
    by = {r["name"]: r for r in rows}
    for r in rows:
        layer = net.layer(r["name"])
        assert r["params"] == sum(b.size for b in layer.blobs)
        assert r["nonzero_params"] == sum(np.count_nonzero(b) for b in layer.blobs)
        assert r["sparsity"] == pytest.approx(1 - r["nonzero_params"] / r["params"])
    assert by["res2a_b"]["pruned"] and "pruned" not in by["bn_conv1"]


def test_counts_equal_zeros_in_written_caffemodel(tmp_path):
    net, _ = golden_net("lenet_mnist")
    masks, rows = prune_net(net, PruneSpec(fraction=0.9))
    write_net(net, tmp_path / "out", extra={"masks.npz": save_masks(masks)})
    back = {wl.name: wl.blobs for wl in read_caffemodel(tmp_path / "out" / "model.caffemodel")}
    for r in rows:
        zeros = sum(int((b == 0).sum()) for b in back[r["name"]])
        assert r["params"] - r["nonzero_params"] == zeros
    loaded = load_masks(tmp_path / "out" / "masks.npz", net)
    assert loaded.keys() == masks.keys()
    for k in masks:
        assert loaded[k].dtype == bool and np.array_equal(loaded[k], masks[k])


def test_pruned_caffemodel_in_opencv_matches_onnxruntime():
    net, inputs = golden_net("lenet_mnist")
    prune_net(net, PruneSpec(fraction=0.9))
    x = {"data": inputs["data"][:200]}
    cv = run_net(net, x, engine="opencv")["prob"]
    ort = run_net(net, x, engine="onnxruntime")["prob"]
    assert np.abs(cv - ort).max() < 1e-5


def test_masks_roundtrip_and_wrong_net(tmp_path):
    net, _ = golden_net("lenet_mnist")
    masks = compute_masks(net, PruneSpec(fraction=0.5, per_layer={"ip2": 0}))
    p = tmp_path / "masks.npz"
    p.write_bytes(save_masks(masks))
    with np.load(p) as z:
        assert sorted(z.files) == ["conv1/0", "conv2/0", "ip1/0"]
    other = net.copy()
    other.layer("conv1").blobs[0] = np.zeros((10, 1, 5, 5), np.float32)
    with pytest.raises(BadFileError, match=r"mask file is for another net: layer conv1 blob 0 shape "
                                           r"\(20, 1, 5, 5\) vs \(10, 1, 5, 5\)"):
        load_masks(p, other)
    renamed = net.copy()
    renamed.layer("ip1").name = "fc1"
    with pytest.raises(BadFileError, match="another net: no layer 'ip1'"):
        load_masks(p, renamed)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BadFileError):
        load_masks(tmp_path / "junk.npz", net)
    # masks re-applied to the dense net reproduce the pruned weights
    pruned = net.copy()
    apply_masks(pruned, load_masks(p, net))
    ref = net.copy()
    apply_masks(ref, masks)
    assert same_blobs(blobs_of(pruned), blobs_of(ref))


def test_bad_requests_leave_net_untouched():
    net, _ = golden_net("lenet_mnist")
    before = blobs_of(net)
    cases = [
        (PruneSpec(fraction=1.0), "outside"),
        (PruneSpec(fraction=-0.2), "outside"),
        (PruneSpec(per_layer={"conv9": 0.5}), "no layer named 'conv9'"),
        (PruneSpec(fraction=0.5, exclude=("nope",)), "no layer named 'nope'"),
        (PruneSpec(per_layer={"relu1": 0.5}), r"'relu1' \(ReLU\) has no weights"),
        (PruneSpec(per_layer={"ip1": 1.5}), "outside"),
        (PruneSpec(fraction=0.5, scope="net"), "scope"),
        (PruneSpec(fraction=0.5, structured=True, scope="global"), "per layer; it cannot be combined with "
                                                                   "--prune-scope global"),
        (PruneSpec(fraction=0.5, structured=True, method="std", quality=1.0), "cannot be combined with "
                                                                              "--prune-method std"),
        (PruneSpec(fraction=0.5, method="std"), "needs --quality Q"),
        (PruneSpec(fraction=0.5, method="std", quality=-1), "quality -1 must be a number >= 0"),
        (PruneSpec(fraction=0.5, method="std", quality=1.0, per_layer_quality={"ip1": "x"}), "ip1: quality x"),
        (PruneSpec(fraction=0.5, method="l1"), "--prune-method: 'l1' is not one of magnitude, std"),
        (PruneSpec(per_layer={"ip1": 0.5}, exclude=("ip1",)), "'ip1' is both given a fraction and excluded"),
        (PruneSpec(fraction=0.5, exclude=("conv1", "conv2", "ip1", "ip2")), "leave no layer to prune"),
        (PruneSpec(per_layer={"ip2": 0.5}, structured=True), r"'ip2'.*'prob' \(Softmax\)"),
    ]
    for spec, msg in cases:
        with pytest.raises(UserError, match=msg):
            prune_net(net, spec)
        assert same_blobs(blobs_of(net), before)
    assert [layer.name for layer in net.layers] == ["data", "conv1", "pool1", "conv2", "pool2", "ip1",
                                                    "relu1", "ip2", "prob"]


# ---- structured ----------------------------------------------------------------------------

def _zeroed_reference(dense, details, zero_channel_layers=None):
    """The dense net with the removed filters and their biases zeroed (and, where named,
    the per-channel layer after them zeroing the removed channels)."""
    ref = dense.copy()
    for d in details:
        if not d.get("structured"):
            continue
        layer = ref.layer(d["layer"])
        rm = np.array(d["removed"])
        transpose = layer.type == "InnerProduct" and layer.param_msg("inner_product_param").transpose
        w = np.array(layer.blobs[0])
        if transpose:
            w[:, rm] = 0
        else:
            w[rm] = 0
        layer.blobs[0] = w
        if len(layer.blobs) > 1:
            b = np.array(layer.blobs[1])
            b[rm] = 0
            layer.blobs[1] = b
        for name in (zero_channel_layers or {}).get(d["layer"], ()):
            sc = ref.layer(name)
            sc.blobs = [np.where(np.isin(np.arange(b.size), rm), 0, b).astype(np.float32) for b in sc.blobs]
    return ref


@pytest.mark.slow
def test_structured_lenet_matches_zeroed_dense_in_opencv():
    dense, inputs = golden_net("lenet_mnist")
    net = dense.copy()
    spec = PruneSpec(per_layer={"conv1": 0.3, "conv2": 0.4, "ip1": 0.5}, structured=True)
    result = run_pass(prune_structured, net, spec=spec)
    assert result.changed
    validate(net)
    d = {x["layer"]: x for x in result.details}
    assert d["conv1"]["outputs_after"] == 14 and d["conv2"]["outputs_after"] == 30
    assert d["ip1"]["outputs_after"] == 250
    assert net.layer("conv1").blobs[0].shape == (14, 1, 5, 5) and net.layer("conv1").blobs[1].shape == (14,)
    assert net.layer("conv2").blobs[0].shape == (30, 14, 5, 5)
    assert net.layer("ip1").blobs[0].shape == (250, 30 * 16)  # columns grouped per channel (4x4)
    assert net.layer("ip2").blobs[0].shape == (10, 250)
    assert net.layer("conv1").param_msg("convolution_param").num_output == 14
    assert net.layer("ip1").param_msg("inner_product_param").num_output == 250
    assert net.params() < dense.params() / 3
    # removed = smallest-norm filters (conv1 has no pruned inputs, so its scores are plain norms)
    w = dense.layer("conv1").blobs[0].reshape(20, -1)
    norms = np.sqrt((w.astype(np.float64) ** 2).sum(1))
    assert sorted(d["conv1"]["removed"]) == sorted(np.argsort(norms, kind="stable")[:6].tolist())
    ref = _zeroed_reference(dense, result.details)
    x = {"data": inputs["data"]}  # all 1,000 digits
    outs = ["conv1", "conv2", "ip1", "ip2", "prob"]
    got = run_net(net, x, outputs=["ip2", "prob"], engine="opencv")
    want = run_net(ref, x, outputs=outs, engine="opencv")
    for k in ("ip2", "prob"):
        assert np.abs(got[k] - want[k]).max() < 1e-5, k
    keep1 = [i for i in range(20) if i not in d["conv1"]["removed"]]
    got_c1 = run_net(net, x, outputs=["conv1"], engine="opencv")["conv1"]
    assert np.abs(got_c1 - want["conv1"][:, keep1]).max() < 1e-5
    # and the real thing: accuracy of the shrunk net stays meaningful
    labels = load_npz(golden_case("lenet_mnist") / "labels.npz")
    y = next(iter(labels.values())).reshape(-1)
    acc = float((got["prob"].reshape(len(y), -1).argmax(1) == y).mean())
    assert acc > 0.5


def test_structured_through_batchnorm_scale_relu_pool(tmp_path):
    dense, inputs = golden_net("resnet_mini")
    net = dense.copy()
    spec = PruneSpec(per_layer={"conv1": 0.25, "res2a_a": 0.5, "res2a_b": 0.5}, structured=True)
    result = run_pass(prune_structured, net, spec=spec)
    assert result.changed
    validate(net)
    assert net.layer("conv1").blobs[0].shape[0] == 12
    for name in ("bn_conv1", "scale_conv1"):
        assert all(b.shape == (12,) for b in net.layer(name).blobs[:2])
    assert net.layer("bn_conv1").blobs[2].shape == (1,)  # the moving-average factor stays
    assert net.layer("res2a_proj").blobs[0].shape[1] == 12  # both readers of pool1 shrink
    assert net.layer("res2a_a").blobs[0].shape == (8, 12, 1, 1)
    assert net.layer("res2a_b").blobs[0].shape == (8, 8, 3, 3)
    assert net.layer("res2a_c").blobs[0].shape[1] == 8
    # exact reference: zero the removed channels' Scale (gamma, beta) so they carry 0
    ref = _zeroed_reference(dense, result.details, {"conv1": ["scale_conv1"], "res2a_a": ["scale_res2a_a"],
                                                     "res2a_b": ["scale_res2a_b"]})
    x = {k: v[:1] for k, v in inputs.items()}
    out = dense.outputs()
    got = run_net(net, x, outputs=out, engine="opencv")
    want = run_net(ref, x, outputs=out, engine="opencv")
    for k in out:
        scale = max(np.abs(want[k]).max(), 1e-6)
        assert np.abs(got[k] - want[k]).max() / scale < 1e-5, k
    write_net(net, tmp_path / "o")  # a valid Caffe net on disk
    back = load_net(tmp_path / "o" / "model.prototxt", tmp_path / "o" / "model.caffemodel")
    validate(back)


def test_structured_cannot_shrink_names_consumer():
    net, _ = golden_net("resnet_mini")
    before = blobs_of(net)
    with pytest.raises(UserError, match=r"'res2a_c' \(Convolution\).*'res2a' \(Eltwise\)"):
        prune_net(net, PruneSpec(per_layer={"res2a_c": 0.5}, structured=True))
    assert same_blobs(blobs_of(net), before)
    mob, _ = golden_net("mobilenet_mini")
    with pytest.raises(UserError, match=r"'conv1/dw' \(Convolution\).*depthwise"):
        prune_net(mob, PruneSpec(per_layer={"conv0": 0.5}, structured=True))
    inc = golden_case("inception_mini")
    inet = load_net(inc / "model.prototxt", inc / "model.caffemodel")
    concat_fed = [layer.name for layer in inet.layers if layer.type == "Convolution"
                  and any(r.type == "Concat" for r in inet.consumers(layer.tops[0], inet.index(layer.name)))]
    if concat_fed:
        with pytest.raises(UserError, match=r"\(Concat\)"):
            prune_net(inet, PruneSpec(per_layer={concat_fed[0]: 0.5}, structured=True))


def test_structured_default_fraction_skips_and_precondition():
    dense, _ = golden_net("resnet_mini")
    net = dense.copy()
    masks, rows = prune_net(net, PruneSpec(fraction=0.5, structured=True))
    assert masks == {}
    by = {r["name"]: r for r in rows}
    assert by["res2a_a"]["structured"] and by["res2a_a"]["outputs_after"] == 8
    assert by["res2a_c"]["structured"] is False and "Eltwise" in by["res2a_c"]["reason"]
    validate(net)
    # nothing removable: the pass leaves the net untouched and says why
    lenet, _ = golden_net("lenet_mnist")
    before = blobs_of(lenet)
    res = run_pass(prune_structured, lenet, spec=PruneSpec(fraction=0.5, structured=True,
                                                           exclude=("conv1", "conv2", "ip1")))
    assert not res.changed and "'ip2'" in res.reason and "Softmax" in res.reason
    assert same_blobs(blobs_of(lenet), before)
    with pytest.raises(UserError, match="nothing"):
        prune_net(lenet, PruneSpec(fraction=0.5, structured=True, exclude=("conv1", "conv2", "ip1")))


def _pair_net(tmp_path, wa, wb, bb):
    text = """name: "pair"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 } } }
layer { name: "fc_a" type: "InnerProduct" bottom: "data" top: "fc_a"
  inner_product_param { num_output: 4 bias_term: false } }
layer { name: "fc_b" type: "InnerProduct" bottom: "fc_a" top: "fc_b" inner_product_param { num_output: 3 } }
layer { name: "relu" type: "ReLU" bottom: "fc_b" top: "fc_b" }
layer { name: "fc_c" type: "InnerProduct" bottom: "fc_b" top: "out" inner_product_param { num_output: 2 } }
"""
    p = tmp_path / "pair.prototxt"
    p.write_text(text)
    net = load_net(p)
    rng = np.random.default_rng(3)
    net.layer("fc_a").blobs = [wa]
    net.layer("fc_b").blobs = [wb, bb]
    net.layer("fc_c").blobs = [rng.standard_normal((2, 3)).astype(np.float32),
                               rng.standard_normal(2).astype(np.float32)]
    validate(net)
    return net


def test_structured_rank_components(tmp_path):
    """fc_a -> fc_b is a low-rank pair: fc_a's rows are orthonormal (equal norms), so only
    the product with fc_b's column norms can tell the components apart."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 4)))
    wa = q.T.astype(np.float32)  # 4 x 6, orthonormal rows
    col_norms = np.array([3.0, 0.1, 2.0, 0.2])
    wb = (rng.standard_normal((3, 4)) / np.sqrt(3)).astype(np.float32)
    wb = (wb / np.linalg.norm(wb, axis=0) * col_norms).astype(np.float32)
    bb = rng.standard_normal(3).astype(np.float32)
    net = _pair_net(tmp_path, wa, wb, bb)
    dense = net.copy()
    res = run_pass(prune_structured, net, spec=PruneSpec(per_layer={"fc_a": 0.5}, structured=True))
    d = res.details[0]
    assert d["score"] == "rank-component" and d["removed"] == [1, 3]
    assert net.layer("fc_a").blobs[0].shape == (2, 6) and net.layer("fc_b").blobs[0].shape == (3, 2)
    x = {"data": rng.standard_normal((2, 6)).astype(np.float32)}
    got = run_net(net, x, outputs=["out"], engine="opencv")["out"]
    keep = [0, 2]
    h = np.maximum(x["data"] @ wa[keep].T @ wb[:, keep].T + bb, 0)
    wc, bc = dense.layer("fc_c").blobs
    assert np.abs(got - (h @ wc.T + bc)).max() < 1e-5
    # fc_b (bias, then ReLU in place, then fc_c): plain filter norms, the ReLU passes through
    net2 = dense.copy()
    res2 = run_pass(prune_structured, net2, spec=PruneSpec(per_layer={"fc_b": 0.34}, structured=True))
    assert res2.details[0]["score"] == "filter-l2"
    assert net2.layer("fc_c").blobs[0].shape == (2, 2)
    # fc_c's output is the net output: cannot
    with pytest.raises(UserError, match="net output"):
        prune_net(dense.copy(), PruneSpec(per_layer={"fc_c": 0.5}, structured=True))


def test_sparsity_rows_cover_every_blob_layer():
    net, _ = golden_net("lenet_mnist")
    rows = sparsity_rows(net)
    assert [r["name"] for r in rows] == ["conv1", "conv2", "ip1", "ip2"]
    assert sum(r["params"] for r in rows) == net.params()


@pytest.mark.parametrize("case", ["cifar10_quick", "alexnet_mini", "inception_mini", "mobilenet_mini",
                                  "layer_zoo"])
def test_structured_default_fraction_opencv_loads(case):
    """Whatever can be shrunk is, the rest is skipped with a reason; OpenCV runs the result."""
    dense, inputs = golden_net(case)
    net = dense.copy()
    _, rows = prune_net(net, PruneSpec(fraction=0.5, structured=True))
    assert any(r.get("structured") for r in rows)
    assert all(r.get("reason") for r in rows if r.get("structured") is False)
    assert net.params() < dense.params()
    x = {k: v[:1] for k, v in inputs.items()}
    got = run_net(net, x, engine="opencv")
    want = run_net(dense, x, engine="opencv")
    for k in dense.outputs():
        assert got[k].shape == want[k].shape and np.isfinite(got[k]).all()


# ---- compress integration ---------------

def test_compress_prune_steps(tmp_path):
    from lrprune_caffe import api as C
    d = golden_case("lenet_mnist")
    proto, weights = d / "model.prototxt", d / "model.caffemodel"
    report, new = C.compress_files(proto, weights, tmp_path / "o", rank="ip1=32", prune="0.9,ip1=0.5",
                             verify=False)
    out = tmp_path / "o"
    net = load_net(out / "model.prototxt", out / "model.caffemodel")
    back = {wl.name: wl.blobs for wl in read_caffemodel(out / "model.caffemodel")}
    zeros = sum(int((b == 0).sum()) for blobs in back.values() for b in blobs)
    t = report["totals"]
    assert t["params_after"] - t["nonzero_params"] == zeros
    assert t["caffemodel_bytes"] == (out / "model.caffemodel").stat().st_size
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["ip1"]["action"] == "factorized+pruned"
    lr = [net.layer(n) for n in rows["ip1"]["new_layers"]]
    assert rows["ip1"]["nonzero_params"] == sum(int(np.count_nonzero(b)) for l in lr for b in l.blobs)
    assert rows["conv2"]["sparsity"] == pytest.approx(1 - rows["conv2"]["nonzero_params"] / 25050)
    masks = load_masks(out / "masks.npz", net)
    assert set(masks) == {"conv1/0", "conv2/0", "ip1_lr1/0", "ip1_lr2/0", "ip2/0"}
    assert (~masks["ip1_lr1/0"]).mean() == pytest.approx(0.5, abs=1e-3)
    # the original net (verification's reference) was not pruned
    orig = load_net(proto, weights)
    assert np.count_nonzero(orig.layer("conv2").blobs[0]) == 25000
    # structured: ip1's rank components (ip1_lr1 outputs) and conv1 filters; valid for OpenCV
    report, new = C.compress_files(proto, weights, tmp_path / "s", rank="ip1=32", prune="ip1=0.5,conv1=0.3",
                             prune_structured=True, verify=False)
    s = load_net(tmp_path / "s" / "model.prototxt", tmp_path / "s" / "model.caffemodel")
    assert s.layer("ip1_lr1").blobs[0].shape == (16, 800) and s.layer("ip1_lr2").blobs[0].shape == (500, 16)
    assert s.layer("conv1").blobs[0].shape[0] == 14 and not (tmp_path / "s" / "masks.npz").exists()
    x = load_npz(d / "inputs.npz")["data"][:4]
    assert run_net(s, {"data": x}, engine="opencv")["prob"].shape == (4, 10)
    # bad requests: one clear error, nothing written
    for kw, msg in ((dict(prune="1.5"), "outside"), (dict(prune="nolayer=0.5"), "no layer named"),
                    (dict(prune="ip2=0.5", prune_structured=True), "Softmax")):
        with pytest.raises(UserError, match=msg):
            C.compress_files(proto, weights, tmp_path / "bad", rank="ip1=32", verify=False, **kw)
        assert not (tmp_path / "bad").exists()


# ---- compress --prune options and the outcome summary, by hand ------------------------------

@pytest.mark.parametrize("opts, why", [
    ({"prune_scope": "global"}, "--prune-scope needs --prune FRACTION"),
    ({"quality": 0.5}, "--quality needs --prune FRACTION (or --prune-method std)"),
    ({"prune_method": "std", "prune": "0.5"}, "--prune takes no fraction with it"),
    ({"prune_method": "std", "prune": "conv1=0.3"}, "--prune takes no fraction with it"),
])
def test_prune_options_refused(opts, why):
    from lrprune_caffe.core.options import CompressOptions, prune_spec
    from lrprune_caffe.errors import UserError
    with pytest.raises(UserError) as e:
        prune_spec(CompressOptions(**opts))
    assert why in str(e.value)


def test_prune_options_accepted():
    from lrprune_caffe.core.options import CompressOptions, prune_spec
    assert prune_spec(CompressOptions()) is None
    std = CompressOptions(prune_method="std", prune="conv1=0", quality=0.5)
    assert prune_spec(std) is not None  # LAYER=0 leaves it out
    assert prune_spec(CompressOptions(prune=0.5)).fraction == 0.5


def _totals(**kw):
    t = {"macs_before": 1000, "macs_after": 400, "caffemodel_bytes": 1000, "onnx_bytes": None,
         "sparsity": 0.0, "csr_bytes": 1234, "dense_bytes": 5000}
    t.update(kw)
    return {"totals": t}


def outcome(report, original=None, sparse=False, dense_onnx_bytes=None, sparse_written=None):
    from lrprune_caffe.core.report import outcome as report_outcome
    size = original.stat().st_size if original is not None and original.exists() else None
    return report_outcome(report["totals"], size, sparse=sparse, dense_onnx_size=dense_onnx_bytes,
                          sparse_written=sparse_written)


def test_outcome_summary_by_hand(tmp_path):
    orig = tmp_path / "orig.caffemodel"
    orig.write_bytes(b"\0" * 2000)
    o = outcome(_totals(), orig)
    assert o["faster"] and o["caffemodel_smaller"] and o["caffemodel_ratio"] == 2.0
    assert o["original_caffemodel_bytes"] == 2000 and o["onnx_vs_dense"] is None
    assert o["summary"] == ("faster: 2.50x fewer multiply-adds in any dense runtime; "
                            "model.caffemodel 2.00x smaller than the original")
    o = outcome(_totals(macs_after=1000, caffemodel_bytes=1985), orig)  # ratio 1.0076: not 1 % smaller
    assert not o["faster"] and not o["caffemodel_smaller"]
    assert o["summary"].startswith("not faster: the same multiply-adds")
    assert "model.caffemodel not smaller (Caffe stores every blob dense, zeros included)" in o["summary"]
    o = outcome(_totals(onnx_bytes=300, sparsity=0.9), orig, sparse=True, dense_onnx_bytes=1000, sparse_written=3)
    assert o["onnx_vs_dense"] == 0.3
    assert o["summary"].endswith("model.onnx is 0.30x the size of its dense form (3 sparse initializers)")
    o = outcome(_totals(onnx_bytes=900, sparsity=0.3), orig, sparse=True, dense_onnx_bytes=900, sparse_written=0)
    assert o["onnx_vs_dense"] is None and "model.onnx stays dense" in o["summary"]
    # zeros kept dense: the CSR hint above 5 % zeros only
    o = outcome(_totals(sparsity=0.06), None)
    assert o["original_caffemodel_bytes"] is None and o["caffemodel_ratio"] is None
    assert o["summary"].endswith("or CSR 1,234 bytes vs 5,000 dense")
    assert "CSR" not in outcome(_totals(sparsity=0.04), None)["summary"]


def test_masks_npz_of_0_1_numbers_and_refusals(tmp_path):
    from lrprune_caffe.errors import BadFileError
    from lrprune_caffe.ir.masks import load_masks
    np.savez(tmp_path / "m.npz", **{"conv1/0": np.array([[0, 1], [1, 0]], np.uint8),
                                    "ip1/1": np.array([1.0, 0.0]), "a/b/0": np.array([True])})
    m = load_masks(tmp_path / "m.npz")
    assert m["conv1/0"].dtype == np.bool_ and m["conv1/0"].tolist() == [[False, True], [True, False]]
    assert m["ip1/1"].tolist() == [True, False] and "a/b/0" in m
    for arrays, why in (({"conv1": np.ones(2, bool)}, "is not '<layer>/<blob index>'"),
                        ({"conv1/x": np.ones(2, bool)}, "is not '<layer>/<blob index>'"),
                        ({"conv1/0": np.array([0, 2])}, "holds int64 values, expected bool")):
        np.savez(tmp_path / "bad.npz", **arrays)
        with pytest.raises(BadFileError, match=why):
            load_masks(tmp_path / "bad.npz")


def test_std_quality_must_be_a_number():
    from lrprune_caffe.errors import UserError
    from lrprune_caffe.transforms.prune import PruneSpec, check_spec
    d = golden_case("lenet_mnist")
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    for q in ("abc", -1):
        with pytest.raises(UserError, match=f"--quality: quality {q} must be a number >= 0"):
            check_spec(net, PruneSpec(method="std", quality=q))
    check_spec(net, PruneSpec(method="std", quality=0.7))


def test_dense_onnx_bytes_by_hand():
    from onnx import helper, numpy_helper
    from lrprune_caffe.export.sparse import to_sparse_tensor
    from lrprune_caffe.export.sparse import dense_onnx_bytes as _dense_onnx_bytes
    w = np.zeros((10, 10), np.float32)
    w[0, :3] = 1
    st = to_sparse_tensor(numpy_helper.from_array(w, "w"))
    dense = numpy_helper.from_array(w, "w")
    g = helper.make_graph([], "g", [], [], sparse_initializer=[st])
    gd = helper.make_graph([], "g", [], [], initializer=[dense])
    m, md = helper.make_model(g), helper.make_model(gd)
    # the same graph with the tensor dense: 400 bytes of floats instead of the sparse entry
    assert _dense_onnx_bytes(m) == m.ByteSize() - st.ByteSize() + 400
    assert 0 <= md.ByteSize() - _dense_onnx_bytes(m) < 20  # less the dense TensorProto's own header


# ---- the erk allocation (compress's default scope) ---------------------------------------------

def test_erk_allocation_keeps_the_net_fraction_and_small_layers():
    """Evci et al. 2020: density ~ sum(shape) / prod(shape), shared scale, layers over 1 left dense;
    the kept total is (1 - f) x all. On the 3x-factorized LeNet's shapes: conv2_lr2 (50 x 7 x 1 x 1) and
    ip2 dense, conv1 34.6%, the big FC factors above 90%."""
    from lrprune_caffe.transforms.prune import erk_fractions
    shapes = {"conv1": (20, 1, 5, 5), "conv2_lr1": (7, 20, 5, 5), "conv2_lr2": (50, 7, 1, 1),
              "ip1_lr1": (173, 800), "ip1_lr2": (500, 173), "ip2": (10, 500)}
    f = erk_fractions(shapes, 0.9)
    size = {n: int(np.prod(s)) for n, s in shapes.items()}
    kept = sum((1 - f[n]) * size[n] for n in shapes)
    assert kept == pytest.approx(0.1 * sum(size.values()))
    assert f["conv2_lr2"] == 0.0 and f["ip2"] == 0.0
    assert f["conv1"] == pytest.approx(0.346, abs=0.002) and f["ip1_lr1"] > 0.92
    free = [n for n in shapes if f[n] > 0]  # the same scale eps for the rest
    eps = {n: (1 - f[n]) * size[n] / sum(shapes[n]) for n in free}
    assert max(eps.values()) == pytest.approx(min(eps.values()))
    assert erk_fractions({"a": (10, 10)}, 0.5) == {"a": pytest.approx(0.5)}


def test_compress_default_scope_is_erk_and_layer_keeps_its_meaning():
    from lrprune_caffe.core.options import CompressOptions, prune_spec
    assert prune_spec(CompressOptions.from_kwargs(prune=0.9)).scope == "erk"
    assert prune_spec(CompressOptions.from_kwargs(prune=0.9, prune_structured=True)).scope == "layer"
    assert prune_spec(CompressOptions.from_kwargs(prune_method="std", quality=1.0)).scope == "layer"
    net, _ = golden_net("lenet_mnist")
    masks, rows = prune_net(net.copy(), PruneSpec(fraction=0.9, scope="erk", per_layer={"ip2": 0.5}))
    by = {r["name"]: r for r in rows}
    assert by["ip2"]["scope"] == "layer" and by["ip2"]["target"] == 0.5  # an override is pruned on its own
    assert by["conv1"].get("kept_dense") and "conv1/0" not in masks and not by["conv1"].get("pruned")
    w = {n: net.layer(n).blobs[0].size for n in ("conv1", "conv2", "ip1")}
    zeros = sum(int((~masks[f"{n}/0"]).sum()) for n in ("conv2", "ip1"))
    assert zeros == pytest.approx(0.9 * sum(w.values()), abs=2)
    with pytest.raises(UserError, match="erk"):
        prune_net(net.copy(), PruneSpec(scope="erk", method="std", quality=1.0))
