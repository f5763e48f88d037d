"""evaluate on a train_val: its data layer gives the data, preprocessing and batches.

References are real Caffe's: golden lenet_lmdb's ``caffe.json`` (its Accuracy layer
over 4 TEST batches, scale + mean_file) and ``data.npz`` (its Data layer's first
batch); for ``scale`` alone and for HDF5, Caffe's own ``ip2`` scores of the same
digits in golden lenet_mnist (the LMDB holds its first 200 held-out digits).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import GOLDEN, load_npz, require_shared, run_cli

LMDB_CASE = GOLDEN / "lenet_lmdb"
MNIST = GOLDEN / "lenet_mnist"


@pytest.fixture
def case():
    require_shared(LMDB_CASE / "train_val.prototxt")
    require_shared(MNIST / "model.caffemodel")
    pytest.importorskip("lmdb")
    return LMDB_CASE


def _caffe_top1_scale_only(n=200):
    """Caffe's Accuracy on the first n held-out digits fed as pixels / 256 (from Caffe's ip2)."""
    ip2 = load_npz(MNIST / "blobs.npz")["ip2"][:n]
    labels = load_npz(MNIST / "labels.npz")["labels"][:n]
    return float(np.mean(ip2.argmax(1) == labels))


def _body(case):
    text = (case / "train_val.prototxt").read_text()
    return text[text.index('layer { name: "conv1"'):]


def _write_trainval(tmp_path, data_layer, case):
    p = tmp_path / "train_val.prototxt"
    p.write_text('name: "LeNet"\n' + data_layer + "\n" + _body(case))
    return p


def test_first_batch_is_caffes(case):
    from lrprune_caffe.engines.evaluate import load_train_val
    net, pdata, scores = load_train_val(case / "train_val.prototxt", MNIST / "model.caffemodel")
    assert (pdata.batch_size, scores, net.inputs()) == (50, "ip2", ["data"])
    x, y = next(pdata.dataset.batches(pdata.batch_size))
    ref = load_npz(case / "data.npz")
    np.testing.assert_array_equal(x, ref["data"])  # mean subtracted, then scaled, in float32: bit-exact
    np.testing.assert_array_equal(y, ref["label"].astype(np.int64))


def test_evaluate_train_val_equals_caffe_test(case, capsys, monkeypatch):
    monkeypatch.chdir(case)  # Caffe resolves the prototxt's paths against its working folder
    caffe = json.loads((case / "caffe.json").read_text())
    rc, out, err = run_cli(capsys, "evaluate", "train_val.prototxt", MNIST / "model.caffemodel", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["n"] == caffe["iterations"] * caffe["batch_size"] == 200
    assert res["batch_size"] == caffe["batch_size"]
    assert res["top1"] == pytest.approx(caffe["accuracy"], abs=1e-6)


def test_train_val_paths_resolve_next_to_the_prototxt(case, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the prototxt's folder: paths fall back to it
    rc, out, _ = run_cli(capsys, "evaluate", case / "train_val.prototxt", MNIST / "model.caffemodel")
    assert rc == 0 and out.startswith("top-1 0.7900 (158/200)")


def test_scale_only(case, tmp_path):
    from lrprune_caffe.engines.evaluate import evaluate_files
    layer = ('layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TEST }\n'
             '  transform_param { scale: 0.00390625 }\n'
             f'  data_param {{ source: "{case / "digits_lmdb"}" batch_size: 40 backend: LMDB }} }}')
    p = _write_trainval(tmp_path, layer, case)
    res = evaluate_files(p, MNIST / "model.caffemodel")
    assert (res["n"], res["batch_size"]) == (200, 40)
    assert res["top1"] == pytest.approx(_caffe_top1_scale_only(), abs=1e-9)
    # caffe test --iterations 6 x 40: wraps to the first 40 digits again
    res = evaluate_files(p, MNIST / "model.caffemodel", iterations=6)
    ip2 = load_npz(MNIST / "blobs.npz")["ip2"]
    labels = load_npz(MNIST / "labels.npz")["labels"]
    idx = np.arange(240) % 200
    assert res["n"] == 240
    assert res["correct_top1"] == int(np.sum(ip2[idx].argmax(1) == labels[idx]))


def test_hdf5_source(case, tmp_path):
    h5py = pytest.importorskip("h5py")
    from lrprune_caffe.engines.evaluate import evaluate_files
    x = load_npz(MNIST / "inputs.npz")["data"][:200]
    y = load_npz(MNIST / "labels.npz")["labels"][:200].astype(np.float32)
    for k, sl in enumerate((slice(0, 120), slice(120, 200))):
        with h5py.File(tmp_path / f"part{k}.h5", "w") as f:
            f["data"], f["label"] = x[sl], y[sl]
    (tmp_path / "test_h5.txt").write_text(f"{tmp_path / 'part0.h5'}\n{tmp_path / 'part1.h5'}\n")
    layer = ('layer { name: "mnist" type: "HDF5Data" top: "data" top: "label" include { phase: TEST }\n'
             f'  hdf5_data_param {{ source: "{tmp_path / "test_h5.txt"}" batch_size: 64 }} }}')
    res = evaluate_files(_write_trainval(tmp_path, layer, case), MNIST / "model.caffemodel")
    assert (res["n"], res["batch_size"]) == (200, 64)
    assert res["top1"] == pytest.approx(_caffe_top1_scale_only(), abs=1e-9)


def test_train_phase_random_crop_shapes_the_input(case, tmp_path):
    from lrprune_caffe.engines.evaluate import load_train_val
    layer = ('layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TRAIN }\n'
             f'  transform_param {{ scale: 0.00390625 crop_size: 24 mirror: true mean_file: '
             f'"{case / "mean.binaryproto"}" }}\n'
             f'  data_param {{ source: "{case / "digits_lmdb"}" batch_size: 10 backend: LMDB }} }}')
    p = _write_trainval(tmp_path, layer, case)
    _, pdata, _ = load_train_val(p, None, phase="TRAIN")
    assert pdata.dataset.sample_shape == (1, 24, 24)
    ds = pdata.dataset
    e0 = [ds[i][0] for i in range(10)]
    for i in range(10):  # one (seed, epoch, index): one crop and flip
        np.testing.assert_array_equal(ds[i][0], e0[i])
    ds.set_epoch(1)
    assert any(not np.array_equal(ds[i][0], e0[i]) for i in range(10))  # a new epoch draws anew
