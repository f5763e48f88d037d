"""finetune and pipeline on a train_val: TRAIN source through a DataLoader, TEST source to
validate, the train_val written beside the deploy net; worker processes, torchrun processes,
checkpoints and --resume.

The databases are LMDBs of MNIST digits written here (Caffe's convert_mnist_data
layout: raw 1x28x28 Datum records, keys %08d), the net golden LeNet.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import GOLDEN, ROOT, require_shared, run_cli

pytest.importorskip("torch")
lmdb = pytest.importorskip("lmdb")
SPLIT = GOLDEN.parent / "data" / "mnist5k_split.npz"
MNIST = GOLDEN / "lenet_mnist"
BODY = GOLDEN / "lenet_lmdb" / "train_val.prototxt"


def _write_lmdb(path, x, y):
    from lrprune_caffe.data.caffe_io import array_to_datum
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, (a, lab) in enumerate(zip(x, y)):
            txn.put(f"{i:08d}".encode(), array_to_datum(a[None], int(lab)))
    env.close()


def _data_layer(name, phase, source, batch):
    return (f'layer {{ name: "{name}" type: "Data" top: "data" top: "label" include {{ phase: {phase} }}\n'
            f'  transform_param {{ scale: 0.00390625 }}\n'
            f'  data_param {{ source: "{source}" batch_size: {batch} backend: LMDB }} }}\n')


@pytest.fixture(scope="module")
def train_val(tmp_path_factory):
    for path in (SPLIT, MNIST / "model.caffemodel", BODY):
        require_shared(path)
    d = tmp_path_factory.mktemp("tv")
    with np.load(SPLIT) as z:
        _write_lmdb(d / "train_lmdb", z["x_train"][:512], z["y_train"][:512])
        _write_lmdb(d / "test_lmdb", z["x_test"][:200], z["y_test"][:200])
    text = BODY.read_text()
    body = text[text.index('layer { name: "conv1"'):]
    p = d / "train_val.prototxt"
    p.write_text('name: "LeNet"\n' + _data_layer("train", "TRAIN", d / "train_lmdb", 32)
                 + _data_layer("test", "TEST", d / "test_lmdb", 50) + body)
    return p


def _weights(outdir):
    from lrprune_caffe.io.caffe import load_net
    net = load_net(Path(outdir) / "model.prototxt", Path(outdir) / "model.caffemodel")
    return {f"{layer.name}/{i}": b for layer in net.layers for i, b in enumerate(layer.blobs)}, net


def _finetune(capsys, train_val, outdir, *extra):
    rc, stdout, err = run_cli(capsys, "finetune", train_val, MNIST / "model.caffemodel", "-o", outdir,
                              "--lr", "0.01", "--json", *extra)
    assert rc == 0, err
    return json.loads(stdout)["history"]


def test_finetune_train_val(train_val, tmp_path, capsys):
    h = _finetune(capsys, train_val, tmp_path / "w0")
    assert (h["n_train"], h["n_val"], h["batch_size"], h["iterations"]) == (512, 200, 32, 16)
    assert h["val"].endswith("test_lmdb") and h["train"].endswith("train_lmdb")
    assert h["final_eval"]["n"] == 200
    _, net = _weights(tmp_path / "w0")
    assert [layer.type for layer in net.layers][0] == "Input"  # the written model is the deploy net
    assert not any(layer.type in ("Data", "Accuracy", "SoftmaxWithLoss") for layer in net.layers)
    assert not (tmp_path / "w0" / "checkpoint.pt").exists()  # removed once the model is written
    _check_written_train_val(tmp_path / "w0", h["final_eval"]["top1"])


def _layers(net):
    return [(la.name, la.type, list(la.bottoms), list(la.tops)) for la in net.layers]


def _check_written_train_val(outdir, top1):
    """OUTDIR/train_val.prototxt: every phase; its TEST view with the written weights is the written
    deploy net, and evaluating it on its own TEST source gives the written net's accuracy. (OpenCV's
    Caffe reader ignores phase rules, so it refuses any train_val with a TRAIN and a TEST data
    layer ("Duplicate blobs"): the written deploy net is what OpenCV reads.)"""
    from lrprune_caffe.data.trainval import load_train_val
    from lrprune_caffe.engines.evaluate import evaluate_files
    from lrprune_caffe.io.caffe import load_net
    from lrprune_caffe.io.train_net import read_train_net
    tv_path, deploy = Path(outdir) / "train_val.prototxt", Path(outdir) / "model.prototxt"
    full = read_train_net(tv_path)
    assert {la.type for la in full.layers} >= {"Data", "Accuracy", "SoftmaxWithLoss"}
    assert [la.name for la in full.layers if la.type == "Data"] == ["train", "test"]
    tv = load_train_val(tv_path, Path(outdir) / "model.caffemodel")
    written = load_net(deploy, Path(outdir) / "model.caffemodel")
    assert _layers(tv.net) == _layers(written)
    for a, b in zip(tv.net.layers, written.layers):
        for x, y in zip(a.blobs, b.blobs):
            np.testing.assert_array_equal(x, y)
    res = evaluate_files(tv_path, Path(outdir) / "model.caffemodel")
    assert res["n"] == 200 and abs(res["top1"] - top1) < 1e-9


@pytest.mark.slow
def test_workers_do_not_change_the_training(train_val, tmp_path, capsys):
    _finetune(capsys, train_val, tmp_path / "w0", "--no-final-eval")
    _finetune(capsys, train_val, tmp_path / "w2", "--no-final-eval", "--workers", 2)
    w0, _ = _weights(tmp_path / "w0")
    w2, _ = _weights(tmp_path / "w2")
    for k in w0:  # worker processes decode; they do not change what is trained
        np.testing.assert_array_equal(w0[k], w2[k])


def _cli(*argv, env=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "lrprune_caffe", *[str(a) for a in argv]], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_equal_one_at_the_same_global_batch(train_val, tmp_path):
    common = ["--lr", "0.01", "--epochs", "2", "--threads", "1", "--quiet", "--no-final-eval"]
    one = _cli("finetune", train_val, MNIST / "model.caffemodel", "-o", tmp_path / "one",
               "--batch-size", 32, *common)
    two = _cli("finetune", train_val, MNIST / "model.caffemodel", "-o", tmp_path / "two",
               "--batch-size", 16, "--nproc-per-node", 2, *common)
    for p in (one, two):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    w1, _ = _weights(tmp_path / "one")
    w2, _ = _weights(tmp_path / "two")
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    assert h2["processes"] == 2 and h2["iterations"] == 32
    for k in w1:  # the same steps, up to float summation order
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-4 * max(1.0, float(np.abs(w1[k]).max())))
    assert sorted(os.listdir(tmp_path / "two")) == ["history.json", "model.caffemodel", "model.prototxt",
                                                    "train_val.prototxt"]


@pytest.mark.slow
def test_resume_after_a_kill(train_val, tmp_path):
    args = ["finetune", train_val, MNIST / "model.caffemodel", "--lr", "0.01", "--epochs", "4",
            "--threads", "1", "--quiet", "--no-final-eval"]
    full = _cli(*args, "-o", tmp_path / "full")
    ckpt = tmp_path / "ck.pt"
    run = _cli(*args, "-o", tmp_path / "cut", "--checkpoint", ckpt)
    t0 = time.time()
    while not ckpt.exists() and run.poll() is None and time.time() - t0 < 300:
        time.sleep(0.005)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    assert ckpt.exists() and not (tmp_path / "cut" / "model.caffemodel").exists(), "killed too late"
    resumed = _cli(*args, "-o", tmp_path / "cut", "--checkpoint", ckpt, "--resume")
    for p in (full, resumed):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    h = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert h["resumed"]["epoch"] >= 1 and [e["epoch"] for e in h["epochs"]] == [1, 2, 3, 4]
    wf, _ = _weights(tmp_path / "full")
    wc, _ = _weights(tmp_path / "cut")
    for k in wf:
        np.testing.assert_array_equal(wc[k], wf[k])


@pytest.mark.slow
def test_pipeline_two_processes_equal_one(train_val, tmp_path, capsys):
    """pipeline under plain torchrun (2 gloo processes at batch 16) takes the same rounds as one process
    at batch 32 (with a DataLoader worker decoding): the same masks, weights within float summation order, the same accuracies; one
    set of files, the train_val rewritten as the factorized net."""
    common = ["--schedule", "lowrank-prune", "--speedup", "2", "--prune-steps", "0.5", "--tolerance", "0",
              "--max-epochs", "1", "--threads", "1", "--quiet"]
    # plain torchrun here (finetune's test above starts its processes with --nproc-per-node)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            "-m", "lrprune_caffe", "pipeline", str(train_val), str(MNIST / "model.caffemodel"),
                            "-o", str(tmp_path / "two"), "--batch-size", "16", *common], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rc, _, err = run_cli(capsys, "pipeline", train_val, MNIST / "model.caffemodel", "-o", tmp_path / "one",
                         "--batch-size", 32, "--workers", 1, *common)
    assert rc == 0, err
    _, err = two.communicate(timeout=600)
    assert two.returncode == 0, err
    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert (r2["options"]["processes"], r1["options"]["processes"]) == (2, 1)
    assert [r["epochs"] for r in r2["rounds"]] == [r["epochs"] for r in r1["rounds"]] == [1, 1]
    assert [r["iterations"] for r in r2["rounds"]] == [r["iterations"] for r in r1["rounds"]] == [16, 16]
    for a, b in zip(r1["rounds"], r2["rounds"]):
        assert abs(a["top1"] - b["top1"]) <= 0.01 and a["nonzero_params"] == b["nonzero_params"]
    with np.load(tmp_path / "one" / "masks.npz") as m1, np.load(tmp_path / "two" / "masks.npz") as m2:
        assert sorted(m1.files) == sorted(m2.files) and any("_lr" in k for k in m1.files)
        for k in m1.files:
            np.testing.assert_array_equal(m1[k], m2[k])
    w1, net1 = _weights(tmp_path / "one")
    w2, net2 = _weights(tmp_path / "two")
    assert _layers(net1) == _layers(net2)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-4 * max(1.0, float(np.abs(w1[k]).max())))
    names = {"model.prototxt", "model.caffemodel", "masks.npz", "report.json", "report.md", "train_val.prototxt"}
    assert names <= set(os.listdir(tmp_path / "two")) <= names | {"rounds.png"}
    _check_written_train_val(tmp_path / "two", r2["final"]["top1"])
