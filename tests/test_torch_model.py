"""The PyTorch model built from the IR computes what real Caffe computed (golden blobs)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

from conftest import GOLDEN_CASES, ROOT, golden_case, load_npz, require_shared

torch = pytest.importorskip("torch")

from lrprune_caffe.io.caffe import load_net  # noqa: E402
from lrprune_caffe.errors import UserError  # noqa: E402
from lrprune_caffe.ir.net import Layer, Net  # noqa: E402
from lrprune_caffe.schema.proto import pb  # noqa: E402
from lrprune_caffe.train.torch_model import build_torch_model, run_torch  # noqa: E402

TOL = 1e-4  # relative to max |golden|


def net_from_text(text, blobs=None, seed=0):
    """A Net from prototxt text; ``blobs`` {layer: [arrays]}, else seeded random blobs where needed."""
    from lrprune_caffe.ir.analysis import expected_weight_shapes, infer_shapes, validate
    msg = text_format.Parse(text, pb.NetParameter())
    net = Net(name=msg.name, layers=[Layer.from_proto(lp) for lp in msg.layer], source="<test>")
    rng = np.random.default_rng(seed)
    shapes = infer_shapes(net)
    for layer in net.layers:
        if blobs and layer.name in blobs:
            layer.blobs = [np.asarray(b, np.float32) for b in blobs[layer.name]]
            continue
        for s in expected_weight_shapes(net, layer, shapes) or []:
            layer.blobs.append(rng.standard_normal(s).astype(np.float32))
    validate(net)
    return net


def opencv_forward(net, inputs, blobs):
    cv2 = pytest.importorskip("cv2")
    import tempfile
    from pathlib import Path
    from lrprune_caffe.io.caffe import save_net
    with tempfile.TemporaryDirectory() as d:
        p, m = Path(d) / "m.prototxt", Path(d) / "m.caffemodel"
        save_net(net, p, m)
        cv = cv2.dnn.readNetFromCaffe(str(p), str(m))
    for k, v in inputs.items():
        cv.setInput(v, k)
    return dict(zip(blobs, (np.asarray(r) for r in cv.forward(blobs))))


def assert_close(ours, ref, what):
    scale = max(float(np.abs(ref).max()), 1e-12)
    err = float(np.abs(np.asarray(ours).reshape(ref.shape) - ref).max()) / scale
    assert err <= TOL, f"{what}: max error {err:.2e} relative to max |ref| {scale:.3g}"


# ---- golden: every case, every non-split blob, all inputs ----------------------

@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_forward_matches_real_caffe(case):
    d = golden_case(case)
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    inputs = load_npz(d / "inputs.npz")  # lenet: all 1,000 digits
    gold = load_npz(d / "blobs.npz")
    ours = run_torch(net, inputs, all_blobs=True)
    checked = 0
    for name, ref in gold.items():
        if "_split_" in name:  # Caffe's auto-inserted Split blobs are not in our nets
            continue
        assert name in ours, f"{case}: blob '{name}' not exposed"
        assert ours[name].shape == ref.shape, f"{case}/{name}: {ours[name].shape} vs {ref.shape}"
        assert_close(ours[name], ref, f"{case}/{name}")
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("case", ["lenet_mnist", "resnet_mini", "layer_zoo"])
def test_weights_go_back_exactly(case):
    d = golden_case(case)
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    model = build_torch_model(net)
    back = net.copy()
    for layer in back.layers:  # scramble, then write back
        layer.blobs = [np.zeros_like(b) for b in layer.blobs]
    model.write_back(back)
    for a, b in zip(net.layers, back.layers):
        for x, y in zip(a.blobs, b.blobs):
            assert y.dtype == np.float32 and y.shape == x.shape
            assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), a.name


def test_dynamic_batch_and_gradients():
    d = golden_case("lenet_mnist")
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    x = load_npz(d / "inputs.npz")["data"][:5]
    whole = run_torch(net, {"data": x})["prob"]
    one = np.concatenate([run_torch(net, {"data": x[i:i + 1]})["prob"] for i in range(5)])
    np.testing.assert_allclose(whole, one, rtol=0, atol=1e-6)
    model = build_torch_model(net).train()
    out = model(torch.from_numpy(x), outputs=["ip2"])["ip2"]
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3, 4])).backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.params)
    assert model.keys == ["conv1/0", "conv1/1", "conv2/0", "conv2/1", "ip1/0", "ip1/1", "ip2/0", "ip2/1"]


# ---- Caffe conventions not all in the golden corpus, against OpenCV's Caffe reader ----

POOL_NET = """
name: "pools"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 13 dim: 11 } } }
layer { name: "ave_pad" type: "Pooling" bottom: "data" top: "ave_pad"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ave_ceil" type: "Pooling" bottom: "data" top: "ave_ceil"
  pooling_param { pool: AVE kernel_h: 4 kernel_w: 3 stride_h: 3 stride_w: 2 } }
layer { name: "max_pad" type: "Pooling" bottom: "data" top: "max_pad"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "max_ceil" type: "Pooling" bottom: "data" top: "max_ceil"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ave_big_pad" type: "Pooling" bottom: "data" top: "ave_big_pad"
  pooling_param { pool: AVE kernel_size: 5 stride: 3 pad: 2 } }
layer { name: "gmax" type: "Pooling" bottom: "data" top: "gmax" pooling_param { pool: MAX global_pooling: true } }
layer { name: "lrn_w" type: "LRN" bottom: "data" top: "lrn_w"
  lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL } }
