"""Record sources: where samples live, read one at a time, never all at once.

Every source gives ``len(src)``, ``src.get(i) -> (C x H x W array, label)`` (random
access, for shuffled training) and ``src.iterate(start) -> (array, label)...`` (in
order, from ``start``, to the end; cheap: a database cursor), in Caffe's order:

* :class:`DBSource` -- LMDB or LevelDB of ``Datum`` (Caffe's Data layer): records
  in key order (a cursor), raw or encoded. The keys are read once for random
  access (bytes, a few per record). LevelDB lets one process open a database at a
  time, so a LevelDB is read in the process that opened it: with DataLoader
  workers that process reads the raw records (:meth:`DBSource.raw`) and the
  workers decode them (:meth:`DBSource.decode_raw`).
* :class:`ListSource` -- an ImageData list file, ``path label`` per line (the
  path is everything before the last space, as Caffe splits it), read under
  ``root_folder`` with ``new_height``/``new_width``/``is_color``.
* :class:`HDF5Source` -- an HDF5Data source: a text file listing ``.h5`` files,
  each with one dataset per top (``data``, ``label``); read a slice at a time.
* :class:`ArraySource` -- arrays in memory (npz files, image folders loaded by
  :mod:`lrprune_caffe.data.datasets`).

Handles (LMDB environments, h5py files) open lazily in the process that reads
and are not pickled, so sources can go to DataLoader worker processes.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path

import numpy as np

from lrprune_caffe.errors import BadFileError, UserError
from .caffe_io import NATIVE, datum_to_array, read_image


def _need(module, extra="data"):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"reading this data needs the Python package '{module}': "
                        f"pip install 'lrprune-caffe[{extra}]'") from None


class _Lazy:
    """Open per process (fork-safe); drop handles when pickled."""

    _handle_attrs: tuple = ()

    def _fresh(self) -> bool:
        if getattr(self, "_pid", None) != os.getpid():
            for a in self._handle_attrs:
                setattr(self, a, None)
            self._pid = os.getpid()
            return True
        return False

    def __getstate__(self):
        d = dict(self.__dict__)
        for a in self._handle_attrs:
            d[a] = None
        d["_pid"] = None
        if getattr(self, "multiprocess", True) is False:
            d["_keys"] = None  # a worker of a source it may not open only decodes records handed to it
        return d


#: bytes of LMDB values read through one memory map before it is remapped (see DBSource.iterate)
REMAP_BYTES = 8 << 20

#: one handle per database and process: LMDB and LevelDB refuse a second open in one process
_OPEN: dict = {}


def _close_all():
    for h in list(_OPEN.values()):
        try:
            h.close()
        except Exception:  # at interpreter exit a handle may already be gone
            pass
    _OPEN.clear()


atexit.register(_close_all)


def _shared_handle(backend, path, opener):
    key = (backend, os.path.realpath(path), os.getpid())
    h = _OPEN.get(key)
    if h is None:
        h = _OPEN[key] = opener()
    return h


def db_backend(path) -> str:
    """'lmdb', 'leveldb' or None for a folder."""
    p = Path(path)
    if (p / "data.mdb").is_file():
        return "lmdb"
    if (p / "CURRENT").is_file() and any(p.glob("MANIFEST-*")):
        return "leveldb"
    return None


class DBSource(_Lazy):
    """An LMDB or LevelDB of Datum records, in key order."""

    _handle_attrs = ("_env", "_txn", "_db")

    def __init__(self, path, backend=None, decode=NATIVE):
        self.path = str(path)
        if not Path(path).is_dir():
            raise BadFileError("database folder not found", path=path)
        found = db_backend(path)
        self.backend = (backend or found or "").lower()
        if self.backend not in ("lmdb", "leveldb"):
            raise BadFileError("not an LMDB (data.mdb) or LevelDB (CURRENT, MANIFEST-*) folder", path=path)
        if found and found != self.backend:
            raise BadFileError(f"the data layer says backend {self.backend.upper()}, the folder holds "
                               f"a {found.upper()} database", path=path)
        self.decode = decode
        self.multiprocess = self.backend == "lmdb"
        self._pid = None
        self._keys = None
        self._n = None
        self._open()
        if self._n == 0:
            raise BadFileError("the database holds no records", path=path)

    def _open(self):
        self._fresh()
        key = (self.backend, os.path.realpath(self.path), os.getpid())
        if self._env is not None and _OPEN.get(key) is self._env:
            return
        if self._db is not None:
            return
        if self.backend == "lmdb":
            lmdb = _need("lmdb")
            try:
                self._env = _shared_handle("lmdb", self.path, lambda: lmdb.open(
                    self.path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=512))
            except lmdb.Error as e:
                raise BadFileError(f"cannot open the LMDB: {e}", path=self.path) from None
            self._txn = self._env.begin(buffers=False)
            if self._n is None:
                self._n = int(self._env.stat()["entries"])
        else:
            plyvel = _need("plyvel")
            try:
                self._db = _shared_handle("leveldb", self.path,
                                          lambda: plyvel.DB(self.path, create_if_missing=False))
            except plyvel.Error as e:
                raise BadFileError(f"cannot open the LevelDB ({e}); LevelDB lets one process open "
                                   f"a database at a time", path=self.path) from None
            if self._n is None:
                self._n = sum(1 for _ in self._db.iterator(include_value=False))

    def __len__(self):
        return self._n

    def keys(self) -> np.ndarray:
        if self._keys is None:
            self._open()
            if self.backend == "lmdb":
                it = self._txn.cursor().iternext(keys=True, values=False)
            else:
                it = self._db.iterator(include_value=False)
            self._keys = np.array(list(it), dtype=object)  # bytes; Caffe keys are short
        return self._keys

    def _parse(self, value, key):
        return datum_to_array(value, self.decode, f"{self.path} (key {key!r})")

    def raw(self, i) -> tuple:
        """(key, value bytes) of record ``i``, undecoded (read where the database is open)."""
        key = self.keys()[i]
        self._open()
        return key, (self._txn.get(key) if self.backend == "lmdb" else self._db.get(key))

    def decode_raw(self, record):
        """The (array, label) of a record from :meth:`raw`; needs no open database."""
        key, value = record
        return self._parse(value, key)

    def get(self, i):
        return self.decode_raw(self.raw(i))

    def iterate(self, start=0):
        self._open()
        if start and start >= self._n:
            return
        if self.backend == "lmdb":
            cur = self._txn.cursor()
            if start:
                cur.set_key(self.keys()[start])
            else:
                cur.first()
            mapped = 0
            while True:
                key, value = cur.key(), cur.value()
                if not key:
                    return
                mapped += len(value)
                yield self._parse(value, key)
                if mapped > REMAP_BYTES:
                    # the pages read stay in this process's RSS while the map lives: drop the
                    # map now and then, so a pass over a large database runs in flat memory
                    self.close()
                    self._open()
                    cur = self._txn.cursor()
                    if not cur.set_key(key):
                        raise BadFileError(f"record {key!r} vanished while reading", path=self.path)
                    mapped = 0
                if not cur.next():
                    return
        else:
            it = self._db.iterator(start=self.keys()[start]) if start else self._db.iterator()
            for key, value in it:
                yield self._parse(value, key)

    def close(self):
        """Close this process's handle of the database (shared by every source on it)."""
        h = _OPEN.pop((self.backend, os.path.realpath(self.path), os.getpid()), None)
        if h is not None:
            h.close()
        self._env = self._txn = self._db = None


