"""``bench``: what it reports and how it measures (interleaved, batch 1). No speed is asserted."""

from __future__ import annotations

import json

import pytest

from conftest import golden_case

from lrprune_caffe.engines import bench
from lrprune_caffe.engines.bench import bench_nets
from lrprune_caffe.io.caffe import load_net
from lrprune_caffe.cli.main import main
from lrprune_caffe.errors import UserError


def _net(case):
    d = golden_case(case)
    return load_net(d / "model.prototxt", d / "model.caffemodel")


def test_two_nets_onnxruntime_report():
    a, b = _net("lenet_mnist"), _net("cifar10_quick")
    res = bench_nets([a, b], runtime="onnxruntime", threads=1, runs=3, warmup=1, progress=False)
    assert res["runtime"] == "onnxruntime" and res["threads"] == 1 and res["batch"] == 1
    assert res["runs"] == 3 and res["warmup"] == 1
    assert {"onnxruntime", "onnx", "numpy", "python", "cpu_count"} <= set(res["versions"])
    assert [n["label"] for n in res["nets"]] == ["LeNet", "CIFAR10_quick"]
    for n in res["nets"]:
        assert n["runs"] == 3 and 0 < n["min_ms"] <= n["median_ms"] <= n["p90_ms"]
    assert res["ratio"] == pytest.approx(res["nets"][1]["median_ms"] / res["nets"][0]["median_ms"])
    assert res["speedup"] == pytest.approx(1 / res["ratio"])
    assert res["paired_ratio"] > 0


def test_one_net_opencv():
    res = bench_nets([_net("cifar10_quick")], runtime="opencv", threads=1, runs=2, warmup=0, progress=False)
    assert "opencv" in res["versions"] and len(res["nets"]) == 1 and "ratio" not in res


def test_runs_are_interleaved(monkeypatch):
    calls = []

    class Fake:
        def __init__(self, net, threads, opset):
            self.name = net

        def __call__(self):
            calls.append(self.name)

    monkeypatch.setattr(bench, "_OrtRunner", Fake)
    monkeypatch.setattr(bench, "_versions", lambda runtime: {})
    bench_nets(["A", "B"], runs=4, warmup=1, labels=["A", "B"], progress=False)
    assert calls[:2] == ["A", "B"]  # warmup
    assert calls[2:] == ["A", "B", "B", "A", "A", "B", "B", "A"]


@pytest.mark.parametrize("kw,match", [({"runtime": "tflite"}, "unknown runtime"),
                                      ({"runs": 0}, "runs must be"),
                                      ({"threads": 0}, "threads must be")])
def test_bad_arguments(kw, match):
    with pytest.raises(UserError, match=match):
        bench_nets([object()], **kw)


def test_cli_bench_json_and_text(capsys):
    d1, d2 = golden_case("lenet_mnist"), golden_case("mobilenet_mini")
    argv = ["bench", str(d1 / "model.prototxt"), str(d1 / "model.caffemodel"),
            str(d2 / "model.prototxt"), str(d2 / "model.caffemodel"), "--runs", "2", "--warmup", "1"]
    assert main(argv + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["threads"] == 1 and len(res["nets"]) == 2 and "ratio" in res
    assert main(argv + ["--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "threads 2" in out and "onnxruntime" in out and "ratio B/A" in out and "median" in out


def test_cli_bench_wrong_number_of_paths(capsys):
    d = golden_case("lenet_mnist")
    rc = main(["bench", str(d / "model.prototxt"), str(d / "model.caffemodel"), str(d / "model.prototxt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "needs its WEIGHTS.caffemodel after it" in err[0]
