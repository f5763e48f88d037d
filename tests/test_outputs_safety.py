"""Issue 11, items 1-2: no command writes over its inputs; an output folder holds one run,
replaced all at once (also when the run is killed at any stage of writing)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lrprune_caffe import fileutil
from lrprune_caffe.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lenet"
PROTO, MODEL = EXAMPLE / "lenet.prototxt", EXAMPLE / "lenet.caffemodel"


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(rc, err, *needles):
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "cq"
    d.mkdir()
    shutil.copy(PROTO, d / "model.prototxt")
    shutil.copy(MODEL, d / "model.caffemodel")
    return d


def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# ---- 1. never over an input ------------------------------------------------------

@pytest.mark.parametrize("force", [False, True])
def test_export_onnx_over_its_weights_is_refused(model_dir, capsys, force):
    before = snapshot(model_dir)
    w = model_dir / "model.caffemodel"
    rc, out, err = run(capsys, "export-onnx", model_dir / "model.prototxt", w, "-o", w, *(["--force"] if force else []))
    one_line(rc, err, "is the input", "model.caffemodel")
    assert snapshot(model_dir) == before


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_output_that_is_an_input_through_a_link(model_dir, tmp_path, capsys, link):
    w = model_dir / "model.caffemodel"
    target = tmp_path / "w.onnx"
    (os.symlink if link == "symlink" else os.link)(w, target)
    before = snapshot(model_dir)
    rc, out, err = run(capsys, "export-onnx", model_dir / "model.prototxt", w, "-o", target, "--force")
    one_line(rc, err, "is the input")
    assert snapshot(model_dir) == before


@pytest.mark.parametrize("cmd", [["compress", "--prune", "0.5", "--no-verify"], ["convert"]])
@pytest.mark.parametrize("force", [False, True])
def test_output_folder_holding_the_inputs_is_refused(model_dir, capsys, cmd, force):
    before = snapshot(model_dir)
    rc, out, err = run(capsys, cmd[0], model_dir / "model.prototxt", model_dir / "model.caffemodel",
                       "-o", model_dir, *cmd[1:], *(["--force"] if force else []))
    one_line(rc, err, "holds the input")
    assert snapshot(model_dir) == before


@pytest.mark.parametrize("cmd", ["finetune", "pipeline"])
def test_training_commands_check_the_output_first(model_dir, capsys, cmd):
    """Before torch is even needed: the output folder holds the inputs."""
    rc, out, err = run(capsys, cmd, model_dir / "model.prototxt", model_dir / "model.caffemodel",
                       "--data-split", "x.npz", "-o", model_dir, "--force")
    one_line(rc, err, "holds the input")


def test_output_inside_an_input_folder(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    (imgs / "a").mkdir(parents=True)
    rc, out, err = run(capsys, "finetune", PROTO, MODEL, "--data", imgs, "-o", imgs / "out")
    one_line(rc, err, "inside the input folder")
    assert not (imgs / "out").exists()


# ---- 2. one run per folder ----------------------------------------------------------

def test_rerun_needs_force_and_then_holds_only_this_run(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "o"
    rc, _, err = run(capsys, "compress", PROTO, MODEL, "-o", out, "--prune", "0.5", "--onnx", "--no-verify")
    assert rc == 0, err
    first = snapshot(out)
    assert {"masks.npz", "model.onnx"} <= set(first)
    rc, _, err = run(capsys, "compress", PROTO, MODEL, "-o", out, "--rank", "4", "--no-verify")
    one_line(rc, err, "not empty", "--force")
    assert snapshot(out) == first
    rc, _, err = run(capsys, "compress", PROTO, MODEL, "-o", out, "--rank", "4", "--no-verify", "--force")
    assert rc == 0, err
    assert sorted(snapshot(out)) == ["model.caffemodel", "model.prototxt", "report.json", "report.md"]
    rc, _, err = run(capsys, "convert", PROTO, MODEL, "-o", out, "--force")
    assert rc == 0, err
    assert sorted(snapshot(out)) == ["model.caffemodel", "model.prototxt"]  # no stale report.json
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_existing_output_file_needs_force(tmp_path, capsys):
    pytest.importorskip("onnx")
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    rc, _, err = run(capsys, "export-onnx", PROTO, MODEL, "-o", target)
    one_line(rc, err, "exists", "--force")
    assert target.read_bytes() == b"old"
    rc, _, err = run(capsys, "export-onnx", PROTO, MODEL, "-o", target, "--force")
    assert rc == 0, err
    assert target.read_bytes() != b"old"


def test_force_does_not_replace_folders_we_did_not_write(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "notes.txt").write_text("x")
    rc, _, err = run(capsys, "convert", PROTO, "-o", home, "--force")
    one_line(rc, err, "holds the folder 'photos'")
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.txt").write_text("x")
    monkeypatch.chdir(work)
    rc, _, err = run(capsys, "convert", PROTO, "-o", ".", "--force")
    one_line(rc, err, "current folder")
    assert (home / "notes.txt").exists() and (work / "a.txt").exists()


def test_symlink_output_and_read_only_folder(tmp_path, capsys, monkeypatch):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    rc, _, err = run(capsys, "convert", PROTO, "-o", tmp_path / "link")
    one_line(rc, err, "symbolic link")
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(fileutil.os, "access",
                        lambda p, mode: False if Path(p) == ro else real_access(p, mode))  # root ignores chmod
    rc, _, err = run(capsys, "convert", PROTO, "-o", ro / "out")
    one_line(rc, err, "read-only or no permission")
    rc, _, err = run(capsys, "export-onnx", PROTO, MODEL, "-o", ro / "m.onnx")
    one_line(rc, err, "read-only or no permission")
    assert list(ro.iterdir()) == []


class _DiskFull:
    """A file whose third write fails with ENOSPC."""

    def __init__(self, real):
        self.real, self.n = real, 0

    def write(self, data):
        self.n += 1
        if self.n > 2:
            raise OSError(28, "No space left on device")
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()
        return False


def _fail_writes_under(monkeypatch, folder_test):
    import builtins
    import io
    real_open = io.open

    def opener(file, mode="r", *a, **k):
        fh = real_open(file, mode, *a, **k)
        if "w" in mode and folder_test(str(file)):
            return _DiskFull(fh)
        return fh
    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)
    real_fdopen = os.fdopen
    monkeypatch.setattr(fileutil.os, "fdopen", lambda fd, mode="r", *a, **k: _DiskFull(real_fdopen(fd, mode, *a, **k)))


@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_mid_write_keeps_the_old_state(tmp_path, capsys, monkeypatch, existing):
    out = tmp_path / "out"
    if existing:
        assert run(capsys, "convert", PROTO, "-o", out)[0] == 0
    before = snapshot(out) if existing else None
    _fail_writes_under(monkeypatch, lambda f: f".{out.name}.{fileutil.TMP_TAG}-" in f)
    rc, _, err = run(capsys, "convert", PROTO, MODEL, "-o", out, "--force")
    one_line(rc, err, "No space left on device", "nothing was written")
    assert (snapshot(out) == before) if existing else not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])


def test_disk_full_mid_write_of_one_file(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnx")
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    _fail_writes_under(monkeypatch, lambda f: False)
    from lrprune_caffe.io.caffe import load_net
    net = load_net(PROTO, MODEL)
    with pytest.raises(fileutil.UserError, match="No space left"):
        with fileutil.atomic_open(target, "wb") as fh:
            for _ in range(4):
                fh.write(net.layers[1].blobs[0].tobytes())
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


# ---- killed runs ---------------------------------------------------------------------

KILLER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from lrprune_caffe import fileutil
    stage, mode = sys.argv[2], sys.argv[3]
    if mode == "fallback":
        fileutil._exchange = lambda a, b: False
    def checkpoint(s):
        if s == stage:
            print("AT", s, flush=True)
            time.sleep(60)
    fileutil._checkpoint = checkpoint
    from lrprune_caffe.cli.main import main
    sys.exit(main(sys.argv[4:]))
""")


