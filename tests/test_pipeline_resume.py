"""``pipeline --checkpoint/--resume``: a run killed (SIGKILL) after a fine-tuning epoch and resumed
ends exactly as an unkilled run (the same rounds, masks, caffemodel bytes); the default checkpoint
sits beside OUTDIR and is removed once the run is written; a checkpoint of another run is refused
with one line. The golden LeNet, a few hundred digits, one torch thread."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import GOLDEN, ROOT, golden_case, require_shared, run_cli

pytest.importorskip("torch")
SPLIT = GOLDEN.parent / "data" / "mnist5k_split.npz"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    require_shared(SPLIT)
    d = golden_case("lenet_mnist")
    from lrprune_caffe.data.datasets import load_mnist_split
    train, test = load_mnist_split(SPLIT)
    t = tmp_path_factory.mktemp("digits")
    np.savez(t / "train.npz", x=train.x[:320], y=train.y[:320])
    np.savez(t / "val.npz", x=test.x[:300], y=test.y[:300])
    return [str(d / "model.prototxt"), str(d / "model.caffemodel"), "--data", str(t / "train.npz"),
            "--val", str(t / "val.npz")]


# tolerance 0: both rounds fine-tune, 2 epochs of 5 iterations each
ARGS = ["--schedule", "han", "--prune-steps", "0.8,0.9", "--tolerance", "0", "--max-epochs", "2",
        "--threads", "1", "--quiet"]


def _start(files, out, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "lrprune_caffe", "pipeline", *files, *ARGS, "-o", str(out),
                             *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _rounds(out):
    rep = json.loads((out / "report.json").read_text())
    return rep, [{k: v for k, v in r.items() if k != "train_time_s"} for r in rep["rounds"]]


@pytest.mark.slow
def test_resume_after_a_kill_equals_an_unkilled_run(files, tmp_path, capsys):
    ckpt = tmp_path / ".cut.checkpoint.pt"  # the default: beside OUTDIR
    run = _start(files, tmp_path / "cut")
    # writes: 1 after round 1's step, 2 after its first epoch; kill right after the second
    writes, last, t0 = 0, None, time.time()
    while writes < 2 and run.poll() is None and time.time() - t0 < 300:
        try:
            ino = os.stat(ckpt).st_ino
        except FileNotFoundError:
            ino = None
        if ino is not None and ino != last:
            writes, last = writes + 1, ino
        if writes < 2:
            time.sleep(0.002)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    assert ckpt.exists() and not (tmp_path / "cut").exists(), "killed too late"
    # the unkilled run and the resumed one in this process (one torch thread, as the killed one)
    for out, extra in ((tmp_path / "full", ()), (tmp_path / "cut", ("--resume",))):
        rc, _, err = run_cli(capsys, "pipeline", *files, *ARGS, "-o", out, *extra)
        assert rc == 0, err
    rf, rounds_f = _rounds(tmp_path / "full")
    rc, rounds_c = _rounds(tmp_path / "cut")
    assert rc["resumed"]["round"] == 1 and rc["resumed"]["phase"] == "training" and rc["resumed"]["epoch"] >= 1
    assert rounds_c == rounds_f and rc["summary"] == rf["summary"] and rf["summary"]["epochs"] == 4
    with np.load(tmp_path / "full" / "masks.npz") as mf, np.load(tmp_path / "cut" / "masks.npz") as mc:
        assert sorted(mf.files) == sorted(mc.files)
        for k in mf.files:
            np.testing.assert_array_equal(mc[k], mf[k])
    assert (tmp_path / "cut" / "model.caffemodel").read_bytes() == (tmp_path / "full" / "model.caffemodel").read_bytes()
    # the default checkpoints have served: removed; nothing else beside the outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "full"]


def test_checkpoint_refusals_and_a_finished_checkpoint(files, tmp_path, capsys):
    quick = ["--schedule", "han", "--prune-steps", "0.9", "--tolerance", "0", "--max-epochs", "1",
             "--threads", "1", "--quiet"]
    ckpt = tmp_path / "run.pt"
    rc, _, err = run_cli(capsys, "pipeline", *files, *quick, "-o", tmp_path / "a", "--checkpoint", ckpt)
    assert rc == 0, err
    assert ckpt.exists()  # a --checkpoint FILE is kept (as finetune keeps it); it holds the finished run
    # resumed from a finished run's checkpoint: nothing is recomputed, the same files
    rc, _, err = run_cli(capsys, "pipeline", *files, *quick, "-o", tmp_path / "b", "--checkpoint", ckpt, "--resume")
    assert rc == 0, err
    ra, rounds_a = _rounds(tmp_path / "a")
    rb, rounds_b = _rounds(tmp_path / "b")
    assert rounds_a == rounds_b and rb["resumed"] == {"from": str(ckpt), "round": 1, "phase": "done", "epoch": 0}
    assert (tmp_path / "a" / "model.caffemodel").read_bytes() == (tmp_path / "b" / "model.caffemodel").read_bytes()

    def refused(extra, needle, argv=files):
        out = tmp_path / "no"
        rc, _, err = run_cli(capsys, "pipeline", *argv, *quick, "-o", out, *extra)
        lines = [line for line in err.strip().splitlines() if line]
        assert rc == 2 and len(lines) == 1 and needle in lines[0], err
        assert "Traceback" not in err and not out.exists()

    refused(["--checkpoint", ckpt, "--resume", "--seed", "1"], "another run: seed 0 (now 1)")
    refused(["--checkpoint", ckpt, "--resume", "--lr", "0.01"], "solver base_lr 0.005 (now 0.01)")
    from lrprune_caffe.io.caffe import load_net
    from lrprune_caffe.io.output import write_net
    net = load_net(files[0], files[1])
    net.layer("ip2").blobs[1] = net.layer("ip2").blobs[1] + np.float32(1e-3)  # other weights, same layers
    write_net(net, tmp_path / "other")
    other = [str(tmp_path / "other" / "model.prototxt"), str(tmp_path / "other" / "model.caffemodel"), *files[2:]]
    refused(["--checkpoint", ckpt, "--resume"], "another run: weights", argv=other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    refused(["--checkpoint", junk, "--resume"], "cannot read the checkpoint")
    refused(["--checkpoint", tmp_path / "no" / "c.pt"], "inside the output folder")
    refused(["--resume", "--checkpoint", tmp_path / "a" / "report.json"], "cannot read the checkpoint")
