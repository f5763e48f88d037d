"""The mobile test matrix: every kind of ONNX file we write x every consumer.

golden nets (+ ssd_mini; lenet_mnist_v1 is lenet_mnist after Caffe's upgrade, left out)
x {dense, compressed, sparse, fp16, int8} x {onnxruntime, MNN, OpenCV's ONNX reader}.

* onnxruntime, against an independent reference: dense against real Caffe's blobs (golden);
  compressed and sparse against OpenCV's Caffe reader on the written caffemodel; fp16 and int8
  against the fp32 export (reduced precision changes the numbers: looser tolerances, and for
  detections recall / precision at IoU 0.5 instead of a tensor distance).
* MNN and OpenCV, against onnxruntime on the same file: within 1e-3 relative L2 for fp32 files.
* A cell is skipped only when ``export.precision.consumer_notes`` (what the commands print) says that
  consumer will not take the file, with that sentence as the reason; ``test_consumer_notes_are_true``
  checks the claims in a child process (MNN's converter aborts the process on such files).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import GOLDEN_CASES, golden_case, load_npz

CASES = [c for c in GOLDEN_CASES if c != "lenet_mnist_v1"] + ["ssd_mini"]
VARIANTS = ["dense", "compressed", "sparse", "fp16", "int8"]
RUNTIMES = ["onnxruntime", "mnn", "opencv"]
#: onnxruntime on a reduced-precision file vs the fp32 export (relative L2 of non-detection outputs)
REDUCED_TOL = {"fp16": 1e-2, "int8": 0.25}
#: MNN / OpenCV vs onnxruntime on the same file
CONSUMER_TOL = {"dense": 1e-3, "compressed": 1e-3, "sparse": 1e-3, "fp16": 1e-2, "int8": 0.1}

_BUILT: dict = {}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _build(case, root):
    """{variant: (onnx path, model notes)} plus the reference data, built once per case."""
    if case in _BUILT:
        return _BUILT[case]
    import onnx
    from lrprune_caffe.api import compress_files as compress
    from lrprune_caffe.export.onnx import export_model
    from lrprune_caffe.export.precision import consumer_notes, reduce_precision
    from lrprune_caffe.export.sparse import sparsify_model
    from lrprune_caffe.io.caffe import load_net
    d = golden_case(case)
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    inputs = load_npz(d / "inputs.npz")
    name = net.inputs()[0]
    out = root / case
    out.mkdir()
    dense = export_model(net)
    report, small = compress(d / "model.prototxt", d / "model.caffemodel", out / "c", speedup=1.3, prune=0.9,
                             onnx=True, verify=False)
    compressed = onnx.load(str(out / "c" / "model.onnx"))
    calib = {name: inputs[name][:200]}
    models = {"dense": dense, "compressed": compressed, "sparse": sparsify_model(compressed),
              "fp16": reduce_precision(dense, precision="fp16")[0],
              "int8": reduce_precision(dense, quantize="int8", calib=calib)[0]}
    built = {"net": net, "small": small, "x": {name: inputs[name][:1]}, "blobs": load_npz(d / "blobs.npz"),
             "files": {}, "notes": {}, "outputs": net.outputs()}
    for v, m in models.items():
        path = out / f"{v}.onnx"
        onnx.save(m, str(path))
        built["files"][v] = path
        built["notes"][v] = consumer_notes(m)
    _BUILT[case] = built
    return built


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix")


def _ort(path, x, outputs):
    from lrprune_caffe.engines.model import OnnxModel
    return OnnxModel.load(str(path)).run(x, outputs, threads=1)


def _mnn(path, x, outputs, tmp):
    mnn = pytest.importorskip("MNN", reason="MNN is not installed (pip install MNN; the mobile extra)")
    from test_onnx import _mnn_convert
    import MNN.expr as F
    target = tmp / (path.stem + ".mnn")
    _mnn_convert(path, target)
    name, arr = next(iter(x.items()))
    module = mnn.nn.load_module_from_file(str(target), [name], outputs)
    ys = module.forward([F.const(arr, list(arr.shape), F.NCHW)])
    assert len(ys) == len(outputs), f"MNN ran {path.name} but gave {len(ys)} outputs"
    return {n: np.array(F.convert(y, F.NCHW).read()) for n, y in zip(outputs, ys)}


def _opencv(path, x, outputs):
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is not installed")
    net = cv2.dnn.readNetFromONNX(str(path))
    for k, v in x.items():
        net.setInput(v, k)
    return {n: np.array(y, copy=True) for n, y in zip(outputs, net.forward(outputs))}


def _close(got, ref, outputs, tol, what):
    from lrprune_caffe.engines.detection import looks_like_detections, match_detections
    for n in outputs:
        if looks_like_detections(ref[n].shape) or looks_like_detections(np.shape(got[n])):
            m = match_detections(ref[n], got[n])
            need = 1.0 if tol <= 1e-3 else 0.8
            assert m["recall"] >= need and m["precision"] >= need, f"{what} {n}: {m}"
            if tol <= 1e-3 and m["matched"]:
                assert m["mean_iou"] > 0.999 and m["max_score_change"] < 1e-3, f"{what} {n}: {m}"
        else:
            e = rel_l2(got[n], ref[n])
            assert e <= tol, f"{what} {n}: relative L2 {e:.3g} > {tol}"


def _skip_reason(notes, consumer):
    key = {"mnn": "MNN", "opencv": "OpenCV"}[consumer]
    said = [n for n in notes if key in n.split(" take")[0] and "not take" in n]
    return said[0] if said else None


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_matrix(case, variant, runtime, root, tmp_path):
    b = _build(case, root)
    path, outs, x = b["files"][variant], b["outputs"], b["x"]
    if runtime == "onnxruntime":
        got = _ort(path, x, outs)
        if variant == "dense":
            _close(got, {n: b["blobs"][n][:1] for n in outs}, outs, 1e-4, f"{case} dense vs Caffe")
        elif variant in ("compressed", "sparse"):
            pytest.importorskip("cv2", reason="opencv-python-headless is not installed")
            from lrprune_caffe.engines.runtime import run_net
            ref = run_net(b["small"], x, outs, engine="opencv")
            _close(got, ref, outs, 1e-3, f"{case} {variant} vs OpenCV's Caffe reader")
        else:
            ref = _ort(b["files"]["dense"], x, outs)
            _close(got, ref, outs, REDUCED_TOL[variant], f"{case} {variant} vs fp32")
        return
    reason = _skip_reason(b["notes"][variant], runtime)
    if reason:
        pytest.skip(reason)
    ref = _ort(path, x, outs)
    got = _mnn(path, x, outs, tmp_path) if runtime == "mnn" else _opencv(path, x, outs)
    _close(got, ref, outs, CONSUMER_TOL[variant], f"{case} {variant} {runtime} vs onnxruntime")


_CHILD = """
import sys
import numpy as np
kind, path, npz = sys.argv[1], sys.argv[2], sys.argv[3]
x = dict(np.load(npz))
import onnxruntime as ort
sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
outs = [o.name for o in sess.get_outputs()]
ref = sess.run(outs, x)
if kind == "mnn":
    import _tools, MNN, MNN.expr as F
    ok = _tools.mnnconvert(["mnnconvert", "-f", "ONNX", "--modelFile", path, "--MNNModel", path + ".mnn",
                            "--bizCode", "lrprune-caffe"])
    if not ok:
        sys.exit(3)
    (name, arr), = x.items()
    ys = MNN.nn.load_module_from_file(path + ".mnn", [name], outs).forward([F.const(arr, list(arr.shape), F.NCHW)])
    if len(ys) != len(outs):
        sys.exit(4)
    got = [np.array(F.convert(y, F.NCHW).read()) for y in ys]
