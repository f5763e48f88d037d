"""Outputs that never touch inputs and appear all at once, or not at all.

The one place every output goes through:

* :func:`check_output_file` (one output file) and :func:`check_outdir` (an output
  folder) run before any work: the path is not an input (same path, the same
  file through a link, or a folder that holds an input), not a symbolic link,
  and an existing file / non-empty folder is replaced only with ``force``.
* :func:`atomic_open` writes one file: a temporary beside the target, renamed
  over it at the end.
* :class:`OutputSet` builds a whole output folder in a temporary folder beside
  the target and swaps it in at the end (an atomic exchange where the kernel has
  one, else: old renamed away, new renamed in, old deleted). With ``force`` the
  result holds exactly this run's files.

A run killed at any moment (SIGKILL included) leaves the old state or the
complete new one; what a killed run leaves is a hidden ``.NAME.lrprune-PID-*``
temporary beside the target, removed by the next run. SIGINT and SIGTERM
remove the temporary at once.

The CLI sets the rules for a whole command with :func:`output_policy` (its
``--force`` and its input files). Library calls outside a policy replace a single
file (as ``open`` does) but refuse a non-empty folder unless ``force``.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import BadFileError, UserError

TMP_TAG = "lrprune"


class Terminated(BaseException):
    """SIGTERM arrived while outputs were being written (raised so cleanup runs)."""


@dataclass(frozen=True)
class OutputPolicy:
    force: bool = False  # replace an existing output file / non-empty output folder
    inputs: tuple = ()  # paths the command reads: never written over


_POLICY: contextvars.ContextVar = contextvars.ContextVar("lrprune_output_policy", default=None)


@contextlib.contextmanager
def output_policy(force=False, inputs=()):
    """Within the block, outputs may replace old ones only with ``force``, and never ``inputs``."""
    token = _POLICY.set(OutputPolicy(bool(force), tuple(str(p) for p in inputs if p is not None)))
    try:
        yield
    finally:
        _POLICY.reset(token)


def current_policy() -> OutputPolicy:
    return _POLICY.get() or OutputPolicy()


def _checkpoint(stage: str) -> None:
    """A no-op; tests replace it to stop or kill a run at a given stage of writing."""


# ---- checks -----------------------------------------------------------------

def _inside(child: str, parent: str) -> bool:
    try:
        return os.path.commonpath([child, parent]) == parent
    except ValueError:  # different drives
        return False


def _check_not_input(path: Path, folder: bool, inputs) -> None:
    real_out = os.path.realpath(path)
    for inp in inputs:
        if not os.path.exists(inp):
            continue
        real_in = os.path.realpath(inp)
        same = real_out == real_in
        if not same and path.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(path, inp)
        if same:
            raise UserError(f"{path}: is the input {inp}; writing there would destroy it: give another output path")
        if folder and _inside(real_in, real_out):
            raise UserError(f"{path}: holds the input {inp}, which replacing the folder would delete: "
                            f"give another output folder")
        if os.path.isdir(real_in) and _inside(real_out, real_in):
            raise UserError(f"{path}: is inside the input folder {inp}: give an output outside it")


def _check_not_link(path: Path) -> None:
    if path.is_symlink():
        raise UserError(f"{path}: is a symbolic link (to {os.readlink(path)}); outputs are not written "
                        f"through links: give the real path")


def _check_parent(path: Path) -> Path:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        if parent.exists():
            raise UserError(f"{path}: '{parent}' is a file, not a folder")
        raise UserError(f"{path}: output folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot write into '{parent}' (read-only or no permission)")
    return parent


def check_output_file(path, force=None) -> Path:
    """One output FILE ``path``: its folder exists and is writable, it is no folder, no link,
    no input, and it does not exist yet unless ``force`` (default: the current policy)."""
    path = Path(path)
    policy = current_policy()
    if force is None:  # a library call outside any policy replaces a file, as open() does
        force = policy.force if _POLICY.get() is not None else True
    if path.is_dir() and not path.is_symlink():
        raise UserError(f"{path}: is a folder; give a file name (e.g. {path / 'model.onnx'})")
    _check_not_input(path, False, policy.inputs)
    _check_not_link(path)
    _check_parent(path)
    if path.exists() and not force:
        raise UserError(f"{path}: exists; add --force to replace it, or give another name")
    return path



def check_outdir(outdir, force=None) -> list:
    """Before any work, for an output FOLDER: a folder or creatable as one (like mkdir -p), no
    link, no input in it, empty unless ``force``. Returns the folders that do not exist yet,
    deepest first."""
    outdir = Path(outdir)
    policy = current_policy()
    force = policy.force if force is None else force
    _check_not_input(outdir, True, policy.inputs)
    _check_not_link(outdir)
    if outdir.exists():
        if not outdir.is_dir():
            raise UserError(f"{outdir}: exists and is not a folder")
        entries = sorted(p.name for p in outdir.iterdir())
        if entries and not force:
            raise UserError(f"{outdir}: output folder is not empty ({len(entries)} entries, e.g. "
                            f"{entries[0]}); add --force to replace its contents with this run's "
                            f"outputs, or give a new folder")
        if entries:
            _check_replaceable(outdir)
        _check_parent(outdir.absolute())
        return []
    missing, d = [], outdir
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    if d.exists() and not d.is_dir():
        raise UserError(f"{outdir}: '{d}' is a file, not a folder")
    if not os.access(d, os.W_OK | os.X_OK):
        raise UserError(f"{outdir}: cannot create it in '{d}' (read-only or no permission)")
    return missing


def _check_replaceable(outdir: Path) -> None:
    """--force replaces the folder: refuse folders no run of ours wrote (subfolders, the working folder)."""
    real = os.path.realpath(outdir)
    if _inside(os.path.realpath(os.getcwd()), real):
        raise UserError(f"{outdir}: --force would replace the current folder (or one holding it); "
                        f"give a dedicated output folder")
    sub = [p.name for p in outdir.iterdir() if p.is_dir() and not p.is_symlink()]
    if sub:
        raise UserError(f"{outdir}: holds the folder '{sub[0]}', so it is not an output folder of this "
                        f"tool; --force only replaces those: remove it yourself or give a new folder")


# ---- temporaries, signals ------------------------------------------------------

def _default_mode(path, mode=0o666) -> None:
    """mkstemp/mkdtemp make owner-only entries; give them the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _tmp_prefix(name: str) -> str:
    return f".{name}.{TMP_TAG}-{os.getpid()}-"