class ListSource:
    """An ImageData list file: ``path label`` lines, images under ``root_folder``."""

    multiprocess = True

    def __init__(self, path, root_folder="", new_height=0, new_width=0, is_color=True):
        self.path = str(path)
        if (new_height > 0) != (new_width > 0):
            raise UserError(f"{path}: ImageData needs both new_height and new_width, or neither")
        self.root, self.new_height, self.new_width, self.is_color = (str(root_folder), int(new_height),
                                                                     int(new_width), bool(is_color))
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise BadFileError(f"cannot read the image list: {e}", path=path) from None
        self.files, labels = [], []
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            name, sep, label = line.rpartition(" ")
            if not sep or not label.lstrip("-").isdigit():
                raise BadFileError(f"line {n} is '{line[:60]}'; expected 'path label' "
                                   f"(an integer label after the last space)", path=path)
            self.files.append(name)
            labels.append(int(label))
        if not self.files:
            raise BadFileError("the image list is empty", path=path)
        self.labels = np.asarray(labels, np.int64)

    def __len__(self):
        return len(self.files)

    def get(self, i):
        img = read_image(self.root + self.files[i], self.new_height, self.new_width, self.is_color)
        return img, int(self.labels[i])

    def iterate(self, start=0):
        for i in range(start, len(self)):
            yield self.get(i)


