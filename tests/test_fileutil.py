"""The atomic writer (fileutil.atomic_open / atomic_write_*, OutputSet) when a write fails
part-way: the final path keeps its old bytes (or stays absent) and no temporary remains.

Failures are injected into the real file object (``write`` raising after part of the data
reached the file, ``flush`` raising as a full disk does) and into ``os.replace``."""

from __future__ import annotations

import errno
import os

import pytest

from lrprune_caffe import fileutil
from lrprune_caffe.errors import UserError
from lrprune_caffe.fileutil import OutputSet, atomic_open, atomic_write_bytes, atomic_write_text


class FailingFile:
    """Wraps a real file: the first ``write`` passes ``after`` bytes through, flushes them
    to the disk, then raises ENOSPC; ``flush_fails`` makes ``flush`` raise instead."""

    def __init__(self, fh, after, flush_fails=False):
        self._fh, self._after, self._flush_fails = fh, after, flush_fails

    def write(self, data):
        if self._flush_fails:
            return self._fh.write(data)
        self._fh.write(data[:self._after])
        self._fh.flush()
        os.fsync(self._fh.fileno())
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        if self._flush_fails:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._fh.flush()

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)


def failing_fdopen(monkeypatch, after=3, flush_fails=False):
    real = os.fdopen
    written = []

    def fdopen(fd, *a, **k):
        fh = real(fd, *a, **k)
        written.append(fh.name)
        return FailingFile(fh, after, flush_fails)
    monkeypatch.setattr(fileutil.os, "fdopen", fdopen)
    return written


@pytest.mark.parametrize("old", [b"old bytes", None])
@pytest.mark.parametrize("flush_fails", [False, True])
def test_write_failing_mid_way_leaves_the_target_untouched(tmp_path, monkeypatch, old, flush_fails):
    target = tmp_path / "model.caffemodel"
    if old is not None:
        target.write_bytes(old)
    failing_fdopen(monkeypatch, after=4, flush_fails=flush_fails)
    with pytest.raises(UserError) as e:
        atomic_write_bytes(target, b"new bytes that do not fit")
    assert str(target) in str(e.value) and "No space left" in str(e.value)
    if old is None:
        assert not target.exists()
    else:
        assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if old is None else ["model.caffemodel"])


def test_text_write_failing_mid_way(tmp_path, monkeypatch):
    target = tmp_path / "model.prototxt"
    target.write_text("old\n")
    failing_fdopen(monkeypatch, after=2)
    with pytest.raises(UserError):
        atomic_write_text(target, "layer { }\n" * 100)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["model.prototxt"]


def test_nothing_reaches_the_target_before_the_rename(tmp_path):
    """While the writer is open, the data goes to a temporary beside the target (same
    folder, so the rename is atomic); the target keeps its old bytes until the end."""
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with atomic_open(target) as fh:
        fh.write(b"new content")
        fh.flush()
        assert target.read_bytes() == b"old"
        (tmp,) = [p for p in tmp_path.iterdir() if p.name != "m.onnx"]
        assert tmp.read_bytes() == b"new content" and tmp.parent == target.parent
    assert target.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert (target.stat().st_mode & 0o777) == 0o666 & ~_umask()  # not mkstemp's 0600


def _umask():
    u = os.umask(0)
    os.umask(u)
    return u