def _remove_stale(parent: Path, name: str) -> None:
    """Temporaries of ``name`` that a killed run (whose process is gone) left behind."""
    prefix = f".{name}.{TMP_TAG}-"
    with contextlib.suppress(OSError):
        for p in parent.iterdir():
            if not p.name.startswith(prefix):
                continue
            try:
                pid = int(p.name[len(prefix):].split("-", 1)[0])
            except ValueError:
                continue
            if pid == os.getpid() or _alive(pid):
                continue
            target = parent / name
            if "-old-" in p.name and (p / "d").is_dir() and not os.path.lexists(target):
                os.rename(p / "d", target)  # killed between moving the old folder away and the new in
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@contextlib.contextmanager
def _terminate_raises():
    """While writing: SIGTERM raises :class:`Terminated` so that temporaries are removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _write_error(path, e: OSError) -> UserError:
    return UserError(f"{path}: cannot write the output ({e.strerror or e}); nothing was written")


# ---- one file -------------------------------------------------------------------

@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Open a temporary file next to ``path``; rename it over ``path`` on success."""
    path = check_output_file(path)
    _remove_stale(path.parent if str(path.parent) else Path("."), path.name)
    with _terminate_raises():
        try:
            fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
        except OSError as e:
            raise UserError(f"{path}: cannot write there ({e.strerror or e})") from None
        try:
            _default_mode(tmp)
            with os.fdopen(fd, mode) as fh:
                yield fh
                fh.flush()
            _checkpoint("file-written")
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(e, OSError):  # disk full, permissions: one clear line, nothing left behind
                raise _write_error(path, e) from e
            raise


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def read_npz(path, what="an .npz file") -> dict:
    """Every array of an .npz ({name: ndarray}), never unpickling; a missing file or one that
    is not an .npz archive is a BadFileError naming the file and ``what`` was expected."""
    import zipfile

    import numpy as np
    p = Path(path)
    if not p.is_file():
        raise BadFileError(f"file not found (expected {what})", path=path)
    try:
        z = np.load(p, allow_pickle=False)
        if not hasattr(z, "files"):  # an ndarray (not a context manager): a single .npy
            raise BadFileError(f"is a single .npy array, not an .npz archive (expected {what})", path=path)
        with z:
            return {k: np.asarray(z[k]) for k in z.files}
    except BadFileError:
        raise
    except ValueError as e:
        if "Object arrays" in str(e):  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
            raise BadFileError(f"holds object arrays (pickled Python objects), which are not read "
                               f"(expected {what})", path=path) from None
        if "pickle" in str(e):  # numpy found neither a zip archive nor an .npy header
            raise BadFileError(f"is not an .npz archive (expected {what})", path=path) from None
        raise BadFileError(f"is not a readable .npz ({e}; expected {what})", path=path) from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise BadFileError(f"is not a readable .npz ({type(e).__name__}: {e}; expected {what})",
                           path=path) from None


