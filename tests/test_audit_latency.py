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
