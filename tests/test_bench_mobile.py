"""tools/bench_mobile.py runs end to end (a smoke test: it measures, nothing here asserts a speed)."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import GOLDEN, ROOT, lenet_files


@pytest.mark.slow
def test_bench_mobile_runs(capsys):
    lenet_files()  # skips without the golden corpus
    spec = importlib.util.spec_from_file_location("bench_mobile", ROOT / "tools" / "bench_mobile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--cases", "lenet_mnist", "--runs", "2", "--warmup", "0", "--json",
                     "--golden", str(GOLDEN)]) == 0
    import json
    (entry,) = json.loads(capsys.readouterr().out)
    rows = {r["label"]: r for r in entry["onnxruntime"]}
    assert sorted(rows) == sorted(f"{s} {k}" for s in ("original", "compressed") for k in ("fp32", "fp16", "int8"))
    assert rows["original int8"]["bytes"] < 0.3 * rows["original fp32"]["bytes"]
    assert rows["original fp32"]["top1"] == 0.973 and entry["threads"] == 1 and entry["batch"] == 1
