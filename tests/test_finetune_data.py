"""finetune on a train_val: TRAIN source through a DataLoader, TEST source to validate;
worker processes, torchrun processes, checkpoints and --resume.

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

from conftest import GOLDEN, ROOT, run_cli

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
    if not (SPLIT.exists() and (MNIST / "model.caffemodel").exists() and BODY.exists()):
        pytest.skip("golden LeNet / MNIST split not present")
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
    assert sorted(os.listdir(tmp_path / "two")) == ["history.json", "model.caffemodel", "model.prototxt"]


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
