"""Shared fixtures: where ../shared/golden is, and which cases it has.

A test that needs a file of ../shared asks :func:`require_shared` (or :func:`golden_case`):
it skips where the file is absent, except when the environment variable ``CI`` is set
(CI always has ../shared): there a missing file fails the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GOLDEN = SHARED / "golden"
GOLDEN_CASES = ["lenet_mnist", "lenet_mnist_v1", "cifar10_quick", "alexnet_mini", "resnet_mini",
                "inception_mini", "mobilenet_mini", "layer_zoo"]


def require_shared(path, what: str = None) -> Path:
    """``path`` (a file or folder of ../shared); skips where it is absent, fails under CI."""
    path = Path(path)
    if not path.exists():
        msg = f"{what or path.name} not present at {path}"
        if os.environ.get("CI"):
            pytest.fail(f"{msg}; CI must have {SHARED} (unset CI to skip instead)", pytrace=False)
        pytest.skip(msg)
    return path


def golden_case(name: str) -> Path:
    d = GOLDEN / name
    require_shared(d / "model.prototxt", f"golden case {name}")
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
    """Latency caches go to a temporary folder and the measured speed-up takes 3 rounds (--speedup
    counts MACs by default, so the suite's budgets are the ones users get)."""
    from lrprune_caffe.core import latency_cost
    monkeypatch.setattr(latency_cost, "MEASURE_ROUNDS", 3)
    monkeypatch.setenv("LRPRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "lrprune-cache"))


def pytest_configure(config):
    """Under pytest-xdist (``-n N``): one BLAS / OpenMP / torch thread per worker process (and in
    the processes tests start), so N workers use N cores instead of spinning N x cores threads."""
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")


# ---- slow tests, counted: the suite must stay under 2 minutes (README, Tests) ----------------

_DURATIONS = {"slow": [0, 0.0], "all": [0, 0.0]}


def pytest_runtest_logreport(report):
    """Per test (setup + call + teardown; with pytest-xdist these arrive at the controller)."""
    for kind in ("slow", "all") if "slow" in report.keywords else ("all",):
        _DURATIONS[kind][1] += report.duration
        if report.when == "call":
            _DURATIONS[kind][0] += 1


def pytest_terminal_summary(terminalreporter):
    (n_slow, t_slow), (n_all, t_all) = _DURATIONS["slow"], _DURATIONS["all"]
    if n_all:
        terminalreporter.write_line(f"slow tests (@pytest.mark.slow): {n_slow} of {n_all} run, {t_slow:.1f} s "
                                    f"of {t_all:.1f} s of test time")