layer { name: "lrn_a" type: "LRN" bottom: "data" top: "lrn_a"
  lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 } }
layer { name: "lrn_k" type: "LRN" bottom: "data" top: "lrn_k"
  lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 } }
layer { name: "lrn_wk" type: "LRN" bottom: "data" top: "lrn_wk"
  lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 norm_region: WITHIN_CHANNEL } }
"""


def test_pooling_and_lrn_match_opencv():
    net = net_from_text(POOL_NET)
    x = np.random.default_rng(1).standard_normal((2, 3, 13, 11)).astype(np.float32)
    # lrn_wk: Caffe's WITHIN_CHANNEL uses shift 1 whatever k is, as OpenCV does
    names = ["ave_pad", "ave_ceil", "max_pad", "max_ceil", "ave_big_pad", "gmax", "lrn_w", "lrn_a", "lrn_wk"]
    ours = run_torch(net, {"data": x}, outputs=names)
    ref = opencv_forward(net, {"data": x}, names)
    for n in names:
        assert ours[n].shape == ref[n].shape, n
        assert_close(ours[n], ref[n], n)
    # OpenCV ignores LRN's k (uses 1); Caffe's lrn_layer.cpp: x * (k + alpha/n * sum x^2)^-beta
    sq = np.pad(x * x, ((0, 0), (2, 2), (0, 0), (0, 0)))
    window = sum(sq[:, i:i + 3] for i in range(5))
    caffe = x * (2.0 + 0.5 / 5 * window) ** -0.75
    assert_close(run_torch(net, {"data": x}, outputs=["lrn_k"])["lrn_k"], caffe, "lrn_k")


def test_ave_pool_divisor_is_caffes():
    """Caffe divides by the window clipped to the padded input (not k*k, not real pixels)."""
    net = net_from_text("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 3 dim: 3 } } }
layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 } }
""")
    x = np.ones((1, 1, 3, 3), np.float32)
    out = run_torch(net, {"data": x})["p"][0, 0]
    # output 2x2 (ceil): windows rows [-1,1) [1,3): all inside the padded 5x5, divisor 4
    # real pixels per window: 1, 2, 2, 4
    np.testing.assert_array_equal(out, np.array([[1, 2], [2, 4]], np.float32) / 4)


BN_NET = """
layer { name: "data2" type: "Input" top: "data2" input_param { shape { dim: 2 dim: 4 dim: 2 dim: 2 } } }
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 3 dim: 5 } } }
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param { eps: 0.001 } }
layer { name: "sc" type: "Scale" bottom: "bn" top: "sc" scale_param { bias_term: true } }
layer { name: "bias" type: "Bias" bottom: "sc" top: "bias" }
layer { name: "crop" type: "Crop" bottom: "bias" bottom: "data2" top: "crop" crop_param { axis: 2 offset: 1 offset: 2 } }
"""


def test_batchnorm_scale_bias_crop_against_numpy():
    rng = np.random.default_rng(3)
    mean, var = rng.standard_normal(4), rng.random(4) + 0.5
    blobs = {"bn": [mean * 7.5, var * 7.5, [7.5]], "sc": [rng.standard_normal(4), rng.standard_normal(4)],
             "bias": [rng.standard_normal(4)]}
    net = net_from_text(BN_NET, blobs)
    x = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
    out = run_torch(net, {"data": x, "data2": np.zeros((2, 4, 2, 2), np.float32)},
                    outputs=["bn", "bias", "crop"])
    c = (None, slice(None), None, None)
    bn = (x - mean[c]) / np.sqrt(var[c] + 0.001)
    np.testing.assert_allclose(out["bn"], bn, rtol=1e-5, atol=1e-5)
    full = bn * blobs["sc"][0][c] + blobs["sc"][1][c] + blobs["bias"][0][c]
    np.testing.assert_allclose(out["bias"], full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["crop"], full[:, :, 1:3, 2:4], rtol=1e-5, atol=1e-5)


def test_unsupported_layer_is_a_user_error():
    net = net_from_text("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }
layer { name: "perm" type: "Permute" bottom: "data" top: "perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
""")
    with pytest.raises(UserError, match=r"layer 'perm' \(Permute\)"):
        build_torch_model(net)


def test_param_specs_freeze_and_share():
    net = net_from_text("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 6 } } }
layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" } param { lr_mult: 0 }
  inner_product_param { num_output: 6 } }
layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" param { name: "w" } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 6 } }
""")
    net.layer("b").blobs[0] = net.layer("a").blobs[0].copy()
    model = build_torch_model(net)
    assert model.blob_param["a/0"] == model.blob_param["b/0"]
    assert not model.params[model.blob_param["a/1"]].requires_grad
    assert model.specs[model.blob_param["b/1"]] == (2.0, 0.0)


@pytest.mark.slow
def test_nothing_else_imports_torch():
    """evaluate, the CLI and the data loaders run without importing torch."""
    d = golden_case("lenet_mnist")
    code = (
        "import sys\n"
        "from lrprune_caffe.cli.main import main\n"
        "import lrprune_caffe.train, lrprune_caffe.data.datasets, lrprune_caffe.engines.evaluate, lrprune_caffe.cli.train\n"
        f"rc = main(['evaluate', r'{d / 'model.prototxt'}', r'{d / 'model.caffemodel'}', "
        f"'--data-split', r'{d.parent.parent / 'data' / 'mnist5k_split.npz'}', '--json'])\n"
        "assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    require_shared(d.parent.parent / "data" / "mnist5k_split.npz")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
