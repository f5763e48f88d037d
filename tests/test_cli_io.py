"""``inspect`` and ``convert`` through ``lrprune_caffe.cli.main.main`` and once as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import GOLDEN, GOLDEN_CASES, golden_case, load_npz, require_shared
from lrprune_caffe.ir.analysis import infer_shapes
from lrprune_caffe.io.caffe import load_net
from lrprune_caffe.cli.main import main
from lrprune_caffe.ir.net import array_to_blobproto
from lrprune_caffe.schema.proto import pb

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lenet"
PROTO, MODEL = EXAMPLE / "lenet.prototxt", EXAMPLE / "lenet.caffemodel"

# LeNet by hand: conv1 20x(1x5x5)+20, conv2 50x(20x5x5)+50, ip1 500x800+500, ip2 10x500+10
LENET_PARAMS = {"conv1": 520, "conv2": 25_050, "ip1": 400_500, "ip2": 5_010}
LENET_MACS = {"conv1": 20 * 24 * 24 * 25, "conv2": 50 * 8 * 8 * 20 * 25, "ip1": 800 * 500, "ip2": 500 * 10}


def run(capsys, *argv):
    rc = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return rc, out, err


def test_inspect_json(capsys):
    rc, out, err = run(capsys, "inspect", PROTO, MODEL, "--json")
    assert rc == 0 and err == ""
    info = json.loads(out)
    rows = {r["name"]: r for r in info["layers"]}
    for r in info["layers"]:
        assert {"name", "type", "tops", "output_shapes", "params", "macs"} <= set(r)
    assert [r["name"] for r in info["layers"]] == ["data", "conv1", "pool1", "conv2", "pool2",
                                                   "ip1", "relu1", "ip2", "prob"]
    assert rows["conv1"]["type"] == "Convolution" and rows["conv1"]["tops"] == ["conv1"]
    assert rows["conv1"]["output_shapes"] == [[1, 20, 24, 24]]
    assert rows["pool2"]["output_shapes"] == [[1, 50, 4, 4]]
    assert rows["prob"]["output_shapes"] == [[1, 10]]
    for name in LENET_PARAMS:
        assert rows[name]["params"] == LENET_PARAMS[name]
        assert rows[name]["macs"] == LENET_MACS[name]
    assert info["totals"] == {"params": sum(LENET_PARAMS.values()), "macs": sum(LENET_MACS.values())}


def test_inspect_without_weights_counts_the_same_params(capsys):
    _, with_w, _ = run(capsys, "inspect", PROTO, MODEL, "--json")
    rc, without, _ = run(capsys, "inspect", PROTO, "--json")
    assert rc == 0
    assert json.loads(without)["totals"] == json.loads(with_w)["totals"]


def test_inspect_table(capsys):
    rc, out, err = run(capsys, "inspect", PROTO, MODEL)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("net: LeNet") and "data 1x1x28x28" in lines[0]
    assert lines[1].split() == ["name", "type", "bottoms", "->", "tops", "output", "shape", "params", "MACs"]
    conv2 = next(s for s in lines if s.startswith("conv2 "))
    assert conv2.split() == ["conv2", "Convolution", "pool1", "->", "conv2", "1x50x8x8", "25.1K", "1.60M"]
    assert lines[-1] == "total: 431,080 params, 2,293,000 MACs"


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_inspect_golden_shapes(case, capsys):
    d = golden_case(case)
    rc, out, _ = run(capsys, "inspect", d / "model.prototxt", d / "model.caffemodel", "--json")
    assert rc == 0
    info = json.loads(out)
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    shapes = infer_shapes(net)
    for r in info["layers"]:
        assert [tuple(s) for s in r["output_shapes"]] == shapes.outputs[r["name"]]
    assert info["totals"]["params"] == net.params()
    # the batch in the prototxt aside, Caffe's shapes
    blobs = load_npz(d / "blobs.npz")
    final = {t: s for r in info["layers"] for t, s in zip(r["tops"], r["output_shapes"])}
    for name, arr in blobs.items():
        if "_split_" not in name:
            assert tuple(final[name][1:]) == arr.shape[1:], name


UNKNOWN = """name: "custom"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "mystery" type: "MyCustomUpsample" bottom: "conv" top: "up" }
layer { name: "fc" type: "InnerProduct" bottom: "up" top: "fc" inner_product_param { num_output: 5 } }
"""


def test_inspect_unknown_layer_prints_question_marks(tmp_path, capsys):
    p = tmp_path / "custom.prototxt"
    p.write_text(UNKNOWN)
    rc, out, _ = run(capsys, "inspect", p)
    assert rc == 0
    rows = {s.split()[0]: s.split() for s in out.splitlines()[3:-1]}
    assert rows["conv"][-3] == "1x4x6x6"
    assert rows["mystery"][1] == "MyCustomUpsample" and rows["mystery"][-3] == "?"
    assert rows["fc"][-3:] == ["?", "?", "?"]  # params and MACs unknown: '?', never 0
    rc, out, _ = run(capsys, "inspect", p, "--json")
    rows = {r["name"]: r for r in json.loads(out)["layers"]}
    assert rows["mystery"]["output_shapes"] == [None] and rows["fc"]["output_shapes"] == [None]


def test_inspect_phase_train(capsys):
    path = require_shared(GOLDEN / "lenet_mnist" / "train_test.prototxt")
    rc, out, _ = run(capsys, "inspect", path, "--phase", "TRAIN", "--json")
    assert rc == 0
    names = [r["name"] for r in json.loads(out)["layers"]]
    assert names == ["mnist", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "loss"]
    rc, out, _ = run(capsys, "inspect", path, "--json")
    assert [r["name"] for r in json.loads(out)["layers"]][-2:] == ["accuracy", "loss"]
    rc, out, _ = run(capsys, "inspect", path, "--phase", "TRAIN")
    assert rc == 0 and "inputs: (none)" in out.splitlines()[0]


def test_inspect_notes_unmatched_weights_on_stderr(tmp_path, capsys):
    net = load_net(PROTO, MODEL)
    msg = net.to_proto(with_blobs=True)
    ghost = msg.layer.add(name="ghost", type="InnerProduct")
    ghost.blobs.add().CopyFrom(array_to_blobproto(np.ones((2, 2), np.float32)))
    (tmp_path / "extra.caffemodel").write_bytes(msg.SerializeToString())
    rc, out, err = run(capsys, "inspect", PROTO, tmp_path / "extra.caffemodel")
    assert rc == 0 and "total: 431,080 params" in out
    assert err.startswith("note: ") and "ghost" in err and len(err.splitlines()) == 1


def test_convert_v1_lenet(tmp_path, capsys):
    d = golden_case("lenet_mnist_v1")
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "convert", d / "model.prototxt", d / "model.caffemodel", "-o", out)
    assert rc == 0 and err == ""
    assert sorted(p.name for p in out.iterdir()) == ["model.caffemodel", "model.prototxt"]
    assert stdout.splitlines() == [f"wrote {out / 'model.prototxt'}", f"wrote {out / 'model.caffemodel'}"]
    text = (out / "model.prototxt").read_text()
    assert "layers {" not in text and "input_dim" not in text and 'type: "Input"' in text
    written = pb.NetParameter.FromString((out / "model.caffemodel").read_bytes())
    assert len(written.layers) == 0 and all(b.HasField("shape") for lp in written.layer for b in lp.blobs)
    net = load_net(out / "model.prototxt", out / "model.caffemodel")
    ref = load_net(d / "model.prototxt", d / "model.caffemodel")
    assert net.to_proto(with_blobs=True) == ref.to_proto(with_blobs=True)


def test_convert_json_and_without_weights(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, stdout, err = run(capsys, "convert", PROTO, "-o", out, "--json")
    assert rc == 2 and "not empty" in err and "--force" in err  # an output folder holds one run
    assert (out / "keep.txt").read_text() == "mine"
    rc, stdout, _ = run(capsys, "convert", PROTO, "-o", out, "--json", "--force")
    assert rc == 0
    assert json.loads(stdout) == {"written": {"prototxt": str(out / "model.prototxt")}, "notes": []}
    assert sorted(p.name for p in out.iterdir()) == ["model.prototxt"]
    assert load_net(out / "model.prototxt").to_proto() == load_net(PROTO).to_proto()


def test_convert_train_phase(tmp_path, capsys):
    path = require_shared(GOLDEN / "lenet_mnist" / "train_test.prototxt")
    rc, _, _ = run(capsys, "convert", path, "--phase", "TRAIN", "-o", tmp_path / "o")
    assert rc == 0
    net = load_net(tmp_path / "o" / "model.prototxt", phase="TRAIN")
    assert [lr.name for lr in net.layers][-1] == "loss"
    assert net.layer("mnist").param_msg("data_param").source == "mnist_train_lmdb"


@pytest.mark.slow
def test_python_dash_m(tmp_path):
    """``python -m lrprune_caffe`` in a real process: inspect --json, then convert."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-m", "lrprune_caffe", "inspect", str(PROTO), str(MODEL), "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["totals"] == {"params": 431_080, "macs": 2_293_000}
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "lrprune_caffe", "convert", str(PROTO), str(MODEL), "-o", str(out)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (out / "model.caffemodel").read_bytes() == MODEL.read_bytes()  # same writer, same bytes
    assert (out / "model.prototxt").read_text() == PROTO.read_text()