else:
    import cv2
    net = cv2.dnn.readNetFromONNX(path)
    for k, v in x.items():
        net.setInput(v, k)
    got = net.forward(outs)
for a, b in zip(got, ref):
    if np.shape(a) != np.shape(b) or np.linalg.norm(a - b) > 0.1 * np.linalg.norm(b):
        sys.exit(5)
"""


CLAIMS = [("lenet_mnist", "sparse", "mnn"), ("lenet_mnist", "sparse", "opencv"),
          ("ssd_mini", "dense", "opencv")] + [(c, "int8", "mnn") for c in CASES]


@pytest.mark.parametrize("case,variant,runtime", CLAIMS)
def test_consumer_notes_are_true(root, tmp_path, case, variant, runtime):
    """What the commands say a consumer will not take, it does not take or run (in a child process:
    MNN's converter aborts the process on such files)."""
    pytest.importorskip({"mnn": "MNN", "opencv": "cv2"}[runtime])
    b = _build(case, root)
    assert _skip_reason(b["notes"][variant], runtime), b["notes"][variant]
    np.savez(tmp_path / "x.npz", **b["x"])
    r = subprocess.run([sys.executable, "-c", _CHILD, runtime, str(b["files"][variant]), str(tmp_path / "x.npz")],
                       capture_output=True, timeout=120)
    assert r.returncode != 0, f"{runtime} took and ran the {variant} file of {case}: update consumer_notes"