# ---- a folder -------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot
        return False
    raise OSError(err, os.strerror(err), b)


class OutputSet:
    """Several output files that appear together or not at all, as the only files of OUTDIR.

    Files are written into a temporary folder beside OUTDIR; leaving the block without
    an error swaps it in for OUTDIR (which must have passed :func:`check_outdir`); an
    error (or SIGINT / SIGTERM) removes it and every folder created for it.
    """

    def __init__(self, outdir, force=None):
        self.outdir = Path(outdir)
        self.force = force
        self._tmp: Path = None
        self._created: list[Path] = []
        self._names: list[str] = []
        self._signals = None

    def __enter__(self):
        # a killed run's old OUTDIR goes back in place first, so that the check below sees it (and
        # refuses to replace it without --force) instead of the swap replacing it unasked
        _remove_stale(self.outdir.absolute().parent, self.outdir.name)
        missing = check_outdir(self.outdir, self.force)
        parents = missing[1:]  # the folders above OUTDIR that do not exist yet, deepest first
        if parents:
            try:
                parents[0].mkdir(parents=True)
            except OSError as e:
                raise UserError(f"{self.outdir}: cannot create the output folder ({e.strerror})") from None
            self._created = parents
        parent = self.outdir.absolute().parent
        self._signals = _terminate_raises()
        self._signals.__enter__()
        try:
            self._tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(self.outdir.name), dir=parent))
            _default_mode(self._tmp, 0o777)
        except BaseException as e:
            self._abort()
            if isinstance(e, OSError):
                raise UserError(f"{self.outdir}: cannot create the output folder ({e.strerror or e})") from None
            raise
        return self

    def path(self, name: str) -> str:
        """Where to write ``name``; it becomes OUTDIR/name when the block ends without error."""
        if not name or name != Path(name).name or name in (".", ".."):
            raise ValueError(f"output name {name!r} must be a plain file name")
        self._names.append(name)
        return str(self._tmp / name)

    def write_bytes(self, name: str, data: bytes) -> None:
        Path(self.path(name)).write_bytes(data)
        _checkpoint("file-written")

    def write_text(self, name: str, text: str) -> None:
        Path(self.path(name)).write_text(text)
        _checkpoint("file-written")

    def final(self, name: str) -> Path:
        return self.outdir / name

    def _abort(self):
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        for d in self._created:
            with contextlib.suppress(OSError):
                d.rmdir()
        if self._signals is not None:
            self._signals.__exit__(None, None, None)
            self._signals = None

    def _swap_in(self):
        _checkpoint("staged")
        target, tmp = str(self.outdir), str(self._tmp)
        if not self.outdir.exists():
            os.rename(tmp, target)
            self._tmp = None
            return
        if _exchange(tmp, target):  # one atomic step: OUTDIR is old, then new
            _checkpoint("swapped")
            shutil.rmtree(tmp, ignore_errors=True)
            self._tmp = None
            return
        old = tempfile.mkdtemp(prefix=_tmp_prefix(self.outdir.name) + "old-", dir=self.outdir.absolute().parent)
        os.rename(target, os.path.join(old, "d"))  # the old contents, away
        _checkpoint("moved-away")
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(os.path.join(old, "d"), target)
            raise
        self._tmp = None
        _checkpoint("swapped")
        shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self._swap_in()
            except BaseException as e:
                self._abort()
                if isinstance(e, OSError):
                    raise _write_error(self.outdir, e) from e
                raise
            self._created = []
            self._abort()  # restores the signal handler
            return False
        self._abort()
        if isinstance(exc, OSError):  # disk full, no permission: one line, nothing left behind
            raise _write_error(self.outdir, exc) from exc
        return False
