"""fileutil behaviour the mutation run (tools/mutation.py) found untested: checked against the
file system after the call (modes, which entries exist), the exception raised and its
message, and the SIGTERM handler (signal.getsignal) before, during and after a write."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading

import pytest

from lrprune_caffe import fileutil
from lrprune_caffe.errors import UserError
from lrprune_caffe.fileutil import OutputSet, atomic_open, atomic_write_bytes, check_output_file, output_policy


def _dead_pid() -> int:
    """The pid of a child that has exited and been reaped (no process has it now)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- an output that is an input --------------------------------------------------------------

def test_output_equal_to_an_existing_input_is_refused_even_with_force(tmp_path):
    inp = tmp_path / "net.caffemodel"
    inp.write_bytes(b"weights")
    with output_policy(force=True, inputs=[str(inp)]):
        with pytest.raises(UserError, match="is the input .*writing there would destroy it"):
            check_output_file(inp)
        with pytest.raises(UserError, match="is the input"):
            atomic_write_bytes(inp, b"new")
    assert inp.read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.caffemodel"]


def test_output_that_is_a_hard_link_to_an_input_is_refused(tmp_path):
    """Another name of the same file (a hard link: a different real path, the same inode)."""
    inp = tmp_path / "net.caffemodel"
    inp.write_bytes(b"weights")
    out = tmp_path / "copy.caffemodel"
    os.link(inp, out)
    assert os.path.realpath(out) != os.path.realpath(inp)
    with output_policy(force=True, inputs=[str(inp)]):
        with pytest.raises(UserError, match=r"copy\.caffemodel: is the input .*net\.caffemodel"):
            atomic_write_bytes(out, b"new")
    assert inp.read_bytes() == b"weights" and out.read_bytes() == b"weights"


def test_a_missing_input_does_not_block_an_unrelated_output(tmp_path):
    with output_policy(force=True, inputs=[str(tmp_path / "gone.caffemodel")]):
        atomic_write_bytes(tmp_path / "out.bin", b"x")
    assert (tmp_path / "out.bin").read_bytes() == b"x"


# ---- SIGTERM while writing ------------------------------------------------------------------

@pytest.fixture
def own_sigterm():
    """A SIGTERM handler of the test's own (so a signal that is not caught cannot kill pytest);
    the previous handler is put back after the test."""
    got = []

    def mine(signum, frame):
        got.append(signum)
    old = signal.signal(signal.SIGTERM, mine)
    try:
        yield mine, got
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigterm_during_atomic_open_raises_and_removes_the_temporary(tmp_path, own_sigterm):
    mine, got = own_sigterm
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with pytest.raises(fileutil.Terminated):
        with atomic_open(target) as fh:
            assert signal.getsignal(signal.SIGTERM) is not mine  # the writer's own handler
            fh.write(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
            fh.write(b"never")  # the handler raises before this line
    assert got == []  # the writer's handler took it, not ours
    assert signal.getsignal(signal.SIGTERM) is mine  # restored
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_output_set_restores_the_sigterm_handler(tmp_path, own_sigterm):
    mine, got = own_sigterm
    with OutputSet(tmp_path / "ok") as outs:
        assert signal.getsignal(signal.SIGTERM) is not mine
        outs.write_bytes("a.bin", b"a")
    assert signal.getsignal(signal.SIGTERM) is mine
    with pytest.raises(RuntimeError):
        with OutputSet(tmp_path / "failed") as outs:
            outs.write_bytes("a.bin", b"a")
            raise RuntimeError("x")
    assert signal.getsignal(signal.SIGTERM) is mine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]
    assert got == []


def test_sigterm_during_output_set_leaves_nothing(tmp_path, own_sigterm):
    mine, got = own_sigterm
    with pytest.raises(fileutil.Terminated):
        with OutputSet(tmp_path / "out") as outs:
            outs.write_bytes("a.bin", b"a")
            os.kill(os.getpid(), signal.SIGTERM)
            outs.write_bytes("b.bin", b"b")
    assert got == [] and signal.getsignal(signal.SIGTERM) is mine
    assert list(tmp_path.iterdir()) == []


def test_a_writer_in_another_thread_installs_no_handler(tmp_path, own_sigterm):
    mine, got = own_sigterm
    seen, errors = [], []

    def work():
        try:
            with atomic_open(tmp_path / "t.bin") as fh:
                seen.append(signal.getsignal(signal.SIGTERM))
                fh.write(b"from a thread")
            with OutputSet(tmp_path / "d") as outs:
                seen.append(signal.getsignal(signal.SIGTERM))
                outs.write_bytes("x", b"y")
        except BaseException as e:  # reported below, in the main thread
            errors.append(e)
    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert errors == [] and seen == [mine, mine]
    assert (tmp_path / "t.bin").read_bytes() == b"from a thread" and (tmp_path / "d" / "x").read_bytes() == b"y"