def test_exception_in_the_body_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(target) as fh:
            fh.write(b"partial")
            fh.flush()
            raise KeyboardInterrupt  # not an OSError: passed on as it is
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_failing_rename_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"

    def replace(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(fileutil.os, "replace", replace)
    with pytest.raises(UserError):
        atomic_write_bytes(target, b"data")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_one_user_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(UserError) as e:
            atomic_write_bytes(d / "m.onnx", b"x")
        assert "cannot write there" in str(e.value)
        assert list(d.iterdir()) == []
    finally:
        d.chmod(0o700)


def test_output_set_failure_part_way_leaves_nothing(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError):
        with OutputSet(out) as outs:
            outs.write_bytes("model.caffemodel", b"weights")
            assert not outs.final("model.caffemodel").exists()  # staged, not final
            outs.write_text("model.prototxt", "net")
            raise RuntimeError("failed after two of three files")
    assert list(tmp_path.iterdir()) == []  # both created folders removed again


def test_output_set_keeps_an_existing_folder_and_its_files(tmp_path):
    (tmp_path / "model.caffemodel").write_bytes(b"old")
    with pytest.raises(UserError, match="not empty"):
        with OutputSet(tmp_path):
            pass
    with pytest.raises(RuntimeError):
        with OutputSet(tmp_path, force=True) as outs:
            outs.write_bytes("model.caffemodel", b"new")
            raise RuntimeError("x")
    assert [p.name for p in tmp_path.iterdir()] == ["model.caffemodel"]
    assert (tmp_path / "model.caffemodel").read_bytes() == b"old"
    with OutputSet(tmp_path, force=True) as outs:
        outs.write_bytes("model.caffemodel", b"new")
        outs.write_text("report.json", "{}")
    assert (tmp_path / "model.caffemodel").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.caffemodel", "report.json"]


# ---- the checks before any output, and read_npz ---------------------------------------------

def test_check_output_file(tmp_path):
    from lrprune_caffe.fileutil import check_output_file as check_output_dir
    assert check_output_dir(tmp_path / "m.onnx") == tmp_path / "m.onnx"
    with pytest.raises(UserError, match="is a folder; give a file name"):
        check_output_dir(tmp_path)
    with pytest.raises(UserError, match="output folder .* does not exist"):
        check_output_dir(tmp_path / "no" / "m.onnx")
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="'.*f' is a file, not a folder"):
        check_output_dir(tmp_path / "f" / "m.onnx")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert str(check_output_dir("m.onnx")) == "m.onnx"  # a bare name: the current folder
    finally:
        os.chdir(old)


def test_check_outdir_lists_missing_folders_deepest_first(tmp_path):
    from lrprune_caffe.fileutil import check_outdir
    assert check_outdir(tmp_path) == []
    assert check_outdir(tmp_path / "a" / "b") == [tmp_path / "a" / "b", tmp_path / "a"]
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="exists and is not a folder"):
        check_outdir(tmp_path / "f")
    with pytest.raises(UserError, match="'.*f' is a file, not a folder"):
        check_outdir(tmp_path / "f" / "x" / "y")
    assert not (tmp_path / "a").exists()  # only checked, nothing made


def test_read_npz(tmp_path):
    import numpy as np
    from lrprune_caffe.errors import BadFileError
    from lrprune_caffe.fileutil import read_npz
    np.savez(tmp_path / "ok.npz", a=np.arange(3), b=np.ones((2, 2), np.float32))
    got = read_npz(tmp_path / "ok.npz")
    assert sorted(got) == ["a", "b"] and got["a"].tolist() == [0, 1, 2] and got["b"].dtype == np.float32
    np.save(tmp_path / "one.npy", np.arange(3))
    (tmp_path / "text.npz").write_text("not a zip")
    np.savez(tmp_path / "obj.npz", o=np.array([{"x": 1}], dtype=object))
    for name, why in (("missing.npz", "file not found (expected masks)"),
                      ("one.npy", "is a single .npy array, not an .npz archive (expected masks)"),
                      ("text.npz", "is not an .npz archive (expected masks)"),
                      ("obj.npz", "holds object arrays (pickled Python objects), which are not read")):
        with pytest.raises(BadFileError) as e:
            read_npz(tmp_path / name, "masks")
        assert why in str(e.value) and name in str(e.value), (name, str(e.value))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:-30])
    with pytest.raises(BadFileError, match="is not a readable .npz"):
        read_npz(tmp_path / "cut.npz")


def test_the_process_umask_is_left_as_it_was(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        assert os.umask(0o027) == 0o027  # still ours after the write
        assert ((tmp_path / "a.bin").stat().st_mode & 0o777) == 0o640
    finally:
        os.umask(old)
