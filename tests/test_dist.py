"""Processes and devices of finetune / pipeline: the process group's backend (NCCL for cuda, gloo
for cpu), one clear line when cuda is asked for without a GPU, and DataLoader worker processes
over a LevelDB (one opener per database: the main process reads raw records, workers decode)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import GOLDEN, require_shared, run_cli
from lrprune_caffe.errors import UserError

torch = pytest.importorskip("torch")
from lrprune_caffe.train import loop  # noqa: E402


def test_backend_follows_the_device():
    assert loop.backend_for("cpu") == "gloo"
    assert loop.backend_for(None) == "gloo"
    assert loop.backend_for("cuda") == "nccl"
    assert loop.backend_for("cuda:1") == "nccl"
    with pytest.raises(UserError, match="choose cpu or cuda"):
        loop.backend_for("tpu")


@pytest.mark.parametrize("device,backend", [("cpu", "gloo"), ("cuda", "nccl")])
def test_dist_context_joins_with_that_backend(monkeypatch, device, backend):
    """Under torchrun (WORLD_SIZE 2) the process group is created with the device's backend;
    on cuda each process takes its LOCAL_RANK's GPU. (No GPU here: cuda is faked.)"""
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.setdefault("gpu", i))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda b, **kw: seen.update(backend=b, timeout=kw.get("timeout")))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    d = loop.dist_context(device)
    assert seen["backend"] == backend == d.backend and (d.rank, d.world, d.main) == (1, 2, False)
    assert seen["timeout"].total_seconds() == loop.DIST_TIMEOUT_S
    assert d.device == ("cuda:1" if device == "cuda" else "cpu")
    assert seen.get("gpu") == (1 if device == "cuda" else None)


def test_cuda_without_a_gpu_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU"):
        loop.check_device("cuda")
    assert loop.check_device("cpu") == "cpu"
    net = GOLDEN / "lenet_mnist"
    require_shared(net / "model.caffemodel")
    x = np.zeros((4, 1, 28, 28), np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(4, np.int64))
    for cmd in (["finetune"], ["pipeline", "--val", tmp_path / "d.npz"]):
        # checked before any process starts or any data is read
        rc, _, err = run_cli(capsys, *cmd, net / "model.prototxt", net / "model.caffemodel", "--data",
                             tmp_path / "d.npz", "-o", tmp_path / "o", "--device", "cuda", "--nproc-per-node", 2)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and "--device cuda" in lines[0] and "Traceback" not in err, err
        assert not (tmp_path / "o").exists()


def _leveldb(path, n=24, seed=0):
    plyvel = pytest.importorskip("plyvel")
    from lrprune_caffe.data.caffe_io import array_to_datum
    rng = np.random.default_rng(seed)
    db = plyvel.DB(str(path), create_if_missing=True)
    for i in range(n):
        db.put(f"{i:08d}".encode(), array_to_datum(rng.integers(0, 256, (3, 8, 7), dtype=np.uint8), i % 5))
    db.close()


@pytest.mark.slow
def test_leveldb_with_worker_processes(tmp_path):
    """--workers N on a LevelDB: the same batches as --workers 0, random crop / mirror included
    (epoch 2 differs from epoch 1), while the main process keeps the database open."""
    from lrprune_caffe.data.sources import DBSource
    from lrprune_caffe.data.stream import StreamDataset
    from lrprune_caffe.data.transformer import Transformer
    _leveldb(tmp_path / "db")
    torch.set_num_threads(1)

    def run(workers):
        ds = StreamDataset(DBSource(tmp_path / "db"), Transformer(scale=0.5, crop=5, mirror=True, phase="TRAIN"),
                           str(tmp_path / "db"), seed=3)
        assert not ds.multiprocess
        sampler = loop.EpochBatches(len(ds), 5, seed=1)
        loader = loop.train_loader(ds, sampler, workers)
        out = []
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            out.append([(x.numpy(), y.numpy()) for x, y in loader])
        ds.records.close()
        return out

    ref, two = run(0), run(2)
    assert [len(e) for e in ref] == [5, 5]
    for e_ref, e_two in zip(ref, two):
        for (x0, y0), (x2, y2) in zip(e_ref, e_two):
            assert x0.shape[1:] == (3, 5, 5)
            np.testing.assert_array_equal(x0, x2)
            np.testing.assert_array_equal(y0, y2)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(ref[0], ref[1]))


@pytest.mark.slow
def test_a_bad_input_under_several_processes_is_one_line(tmp_path):
    """--nproc-per-node 2 and data that is not there: every process fails; one line, exit 2."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    net = GOLDEN / "lenet_mnist"
    require_shared(net / "model.caffemodel")
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "lrprune_caffe", "pipeline", str(net / "model.prototxt"),
                        str(net / "model.caffemodel"), "--data", str(tmp_path / "bad.npz"), "--val",
                        str(tmp_path / "bad.npz"), "-o", str(tmp_path / "o"), "--nproc-per-node", "2"],
                       env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "bad.npz" in lines[0], p.stderr
    assert not (tmp_path / "o").exists()
