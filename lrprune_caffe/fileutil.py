"""Atomic output: write to a temporary file beside the target, then rename.

No command ever leaves a half-written file: if anything raises before the
rename, the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import BadFileError, UserError


def check_output_dir(path) -> Path:
    """The folder an output file goes to must exist (we do not guess), and the
    path must not name a folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name (e.g. {path / 'model.onnx'})")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        if parent.exists():
            raise UserError(f"{path}: '{parent}' is a file, not a folder")
        raise UserError(f"{path}: output folder '{parent}' does not exist")
    return path


def _default_mode(path) -> None:
    """mkstemp makes files owner-only (0600); give them the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Open a temporary file next to ``path``; rename it over ``path`` on success."""
    path = check_output_dir(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"{path}: cannot write there ({e.strerror or e})") from None
    _default_mode(tmp)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):  # disk full, permissions: one clear line, nothing left behind
            raise UserError(f"{path}: cannot write the output ({e.strerror or e})") from e
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
        with np.load(p, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise BadFileError(f"is a single .npy array, not an .npz archive (expected {what})", path=path)
            return {k: np.asarray(z[k]) for k in z.files}
    except BadFileError:
        raise
    except ValueError as e:
        if "pickle" in str(e):  # numpy found neither a zip archive nor an .npy header
            raise BadFileError(f"is not an .npz archive (expected {what})", path=path) from None
        raise BadFileError(f"is not a readable .npz ({e}; expected {what})", path=path) from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise BadFileError(f"is not a readable .npz ({type(e).__name__}: {e}; expected {what})",
                           path=path) from None


def check_outdir(outdir) -> list:
    """Before any work: ``outdir`` must be a folder or creatable as one (like mkdir -p).
    Returns the folders that do not exist yet, deepest first."""
    outdir = Path(outdir)
    if outdir.exists():
        if not outdir.is_dir():
            raise UserError(f"{outdir}: exists and is not a folder")
        return []
    missing, d = [], outdir
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    if d.exists() and not d.is_dir():
        raise UserError(f"{outdir}: '{d}' is a file, not a folder")
    return missing


class OutputSet:
    """Several output files that appear together or not at all.

    Files are staged as temporaries and renamed only by :meth:`commit`;
    a failure before that removes every staged file (and a created folder).
    """

    def __init__(self, outdir):
        self.outdir = Path(outdir)
        self._staged: list[tuple[str, Path]] = []
        self._created_dir = False
        self._created: list[Path] = []

    def __enter__(self):
        missing = check_outdir(self.outdir)
        if missing:
            # like mkdir -p; every folder created here is removed again on failure
            try:
                self.outdir.mkdir(parents=True)
            except OSError as e:
                raise UserError(f"{self.outdir}: cannot create the output folder ({e.strerror})") from None
            self._created = missing  # deepest first
            self._created_dir = True
        return self

    def path(self, name: str) -> str:
        """A temporary path to write ``name`` to; it becomes OUTDIR/name on commit."""
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.outdir)
        os.close(fd)
        _default_mode(tmp)
        self._staged.append((name, Path(tmp)))
        return tmp

    def write_bytes(self, name: str, data: bytes) -> None:
        Path(self.path(name)).write_bytes(data)

    def write_text(self, name: str, text: str) -> None:
        Path(self.path(name)).write_text(text)

    def final(self, name: str) -> Path:
        return self.outdir / name

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            for name, tmp in self._staged:
                os.replace(tmp, self.outdir / name)
        else:
            for _, tmp in self._staged:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            if self._created_dir:
                for d in self._created:
                    with contextlib.suppress(OSError):
                        d.rmdir()
        return False
