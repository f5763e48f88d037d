"""tools/bench_latency.py's quick mode end to end (one tiny net, one speed-up, few rounds), so the tool
does not rot: both budgets compress, every variant is measured on every engine asked for, and
RESULTS.md / results.json / the PNG are written. No timing assertions (a shared machine)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import bench_latency  # noqa: E402
import bench_latency_measure as M  # noqa: E402


def test_quick_mode_writes_the_table_json_and_plot(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.delenv("LRPRUNE_CACHE", raising=False)
    engines = "onnxruntime,mnn" if M.mnn_available() else "onnxruntime"
    plot = pytest.importorskip("matplotlib", reason="the plot needs matplotlib") is not None
    out = tmp_path / "out"
    argv = ["--nets", "tiny", "--speedups", "2", "--threads", "1", "--rounds", "3", "--engines", engines,
            "--workdir", str(tmp_path / "work"), "--cache", str(tmp_path / "cache"), "-o", str(out)]
    assert bench_latency.main(argv + ([] if plot else ["--no-plot"])) == 0
    res = json.loads((out / "results.json").read_text())
    rows = [r for r in res["rows"] if "error" not in r]
    assert {(r["cost"], r["engine"]) for r in rows} == {(c, e) for c in ("macs", "latency") for e in engines.split(",")}
    for r in rows:
        assert r["measured"] > 0 and r["p10"] <= r["p90"] and r["macs_cut"] > 1 and r["cpu_measured"] > 0
    assert res["tables"][0]["graphs"] > 0 and res["tables"][0]["seconds"] > 0  # a fresh cache: measured
    assert res["versions"]["onnxruntime"] and res["versions"]["numpy"] and "load average" in res["uptime_start"]
    md = (out / "RESULTS.md").read_text()
    assert "| tiny | 2 | macs | onnxruntime | 1 |" in md and "latency (t=1)" in md and "load" in md
    if plot:
        assert (out / "speedup_vs_macs.png").read_bytes()[:4] == b"\x89PNG"


def test_short_error_names_what_the_tables_predict():
    msg = ("--cost latency: --speedup 3.0 cannot be reached on onnxruntime 1.32.0, 1 thread(s): the latency tables "
           "predict at most 2.41x even with every layer at its fastest measured configuration")
    assert M.short_error(msg) == "unreachable: the tables predict at most 2.41x"
