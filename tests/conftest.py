"""Shared fixtures: where ../shared/golden is, and which cases it has."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GOLDEN = SHARED / "golden"
GOLDEN_CASES = ["lenet_mnist", "lenet_mnist_v1", "cifar10_quick", "alexnet_mini", "resnet_mini",
                "inception_mini", "mobilenet_mini", "layer_zoo"]


def golden_case(name: str) -> Path:
    d = GOLDEN / name
    if not (d / "model.prototxt").exists():
        pytest.skip(f"golden case {name} not present at {d}")
    return d


def load_npz(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(params=GOLDEN_CASES)
def golden(request):
    """(case name, folder) for every golden case."""
    return request.param, golden_case(request.param)


def first_inputs(inputs: dict, n: int = 1) -> dict:
    """The first n samples of each input (LeNet's inputs hold 1,000 digits)."""
    return {k: v[:n] for k, v in inputs.items()}


def lenet_files():
    """(folder, prototxt, caffemodel) of the golden LeNet (skips where absent)."""
    d = golden_case("lenet_mnist")
    return d, str(d / "model.prototxt"), str(d / "model.caffemodel")


def run_cli(capsys, *argv):
    """Run the CLI in-process: (exit status, stdout, stderr)."""
    from lrprune_caffe.cli.main import main
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(autouse=True)
def _latency_defaults(monkeypatch, tmp_path_factory):
    """--speedup counts MACs in the suite (its budgets stay deterministic; tests of the latency cost ask
    for it), latency caches go to a temporary folder, and the measured speed-up takes 3 rounds."""
    from lrprune_caffe.core import latency_cost
    monkeypatch.setattr(latency_cost, "DEFAULT_COST", "macs")
    monkeypatch.setattr(latency_cost, "MEASURE_ROUNDS", 3)
    monkeypatch.setenv("LRPRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "lrprune-cache"))