class HDF5Source(_Lazy):
    """An HDF5Data source list: one .h5 file per line, datasets named by the layer's tops."""

    _handle_attrs = ("_open_file",)
    multiprocess = True

    def __init__(self, path, data_name="data", label_name="label", base_dir=None):
        h5py = _need("h5py")
        self.path, self.data_name, self.label_name = str(path), data_name, label_name
        p = Path(path)
        if p.suffix.lower() in (".h5", ".hdf5"):
            files = [p]
        else:
            try:
                names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise BadFileError(f"cannot read the HDF5 source list: {e}", path=path) from None
            files = []
            for name in names:
                f = Path(name)
                if not f.is_absolute() and not f.exists():
                    f = Path(base_dir or p.parent) / name
                files.append(f)
        if not files:
            raise BadFileError("the HDF5 source list names no files", path=path)
        self.files, sizes, self.sample_shape = [str(f) for f in files], [], None
        for f in self.files:
            try:
                with h5py.File(f, "r") as h:
                    for name in (data_name, label_name):
                        if name not in h:
                            raise BadFileError(f"no dataset '{name}' (the file has {sorted(h.keys())})", path=f)
                    d, lab = h[data_name], h[label_name]
                    if d.shape[0] != lab.shape[0]:
                        raise BadFileError(f"'{data_name}' has {d.shape[0]} rows, '{label_name}' "
                                           f"{lab.shape[0]}", path=f)
                    if self.sample_shape is None:
                        self.sample_shape = tuple(int(v) for v in d.shape[1:])
                    elif tuple(d.shape[1:]) != self.sample_shape:
                        raise BadFileError(f"'{data_name}' rows are {tuple(d.shape[1:])}, the first file's "
                                           f"{self.sample_shape}", path=f)
                    sizes.append(int(d.shape[0]))
            except OSError as e:
                raise BadFileError(f"cannot read the HDF5 file: {e}", path=f) from None
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if self.offsets[-1] == 0:
            raise BadFileError("the HDF5 files hold no rows", path=path)
        self._pid, self._open_file, self._open_idx = None, None, None

    def __len__(self):
        return int(self.offsets[-1])

    def _file(self, k):
        self._fresh()
        if self._open_file is None or self._open_idx != k:
            if self._open_file is not None:
                self._open_file.close()
            import h5py
            self._open_file, self._open_idx = h5py.File(self.files[k], "r"), k
        return self._open_file

    def _label(self, v):
        v = np.asarray(v).ravel()
        return int(v[0]) if v.size else 0

    def get(self, i):
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        h = self._file(k)
        j = i - int(self.offsets[k])
        return np.asarray(h[self.data_name][j], np.float32), self._label(h[self.label_name][j])

    def iterate(self, start=0, chunk=256):
        for k in range(len(self.files)):
            lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
            if hi <= start:
                continue
            h = self._file(k)
            for s in range(max(start, lo) - lo, hi - lo, chunk):
                xs = np.asarray(h[self.data_name][s:s + chunk], np.float32)
                ys = np.asarray(h[self.label_name][s:s + chunk])
                for x, y in zip(xs, ys):
                    yield x, self._label(y)


class ArraySource:
    """Samples already in memory: x (N x ...) and y (N)."""

    multiprocess = True

    def __init__(self, x, y, path="data"):
        self.x, self.y, self.path = x, y, str(path)

    def __len__(self):
        return int(self.x.shape[0])

    def get(self, i):
        return self.x[i], int(self.y[i])

    def iterate(self, start=0):
        for i in range(start, len(self)):
            yield self.x[i], int(self.y[i])


__all__ = ["DBSource", "ListSource", "HDF5Source", "ArraySource", "db_backend"]
