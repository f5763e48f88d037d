"""ONNX files as first-class inputs (engines/model.py): evaluate and bench take MODEL.onnx where they
take NET WEIGHTS, and run the file as written; judged against real Caffe's LeNet accuracy (0.973)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import lenet_files, load_npz, run_cli

CAFFE_TOP1 = 0.973


@pytest.fixture(scope="module")
def lenet_onnx(tmp_path_factory):
    d, proto, model = lenet_files()
    out = tmp_path_factory.mktemp("onnx")
    from lrprune_caffe.export.onnx import export_files
    export_files(proto, model, out / "fixed.onnx")
    export_files(proto, model, out / "dyn.onnx", dynamic_batch=True)
    np.savez(out / "digits.npz", x=load_npz(d / "inputs.npz")["data"], y=load_npz(d / "labels.npz")["labels"])
    return out


@pytest.mark.parametrize("engine", ["onnxruntime", "opencv"])
@pytest.mark.parametrize("name", ["fixed.onnx", "dyn.onnx"])
def test_evaluate_onnx_file(lenet_onnx, capsys, engine, name):
    if engine == "opencv":
        pytest.importorskip("cv2", reason="opencv-python-headless is not installed")
    rc, out, err = run_cli(capsys, "evaluate", lenet_onnx / name, "--data", lenet_onnx / "digits.npz",
                           "--engine", engine, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["top1"] == pytest.approx(CAFFE_TOP1) and res["engine"] == engine and res["n"] == 1000


def test_evaluate_int8_dynamic_batch_on_opencv(lenet_onnx, tmp_path, capsys):
    """OpenCV 4.x gets int8 QDQ wrong at batch > 1; evaluate feeds it one sample at a time and says so."""
    pytest.importorskip("cv2", reason="opencv-python-headless is not installed")
    from lrprune_caffe.engines.model import OnnxModel
    from lrprune_caffe.export.precision import reduce_precision
    import onnx
    d, _, _ = lenet_files()
    x = load_npz(d / "inputs.npz")["data"]
    m, _ = reduce_precision(onnx.load(str(lenet_onnx / "dyn.onnx")), quantize="int8", calib={"data": x[:200]})
    onnx.save(m, str(tmp_path / "int8.onnx"))
    res = {}
    for engine in ("onnxruntime", "opencv"):
        rc, out, err = run_cli(capsys, "evaluate", tmp_path / "int8.onnx", "--data", lenet_onnx / "digits.npz",
                               "--engine", engine, "--json")
        assert rc == 0, err
        res[engine] = json.loads(out)
    assert res["opencv"]["top1"] == pytest.approx(res["onnxruntime"]["top1"], abs=0.002)
    assert any("one sample at a time" in n for n in res["opencv"]["notes"])
    assert OnnxModel.load(str(tmp_path / "int8.onnx")).quantized


def test_bench_caffe_and_onnx_side_by_side(lenet_onnx, capsys):
    _, proto, model = lenet_files()
    rc, out, err = run_cli(capsys, "bench", proto, model, lenet_onnx / "fixed.onnx", "--runs", "3",
                           "--warmup", "1", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert [n["label"] for n in res["nets"]] == [proto, str(lenet_onnx / "fixed.onnx")]
    assert res["ratio"] > 0


def test_bench_onnx_on_opencv(lenet_onnx, capsys):
    pytest.importorskip("cv2", reason="opencv-python-headless is not installed")
    rc, out, err = run_cli(capsys, "bench", lenet_onnx / "dyn.onnx", "--runtime", "opencv", "--runs", "2",
                           "--warmup", "0", "--json")
    assert rc == 0, err
    assert json.loads(out)["nets"][0]["median_ms"] > 0


def test_open_model_runs_file_as_written(lenet_onnx):
    """The fixed-batch file runs any number of inputs in chunks, equal to the dynamic one."""
    from lrprune_caffe.engines.model import open_model
    d, _, _ = lenet_files()
    x = load_npz(d / "inputs.npz")["data"][:7]
    a, b = open_model(str(lenet_onnx / "fixed.onnx")), open_model(str(lenet_onnx / "dyn.onnx"))
    assert a.fixed_batch() == 1 and b.fixed_batch() is None
    np.testing.assert_allclose(a.run({"data": x})["prob"], b.run({"data": x})["prob"], atol=1e-6)


@pytest.mark.parametrize("argv,expect", [
    (["evaluate", "NET", "--data", "DIGITS"], "needs its WEIGHTS.caffemodel"),
    (["evaluate", "BAD", "--data", "DIGITS"], "not an ONNX model"),
    (["evaluate", "FIXED", "W", "--data", "DIGITS"], "holds its weights"),
    (["bench", "FIXED", "FIXED", "FIXED"], "one model or two"),
    (["evaluate", "FIXED", "--data", "DIGITS", "--output", "nope"], "not an output"),
])
def test_onnx_input_errors(lenet_onnx, tmp_path, capsys, argv, expect):
    _, proto, model = lenet_files()
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    names = {"NET": proto, "W": model, "BAD": tmp_path / "bad.onnx", "FIXED": lenet_onnx / "fixed.onnx",
             "DIGITS": lenet_onnx / "digits.npz"}
    rc, _, err = run_cli(capsys, *[names.get(a, a) for a in argv])
    assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1, err
