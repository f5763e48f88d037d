"""Audit of compress --speedup's latency default as a user runs it, checked against real consumers."""

from __future__ import annotations

import json

from conftest import GOLDEN, golden_case, require_shared, run_cli


def test_speedup_on_a_train_val_net_falls_back_and_notes_it(capsys, tmp_path):
    """A train_val given as NET (golden lenet_lmdb: a TEST Data layer, no ONNX lowering) used to die
    with exit 2 in the latency default's 1-ms profile (and, with --cost macs, in the measured speed-up)
    after the work was done. It now falls back to macs and notes that the speed-up was not measured."""
    lmdb, lenet = require_shared(GOLDEN / "lenet_lmdb"), golden_case("lenet_mnist")
    for extra in ((), ("--cost", "macs")):
        out = tmp_path / ("o" + "".join(extra))
        rc, stdout, err = run_cli(capsys, "compress", lmdb / "train_val.prototxt", lenet / "model.caffemodel",
                                  "-o", out, "--speedup", "2", *extra)
        assert rc == 0, err
        report = json.loads((out / "report.json").read_text())
        notes = " ".join(report["notes"])
        assert "speed-up not measured" in notes and "'Data'" in notes
        if not extra:
            assert "the latency cost was not used, the net could not be timed" in notes
        assert "speed" not in report


def test_measured_speedup_says_it_timed_the_fp32_net_when_model_onnx_is_int8(capsys, tmp_path):
    """Audit: with --quantize int8 the outcome line read "1.71x measured" while what was timed is the
    fp32 written net, not the int8 model.onnx next to it."""
    onnx = __import__("pytest").importorskip("onnx")
    lenet = golden_case("lenet_mnist")
    out = tmp_path / "o"
    rc, stdout, err = run_cli(capsys, "compress", lenet / "model.prototxt", lenet / "model.caffemodel", "-o", out,
                              "--speedup", "2", "--onnx", "--quantize", "int8", "--no-verify",
                              "--inputs", lenet / "inputs.npz")
    assert rc == 0, err
    model = onnx.load(str(out / "model.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # model.onnx really is int8
    report = json.loads((out / "report.json").read_text())
    assert "of the fp32 net (model.onnx is int8, not timed)" in report["outcome"]["summary"]
    assert "int8" in report["speed"]["measured_net"]
    assert "of the fp32 net" in " ".join(stdout.split())