def _run_until(tmp_path, stage, mode, argv, sig):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.Popen([sys.executable, str(script), str(ROOT), stage, mode, *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("AT"), (line, proc.stderr.read())
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


@pytest.fixture
def old_and_new(tmp_path):
    """OUT with an old run (prototxt only); references of old and new outputs."""
    out = tmp_path / "out"
    ref_new = tmp_path / "ref_new"
    with fileutil.output_policy():
        assert main(["convert", str(PROTO), "-o", str(out)]) == 0
        assert main(["convert", str(PROTO), str(MODEL), "-o", str(ref_new)]) == 0
    return out, snapshot(out), snapshot(ref_new)


@pytest.mark.parametrize("stage, mode, expect", [
    ("file-written", "exchange", "old"), ("staged", "exchange", "old"), ("swapped", "exchange", "new"),
    ("file-written", "fallback", "old"), ("staged", "fallback", "old"), ("moved-away", "fallback", "old"),
    ("swapped", "fallback", "new")])
def test_sigkill_at_any_stage_leaves_old_or_new(tmp_path, old_and_new, stage, mode, expect):
    out, old, new = old_and_new
    proc = _run_until(tmp_path, stage, mode, ["convert", PROTO, MODEL, "-o", out, "--force"], signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    if stage == "moved-away":  # between the two renames: the old folder waits in the temporary
        fileutil._remove_stale(tmp_path, "out")  # what the next run does first
    assert snapshot(out) == (old if expect == "old" else new)
    fileutil._remove_stale(tmp_path, "out")  # the next run removes what the killed one left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_clean_up(tmp_path, old_and_new, sig, status):
    out, old, new = old_and_new
    proc = _run_until(tmp_path, "file-written", "exchange", ["convert", PROTO, MODEL, "-o", out, "--force"], sig)
    assert proc.returncode == status, proc.stderr.read()
    assert snapshot(out) == old
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temporary removed at once


def test_sigkill_while_writing_one_file(tmp_path):
    pytest.importorskip("onnx")
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    proc = _run_until(tmp_path, "file-written", "exchange", ["export-onnx", PROTO, MODEL, "-o", target, "--force"],
                      signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old"
    fileutil._remove_stale(tmp_path, "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killer.py", "m.onnx"]