# ---- an OSError inside an OutputSet ---------------------------------------------------------

def test_output_set_write_error_is_one_user_error_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        with OutputSet(out) as outs:
            outs.write_bytes("a.bin", b"a")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value) == f"{out}: cannot write the output (No space left on device); nothing was written"
    assert isinstance(e.value.__cause__, OSError)
    assert list(tmp_path.iterdir()) == []


# ---- modes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_output_folder_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with OutputSet(tmp_path / "out") as outs:
            outs.write_bytes("a.bin", b"a")
        with atomic_open(tmp_path / "f.bin") as fh:
            fh.write(b"f")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes it


# ---- what a killed run left behind ------------------------------------------------------------

def test_stale_temporary_file_of_a_dead_run_is_removed(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".m.onnx.lrprune-{dead}-abc123.tmp"
    stale.write_bytes(b"half")
    other = tmp_path / f".x.onnx.lrprune-{dead}-abc123.tmp"  # another output's: not ours to touch
    other.write_bytes(b"half")
    atomic_write_bytes(tmp_path / "m.onnx", b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", other.name])


def test_stale_temporary_folder_of_a_dead_run_is_removed(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".out.lrprune-{dead}-xyz"
    stale.mkdir()
    (stale / "model.caffemodel").write_bytes(b"half")
    with OutputSet(tmp_path / "out") as outs:
        outs.write_bytes("a.bin", b"a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.bin"]


def test_killed_between_moving_away_and_in_puts_the_old_folder_back(tmp_path):
    """A run killed after renaming OUTDIR away (into .OUT.lrprune-PID-old-*/d) and before the
    new one was in: the clean-up puts the old folder back."""
    dead = _dead_pid()
    old = tmp_path / f".out.lrprune-{dead}-old-q1"
    (old / "d").mkdir(parents=True)
    (old / "d" / "model.caffemodel").write_bytes(b"old")
    fileutil._remove_stale(tmp_path, "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "model.caffemodel").read_bytes() == b"old"


def test_a_recovered_old_folder_is_not_replaced_without_force(tmp_path):
    """The old OUTDIR that a killed run had moved away is put back before OUTDIR is checked: a new
    run without --force is refused (and the old files are intact) instead of replacing it."""
    dead = _dead_pid()
    old = tmp_path / f".out.lrprune-{dead}-old-q1"
    (old / "d").mkdir(parents=True)
    (old / "d" / "model.caffemodel").write_bytes(b"old")
    with pytest.raises(UserError):
        with OutputSet(tmp_path / "out") as outs:
            outs.write_bytes("model.caffemodel", b"new")
    assert (tmp_path / "out" / "model.caffemodel").read_bytes() == b"old"
    with OutputSet(tmp_path / "out", force=True) as outs:  # with --force it is replaced
        outs.write_bytes("model.caffemodel", b"new")
    assert (tmp_path / "out" / "model.caffemodel").read_bytes() == b"new"


def test_temporaries_of_live_processes_are_kept(tmp_path, monkeypatch):
    """Our own pid, a running process's, and one we may not signal (EPERM: another user's)."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = tmp_path / f".m.onnx.lrprune-{os.getpid()}-a.tmp"
        live = tmp_path / f".m.onnx.lrprune-{sleeper.pid}-b.tmp"
        for p in (mine, live):
            p.write_bytes(b"busy")
        atomic_write_bytes(tmp_path / "m.onnx", b"1")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", mine.name, live.name])
    finally:
        sleeper.kill()
        sleeper.wait()
    foreign = tmp_path / f".m.onnx.lrprune-{_dead_pid()}-c.tmp"
    foreign.write_bytes(b"busy")

    def kill(pid, sig):  # the answer for a live process of another user (we run as root here)
        raise PermissionError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(fileutil.os, "kill", kill)
    atomic_write_bytes(tmp_path / "m.onnx", b"2")
    assert foreign.exists() and (tmp_path / "m.onnx").read_bytes() == b"2"


def test_names_that_only_look_like_temporaries_are_kept(tmp_path):
    odd = [tmp_path / ".m.onnx.lrprune-notapid-x.tmp", tmp_path / ".m.onnx.lrprune-", tmp_path / "m.onnx.lrprune-1-x"]
    for p in odd:
        p.write_bytes(b"keep")
    atomic_write_bytes(tmp_path / "m.onnx", b"x")
    assert all(p.exists() for p in odd)
