"""``compress`` and ``verify`` from the command line: outputs, report, rank rules, engine
fallback, and bad requests (ONE line on stderr, exit 2, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import lenet_files, run_cli, ROOT, golden_case, load_npz


lenet = lenet_files


run = run_cli


def small_inputs(tmp_path, n=50):
    d = golden_case("lenet_mnist")
    x = load_npz(d / "inputs.npz")["data"][:n]
    p = tmp_path / "inputs.npz"
    np.savez(p, data=x)
    return p, load_npz(d / "labels.npz")


# --- compress ------------------------------------------------------------------------

def test_compress_speedup_writes_everything(tmp_path, capsys):
    d, proto, model = lenet()
    inputs, _ = small_inputs(tmp_path)
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "compress", proto, model, "-o", out, "--speedup", "2", "--inputs", inputs,
                          "--engine", "opencv")
    assert rc == 0, err
    names = {p.name for p in out.iterdir()}
    assert names == {"model.prototxt", "model.caffemodel", "report.json", "report.md"}
    report = json.loads((out / "report.json").read_text())
    for row in report["layers"]:
        for key in ("name", "type", "action", "scheme", "rank", "energy_kept", "params_before", "params_after",
                    "macs_before", "macs_after", "weight_rel_error"):
            assert key in row
        if row["action"] != "factorized":
            assert row["reason"]
    t = report["totals"]
    assert set(t) >= {"params_before", "params_after", "macs_before", "macs_after"}
    assert t["macs_before"] / t["macs_after"] >= 2.0  # every conv/FC layer is selected by default
    ver = report["verification"]
    assert ver["engine"] == "opencv" and ver["batch"] == 50
    prob = ver["blobs"]["prob"]
    assert set(prob) >= {"max_abs", "rel_l2", "snr_db", "top1_agreement"}
    assert prob["top1_agreement"] > 0.8
    md = (out / "report.md").read_text()
    assert "| conv2 |" in md and "## Verification" in md
    assert "prob" in stdout and "wrote" in stdout


def test_compress_json_per_layer_ranks_tucker2(tmp_path, capsys):
    _, proto, model = lenet()
    rc, stdout, err = run(capsys, "compress", proto, model, "-o", tmp_path / "o", "--scheme", "tucker2",
                          "--rank", "conv2=6x12,ip1=40", "--no-verify", "--json")
    assert rc == 0, err
    report = json.loads(stdout)
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["conv2"]["rank"] == [6, 12] and rows["conv2"]["scheme"] == "tucker2"
    assert rows["conv2"]["new_layers"] == ["conv2_lr1", "conv2_lr2", "conv2_lr3"]
    assert rows["ip1"]["rank"] == 40 and rows["ip1"]["scheme"] == "fc"
    assert rows["conv1"]["action"] == "kept" and "not selected" in rows["conv1"]["reason"]
    assert report["verification"] == {"skipped": True}


def test_compress_energy_and_layers_regex(tmp_path, capsys):
    _, proto, model = lenet()
    rc, stdout, err = run(capsys, "compress", proto, model, "-o", tmp_path / "o", "--energy", "0.9",
                          "--layers", "ip.*", "--no-verify", "--json")
    assert rc == 0, err
    rows = {r["name"]: r for r in json.loads(stdout)["layers"]}
    assert rows["conv1"]["action"] == rows["conv2"]["action"] == "kept"
    assert rows["ip2"]["action"] == "factorized" and rows["ip2"]["energy_kept"] >= 0.9
    assert rows["ip2"]["rank"] < 10
    # the trained ip1 (500 x 800) has a flat spectrum: 90% energy needs a rank (309) above its
    # break-even (307), so it is left alone, and the report says why
    assert rows["ip1"]["action"] == "kept" and "would not cut MACs" in rows["ip1"]["reason"]


def test_compress_vbmf(tmp_path, capsys):
    _, proto, model = lenet()
    rc, stdout, err = run(capsys, "compress", proto, model, "-o", tmp_path / "o", "--rank-method", "vbmf",
                          "--layers", "conv2,ip1", "--no-verify", "--json")
    assert rc == 0, err
    rows = {r["name"]: r for r in json.loads(stdout)["layers"]}
    for name in ("conv2", "ip1"):
        r = rows[name]
        assert r["action"] == "factorized" or "would not cut" in r["reason"]
        assert 1 <= r["rank"] <= r["max_rank"]
    # LeNet's ip1 is close to its random initialization: VBMF keeps ~1% of its energy, and says so
    notes = json.loads(stdout)["notes"]
    assert any(n.startswith("layer ip1: VBMF judged most of its spectrum to be noise") for n in notes), notes


def test_compress_onnx_matches_caffe_files(tmp_path, capsys):
    cv2 = pytest.importorskip("cv2")
    from lrprune_caffe.engines.runtime import ort_session
    d, proto, model = lenet()
    out = tmp_path / "o"
    rc, _, err = run(capsys, "compress", proto, model, "-o", out, "--speedup", "3", "--onnx", "--no-verify")
    assert rc == 0, err
    x = load_npz(d / "inputs.npz")["data"][:1]
    ort_out = ort_session((out / "model.onnx").read_bytes()).run(["prob"], {"data": x})[0]
    cvnet = cv2.dnn.readNetFromCaffe(str(out / "model.prototxt"), str(out / "model.caffemodel"))
    cvnet.setInput(x, "data")
    np.testing.assert_allclose(ort_out, cvnet.forward("prob"), atol=1e-5)


def test_engine_falls_back_to_opencv_with_a_note(tmp_path, monkeypatch):
    pytest.importorskip("cv2")
    from lrprune_caffe.engines import runtime
    from lrprune_caffe.api import compress_files as compress
    from lrprune_caffe.ir.layers import NoLowering

    def no_lowering(*a, **k):
        raise NoLowering("no ONNX lowering for layer type 'Fancy'")
    monkeypatch.setattr(runtime, "run_onnxruntime", no_lowering)
    _, proto, model = lenet()
    report, _ = compress(proto, model, None, rank="conv2=10")
    ver = report["verification"]
    assert ver["engine"] == "opencv" and ver["requested_engine"] == "onnxruntime"
    assert any("Fancy" in n for n in ver["notes"])
    assert np.isfinite(ver["blobs"]["prob"]["rel_l2"])


# --- verify --------------------------------------------------------------------------

def test_verify_identical_and_compressed(tmp_path, capsys):
    pytest.importorskip("cv2")
    d, proto, model = lenet()
    inputs, _ = small_inputs(tmp_path, n=200)
    rc, stdout, err = run(capsys, "verify", proto, model, proto, model, "--inputs", inputs, "--engine", "opencv",
                          "--labels", d / "labels.npz", "--json")
    assert rc == 0, err
    res = json.loads(stdout)
    prob = res["blobs"]["prob"]
    assert prob["max_abs"] == 0 and prob["rel_l2"] == 0 and prob["snr_db"] is None
    assert prob["top1_agreement"] == 1.0
    out = tmp_path / "o"
    assert run(capsys, "compress", proto, model, "-o", out, "--speedup", "4", "--no-verify")[0] == 0
    rc, stdout, err = run(capsys, "verify", proto, model, out / "model.prototxt", out / "model.caffemodel",
                          "--engine", "opencv", "--inputs", inputs)
    assert rc == 0, err
    assert "prob" in stdout and "SNR" in stdout
    rc, stdout, err = run(capsys, "verify", proto, model, out / "model.prototxt", out / "model.caffemodel",
                          "--engine", "opencv", "--max-rel-l2", "1e-9")
    assert rc == 1 and "FAIL" in stdout


def test_compare_outputs_numbers():
    from lrprune_caffe.engines.compare import compare_outputs
    ref = {"p": np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), "f": np.ones((2, 3, 4, 4))}
    test = {"p": np.array([[1.0, 0.1, 0.0], [0.0, 2.0, 3.0]]), "f": np.ones((2, 3, 4, 4))}
    res = compare_outputs(ref, test, kinds={"p": "class_scores"})  # as a Softmax producer says
    p = res["blobs"]["p"]
    assert p["max_abs"] == pytest.approx(3.0)
    assert p["rel_l2"] == pytest.approx(np.sqrt(9.01 / 5))
    assert p["snr_db"] == pytest.approx(10 * np.log10(5 / 9.01))
    assert p["top1_agreement"] == 0.5
    assert res["blobs"]["f"]["top1_agreement"] is None and res["blobs"]["f"]["snr_db"] is None
    assert res["worst_rel_l2"] == pytest.approx(p["rel_l2"])


# --- bad requests: one line, exit 2, nothing written -----------------------------------

def _bad(t, proto, model):
    cifar = golden_case("cifar10_quick")
    return {
        "rank_zero": (["--rank", "0"], ["rank 0", "at least 1"]),
        "rank_zero_per_layer": (["--rank", "conv2=0"], ["at least 1"]),
        "rank_above_max": (["--rank", "conv2=51"], ["conv2", "Convolution", "outside 1..50"]),
        "tucker_rank_above_max": (["--scheme", "tucker2", "--rank", "conv2=21x8"], ["conv2", "outside 1..20x50"]),
        "rank_not_a_number": (["--rank", "conv2=abc"], ["not a rank"]),
        "rank_unknown_layer": (["--rank", "conv9=4"], ["conv9"]),
        "rank_non_conv_layer": (["--rank", "pool1=4"], ["pool1", "Pooling"]),
        "layers_match_nothing": (["--rank", "4", "--layers", "fc.*"], ["fc\\.\\*", "matches no"]),
        "layers_bad_regex": (["--rank", "4", "--layers", "conv[("], ["regular expression"]),
        "speedup_unreachable": (["--speedup", "1000"], ["1000", "cannot be reached", "at most"]),
        "speedup_below_one": (["--speedup", "0.5"], ["cannot be reached"]),
        "energy_out_of_range": (["--energy", "1.5"], ["--energy"]),
        "no_rank_rule": ([], ["--rank", "--energy", "--speedup"]),
        "vbmf_with_rank": (["--rank-method", "vbmf", "--rank", "4"], ["vbmf"]),
        "foreign_weights": (["--rank", "4", "--weights-override", str(cifar / "model.caffemodel")],
                            ["cifar10_quick", "model.caffemodel"]),
        "inputs_wrong_key": (["--rank", "4", "--inputs", "BADNPZ"], ["bad_inputs.npz", "data"]),
        "train_net_mismatch": (["--rank", "conv2=4", "--train-net", str(cifar / "model.prototxt")],
                               ["conv2", "deploy"]),
    }


@pytest.mark.parametrize("case", ["rank_zero", "rank_zero_per_layer", "rank_above_max", "tucker_rank_above_max",
                                  "rank_not_a_number", "rank_unknown_layer", "rank_non_conv_layer",
                                  "layers_match_nothing", "layers_bad_regex", "speedup_unreachable",
                                  "speedup_below_one", "energy_out_of_range", "no_rank_rule", "vbmf_with_rank",
                                  "foreign_weights", "inputs_wrong_key", "train_net_mismatch"])
def test_bad_request_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    _, proto, model = lenet()
    extra, patterns = _bad(tmp_path, proto, model)[case]
    extra = list(extra)
    if "--weights-override" in extra:
        i = extra.index("--weights-override")
        model = extra[i + 1]
        del extra[i:i + 2]
    if "BADNPZ" in extra:
        bad = tmp_path / "bad_inputs.npz"
        np.savez(bad, pixels=np.zeros((1, 1, 28, 28), np.float32))
        extra[extra.index("BADNPZ")] = str(bad)
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "compress", proto, model, "-o", out, *extra)
    assert rc == 2, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrprune-caffe: error:"), err
    assert "Traceback" not in err
    import re
    for p in patterns:
        assert re.search(p, lines[0]), (p, lines[0])
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    rc, _, _ = run(capsys, "compress", proto, model, "-o", existing, *extra)
    assert rc == 2 and list(existing.iterdir()) == []


def test_verify_foreign_weights_is_one_line(tmp_path, capsys):
    _, proto, model = lenet()
    cifar = golden_case("cifar10_quick")
    rc, _, err = run(capsys, "verify", proto, model, proto, cifar / "model.caffemodel")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cifar10_quick" in err


@pytest.mark.slow
def test_python_dash_m_compress(tmp_path):
    _, proto, model = lenet()
    out = tmp_path / "o"
    p = subprocess.run([sys.executable, "-m", "lrprune_caffe", "compress", proto, model, "-o", str(out),
                        "--rank", "conv2=51"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and not out.exists()
    p = subprocess.run([sys.executable, "-m", "lrprune_caffe", "compress", proto, model, "-o", str(out),
                        "--rank", "conv2=8", "--no-verify"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (out / "model.caffemodel").exists()


def test_budget_criterion_keeps_accuracy_at_3x():
    """Zhang et al.'s log-energy budget spreads the cuts; the plain discarded-energy one guts
    conv2 (rank 2) and loses a third of LeNet's accuracy without fine-tuning."""
    from lrprune_caffe.api import compress_files as compress
    from lrprune_caffe.engines.runtime import run_net
    d, proto, model = lenet()
    x = load_npz(d / "inputs.npz")["data"]
    y = load_npz(d / "labels.npz")
    y = y[next(iter(y))].reshape(-1)
    acc = {}
    for criterion in ("log-energy", "energy"):
        report, net = compress(proto, model, None, scheme="spatial", speedup=3, criterion=criterion, verify=False)
        assert report["selected_totals"]["macs_reduction"] >= 3
        out = run_net(net, {"data": x}, ["prob"], engine="onnxruntime")["prob"]  # a hard dependency
        acc[criterion] = float(np.mean(out.reshape(len(x), -1).argmax(1) == y))
    assert acc["log-energy"] > 0.93 and acc["log-energy"] > acc["energy"] + 0.1, acc
