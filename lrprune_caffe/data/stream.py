"""A streamed labelled dataset: a record source + Caffe's preprocessing, in batches.

:class:`StreamDataset` never holds more than one batch. It serves two readers:

* engines (``evaluate``): ``ds.batches(batch_size)`` yields ``(x, y)`` numpy
  batches in the source's order, read sequentially (a database cursor);
  ``iterations=K`` gives K batches wrapping around the source at its end, as
  Caffe's data layers do under ``caffe test --iterations K``;
* torch (``finetune``): ``ds[i] -> (x, y)`` is a map-style dataset for a
  ``DataLoader`` (workers, samplers). At TRAIN the random crop and mirror of
  sample ``i`` are drawn from ``(seed, epoch, i)``, so a run does not depend on
  the number of workers or processes; :meth:`set_epoch` moves them on.

:func:`open_data` opens any supported source by its path: an LMDB or LevelDB
folder, an ImageData list (``.txt``: ``path label`` lines), an HDF5 file or
HDF5 source list (lines naming ``.h5`` files), an ``.npz``, an image folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lrprune_caffe.errors import BadFileError, UserError
from .sources import ArraySource, DBSource, HDF5Source, ListSource, db_backend
from .transformer import Transformer


class StreamDataset:
    def __init__(self, records, transformer: Transformer = None, source=None, notes=None, seed=0):
        self.records = records
        self.transformer = transformer or Transformer()
        self.source = str(source or getattr(records, "path", "data"))
        self.notes = list(notes or []) + list(self.transformer.notes)
        self.seed = int(seed)
        self.epoch = 0
        self.classes = None
        self._shape = None

    def __len__(self):
        return len(self.records)

    @property
    def phase(self):
        return self.transformer.phase

    @property
    def multiprocess(self) -> bool:
        """May DataLoader worker processes open it (LevelDB: no; they decode records read here)."""
        return bool(getattr(self.records, "multiprocess", True))

    @property
    def sample_shape(self) -> tuple:
        """C x H x W after preprocessing (from the first record, as Caffe's data layers shape their top)."""
        if self._shape is None:
            x, _ = next(iter(self.records.iterate(0)))
            self._shape = tuple(int(d) for d in self.transformer.output_shape(x.shape)) \
                if x.ndim == 3 else tuple(int(d) for d in x.shape)
        return self._shape

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def _rng(self, i):
        if self.transformer.phase != "TRAIN":
            return None
        return np.random.default_rng((self.seed, self.epoch, int(i)))

    def _apply(self, x, i):
        if x.ndim != 3 or self.transformer.identity:
            return np.ascontiguousarray(x, dtype=np.float32)
        return self.transformer(x, self._rng(i), where=f"{self.source} (record {i})")

    def __getitem__(self, i):
        """Sample ``i``, or ``(epoch, i)``: sample i with that epoch's random crop / mirror; or
        ``(epoch, i, record)``: the same from a raw record read elsewhere (``records.raw(i)``)."""
        if isinstance(i, tuple):
            epoch, i, *record = i
            x, y = self.records.decode_raw(record[0]) if record else self.records.get(int(i))
            saved, self.epoch = self.epoch, int(epoch)
            try:
                return self._apply(x, i), np.int64(y)
            finally:
                self.epoch = saved
        x, y = self.records.get(int(i))
        return self._apply(x, i), np.int64(y)

    def shard(self, rank: int, world: int) -> "StreamDataset":
        """The ``rank``-th of ``world`` contiguous parts, for evaluation split over processes
        (its :meth:`batches` are one pass over records ``[rank n / world, (rank + 1) n / world)``)."""
        n = len(self.records)
        return _Shard(self, rank * n // world, (rank + 1) * n // world)

    def batches(self, batch_size: int, iterations: int = None, start: int = 0, count: int = None):
        """(x, y) float32 / int64 batches in order: one pass (``count`` samples from ``start``: to the
        end), or ``iterations`` full batches wrapping around."""
        n = len(self.records)
        total = (n - start if count is None else int(count)) if iterations is None else \
            int(iterations) * int(batch_size)
        xs, ys, i, done = [], [], start, 0
        while done < total:
            pos = i % n
            for x, y in self.records.iterate(pos):
                xs.append(self._apply(x, pos))
                ys.append(y)
                pos += 1
                done += 1
                if len(xs) == batch_size:
                    yield _stack(xs, ys, self.source)
                    xs, ys = [], []
                if done >= total:
                    break
            i = 0  # wrap around to the first record
        if xs:
            yield _stack(xs, ys, self.source)


class _Shard(StreamDataset):
    """Records ``[lo, hi)`` of a StreamDataset (same source, preprocessing and handles)."""

    def __init__(self, parent: StreamDataset, lo: int, hi: int):
        self.__dict__.update(parent.__dict__)
        self._lo, self._hi = int(lo), int(hi)

    def __len__(self):
        return self._hi - self._lo

    def __getitem__(self, i):
        raise TypeError("a shard is read by batches()")

    def batches(self, batch_size: int, iterations: int = None, start: int = 0, count: int = None):
        if iterations is not None:
            raise ValueError("a shard is read in one pass")
        left = len(self) - start if count is None else int(count)
        if left <= 0:
            return iter(())
        return StreamDataset.batches(self, batch_size, start=self._lo + start, count=left)


def _stack(xs, ys, source):
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise BadFileError(f"records of different shapes in one batch ({sorted(shapes)[:3]}); a batch needs "
                           f"one shape (set crop_size, or new_height/new_width for image lists)", path=source)
    return np.stack(xs).astype(np.float32, copy=False), np.asarray(ys, np.int64)


def from_arrays(x, y, source="data") -> StreamDataset:
    ds = StreamDataset(ArraySource(x, y, source), Transformer(), source)
    return ds


def as_stream(data, what="data") -> StreamDataset:
    """A StreamDataset from a StreamDataset, or anything datasets.as_dataset takes (in memory)."""
    if isinstance(data, StreamDataset):
        return data
    from .datasets import as_dataset
    ds = as_dataset(data, what)
    s = from_arrays(ds.x, ds.y, ds.source)
    s.classes, s.notes = ds.classes, list(ds.notes)
    return s


def is_list_of_h5(path) -> bool:
    try:
        with open(path, "r") as f:
            for line in f:
                line = line.strip()
                if line:
                    return Path(line.split()[0]).suffix.lower() in (".h5", ".hdf5")
    except (OSError, UnicodeDecodeError):
        return False
    return False


def open_data(path, transformer: Transformer = None, *, root_folder="", new_height=0, new_width=0,
              is_color=True, input_shape=None, pre=None, seed=0) -> StreamDataset:
    """Open a data source by its path (see the module doc). ``pre``/``input_shape``: image folders."""
    p = Path(path)
    if transformer is None and pre is not None and (pre.mean is not None or pre.scale != 1.0):
        transformer = Transformer(scale=float(pre.scale), mean_values=tuple(pre.mean or ()))
    t = transformer or Transformer()
    if p.is_dir() and db_backend(p):
        return StreamDataset(DBSource(p, decode=t.decode), t, str(p), seed=seed)
    if not p.exists():
        raise BadFileError("data not found", path=path)
    suffix = p.suffix.lower()
    if p.is_dir() or suffix == ".npz":
        from .datasets import load_data
        return as_stream(load_data(p, input_shape, pre))
    if suffix in (".h5", ".hdf5") or is_list_of_h5(p):
        return StreamDataset(HDF5Source(p), Transformer(), str(p), seed=seed)
    if suffix in (".txt", ".lst", ".list", ""):
        return StreamDataset(ListSource(p, root_folder, new_height, new_width, is_color), t, str(p), seed=seed)
    raise UserError(f"{path}: unknown data; expected an LMDB/LevelDB folder, an image list (.txt), an HDF5 "
                    f"file or list, an .npz, or an image folder")


__all__ = ["StreamDataset", "open_data", "as_stream", "from_arrays"]
