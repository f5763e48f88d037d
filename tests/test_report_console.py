"""compress's console summary fits 100 columns on every golden net, shows '?' for unknown values and
only the fields that mean something per action; the plots render as PNGs that report.md links."""

from __future__ import annotations

import json

import pytest

from conftest import GOLDEN_CASES, golden_case, run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def _summary(out):
    lines = out.splitlines()
    return lines[: next(i for i, s in enumerate(lines) if s.startswith("per-layer table"))]


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_compress_summary_fits_100_columns(case, tmp_path, capsys):
    d = golden_case(case)
    rc, out, err = run_cli(capsys, "compress", d / "model.prototxt", d / "model.caffemodel", "-o", tmp_path / "o",
                           "--energy", "0.9", "--prune", "0.5", "--onnx", "--sparse", "--quiet")
    assert rc == 0, err
    summary = _summary(out)
    assert summary and max(len(s) for s in summary) <= 100, "\n".join(s for s in summary if len(s) > 100)
    assert "outcome:" in out and "check:" in out
    assert " 0 MACs" not in out and "1.00x fewer" not in out and "left alone: " not in out
    md = (tmp_path / "o" / "report.md").read_text()
    for line in summary:  # report.md holds everything the console says
        assert line.strip().split(": ", 1)[-1][:40] in md.replace("\n  ", " ")


def test_fields_per_action(tmp_path, capsys):
    d = golden_case("lenet_mnist")
    rc, out, err = run_cli(capsys, "compress", d / "model.prototxt", d / "model.caffemodel", "-o", tmp_path / "o",
                           "--prune", "0.5", "--prune-structured", "--no-verify", "--verbose", "--quiet")
    assert rc == 0, err
    rows = [s for s in out.splitlines() if s.startswith(("conv", "ip"))]
    assert rows and all("1.0000" not in r and "0.0000" not in r for r in rows), rows  # no energy kept / err
    assert "check: skipped" in out


def test_report_png_linked(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    d = golden_case("resnet_mini")
    rc, out, err = run_cli(capsys, "compress", d / "model.prototxt", d / "model.caffemodel", "-o", tmp_path / "o",
                           "--speedup", "1.5", "--prune", "0.5", "--plot", "--quiet")
    assert rc == 0, err
    assert (tmp_path / "o" / "report.png").read_bytes()[:8] == PNG
    assert "](report.png)" in (tmp_path / "o" / "report.md").read_text()


def test_rounds_and_bench_png():
    pytest.importorskip("matplotlib")
    from lrprune_caffe.core import plots
    rounds = [{"step": "factorize (spatial, 2x MACs)", "top1_after_step": 0.96, "top1": 0.97, "epochs": 1},
              {"step": "prune to 50% over the net", "top1_after_step": 0.95, "top1": 0.968, "epochs": 2}]
    rep = {"schedule": "lowrank-prune", "goal_top1": 0.966, "rounds": rounds,
           "original": {"top1": 0.971, "macs": 100, "nonzero_params": 1000},
           "final": {"macs": 50, "nonzero_params": 500}}
    assert plots.rounds_png(rep)[:8] == PNG
    res = {"runtime": "onnxruntime", "threads": 1, "runs": 5, "versions": {"onnxruntime": "x"}, "speedup": 1.5,
           "nets": [{"label": "A", "median_ms": 1.0, "min_ms": 0.9, "p90_ms": 1.2},
                    {"label": "B", "median_ms": 0.7, "min_ms": 0.6, "p90_ms": 0.8}]}
    assert plots.bench_png(res)[:8] == PNG


def test_bench_plot_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    d = golden_case("lenet_mnist")
    rc, out, err = run_cli(capsys, "bench", d / "model.prototxt", d / "model.caffemodel", "--runs", "3",
                           "--warmup", "1", "--plot", tmp_path / "lat.png", "--json")
    assert rc == 0, err
    assert json.loads(out)["plot"] == str(tmp_path / "lat.png")
    assert (tmp_path / "lat.png").read_bytes()[:8] == PNG


def test_evaluate_separate_labels(tmp_path, capsys):
    import numpy as np
    from conftest import ROOT
    d = np.load(ROOT / "examples" / "lenet" / "digits_test.npz")
    np.savez(tmp_path / "in.npz", data=d["x"][:200])
    np.savez(tmp_path / "lab.npz", labels=d["y"][:200])
    lenet = [ROOT / "examples" / "lenet" / "lenet.prototxt", ROOT / "examples" / "lenet" / "lenet.caffemodel"]
    rc, out, err = run_cli(capsys, "evaluate", *lenet, "--data", tmp_path / "in.npz", "--labels",
                           tmp_path / "lab.npz", "--json")
    assert rc == 0, err
    np.savez(tmp_path / "both.npz", x=d["x"][:200], y=d["y"][:200])
    rc2, out2, _ = run_cli(capsys, "evaluate", *lenet, "--data", tmp_path / "both.npz", "--json")
    assert json.loads(out)["top1"] == json.loads(out2)["top1"]
    np.savez(tmp_path / "short.npz", labels=d["y"][:10])
    rc, _, err = run_cli(capsys, "evaluate", *lenet, "--data", tmp_path / "in.npz", "--labels", tmp_path / "short.npz")
    assert rc == 2 and "10 labels for the 200 inputs" in err
