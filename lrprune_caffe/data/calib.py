"""Calibration inputs: a few hundred unlabeled samples of what the net sees, from any source we read.

:func:`load_calib` returns the first ``n`` samples (labels, where the source
has them, are ignored) as ``{input blob: float32 array}``:

* an ``.npz``: arrays keyed by the net's input names, or ``x``, or an
  MNIST-style split's ``x_train`` (uint8 digits, read as pixels / 256);
* an image folder (flat, or one subfolder per class; files in sorted order),
  preprocessed as ``evaluate`` does (:class:`~.datasets.Preprocess`: resize,
  center crop, channel order, ``(pixel - mean) * scale``);
* a train_val prototxt with a data layer: its TRAIN source (its TEST one
  when it has no TRAIN data layer), with its ``transform_param`` applied as
  at TEST (center crop, no mirror: calibration wants the images as the
  deployed net sees them);
* a Caffe data source (LMDB / LevelDB folder, ImageData list, HDF5 file or
  list), read in order with the preprocessing flags' mean and scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrprune_caffe.errors import BadFileError, UserError
from .datasets import IMAGE_EXTENSIONS, Preprocess, load_mnist_split, read_image


@dataclass
class CalibSet:
    arrays: dict  # {input blob: float32 (n, ...)}
    desc: str  # how the report names it
    notes: list = field(default_factory=list)

    def __len__(self):
        return int(next(iter(self.arrays.values())).shape[0]) if self.arrays else 0


def _npz(path, names, n):
    from lrprune_caffe.fileutil import read_npz
    z = read_npz(path, "an .npz of calibration inputs (keyed by input name, or x)")
    if all(k in z for k in names):
        arrays = {k: z[k] for k in names}
    elif len(names) == 1 and "x" in z:
        arrays = {names[0]: z["x"]}
    elif len(names) == 1 and "x_train" in z:
        arrays = {names[0]: load_mnist_split(path)[0].x}
    else:
        raise BadFileError(f"has no array for the net's input(s) {', '.join(names)} (nor x, nor x_train); it "
                           f"holds {', '.join(z) or 'nothing'}", path=path)
    out = {}
    for k, a in arrays.items():
        if not np.issubdtype(a.dtype, np.floating):
            raise BadFileError(f"array for input '{k}' is {a.dtype}; expected float values already "
                               f"preprocessed as the net expects", path=path)
        out[k] = np.ascontiguousarray(a[:n], dtype=np.float32)
        if not np.all(np.isfinite(out[k])):
            raise BadFileError(f"array for input '{k}' holds NaN or infinite values", path=path)
    return out


def _image_files(root: Path) -> list:
    return sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
                  and not any(part.startswith(".") for part in f.relative_to(root).parts))


def _images(root, input_shape, pre, n):
    if input_shape is None or len(input_shape) != 4:
        raise UserError(f"{root}: an image folder needs a net with one 4-D input, the input is {input_shape}")
    channels, size = int(input_shape[1]), (int(input_shape[2]), int(input_shape[3]))
    if channels not in (1, 3):
        raise UserError(f"{root}: images give 1 or 3 channels, the net's input has {channels}")
    files = _image_files(Path(root))
    if not files:
        raise BadFileError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the folder", path=root)
    return np.stack([read_image(f, pre, size, channels)[0] for f in files[:n]])


def _stream_first(ds, n):
    xs, got = [], 0
    for x, _ in ds.batches(min(n, 64)):
        xs.append(x[:n - got])
        got += len(xs[-1])
        if got >= n:
            break
    if not xs:
        raise BadFileError("holds no samples", path=ds.source)
    return np.concatenate(xs).astype(np.float32, copy=False)


def _train_val(path, n, seed):
    from lrprune_caffe.io.caffe import read_net
    from .trainval import data_layers, open_layer
    for phase in ("TRAIN", "TEST"):  # the TRAIN source; a net with only a TEST data layer: that one
        try:
            net = read_net(str(path), phase=phase)
        except BadFileError:
            if phase == "TEST":
                raise
            continue  # e.g. no TRAIN data layer: the TRAIN view's first bottoms are produced by nothing
        layers = data_layers(net)
        if layers:
            break
    else:
        raise UserError(f"{path}: no Data, ImageData or HDF5Data layer (TRAIN or TEST) to calibrate on")
    pdata = open_layer(net, layers[0], "TEST", seed)  # transformed as at TEST: center crop, no mirror
    return (_stream_first(pdata.dataset, n), f"the {phase} source of {path} (layer '{pdata.layer}')",
            pdata.notes)


def load_calib(src, input_names, input_shape=None, n=512, pre: Preprocess = None, seed=0) -> CalibSet:
    """The first ``n`` calibration samples of ``src`` (see the module docstring)."""
    names, n = list(input_names), int(n)
    p = Path(src)
    pre = pre or Preprocess()
    if not p.exists():
        raise BadFileError("calibration data not found", path=src)
    suffix = p.suffix.lower()
    notes = []
    if suffix == ".npz":
        if pre != Preprocess():
            raise UserError(f"{src}: preprocessing flags (--mean, --scale, --resize, --gray, --rgb) apply to "
                            f"image folders and data sources; an npz holds data already preprocessed")
        arrays = _npz(p, names, n)
        desc = f"{src}"
    else:
        if len(names) != 1:
            raise UserError(f"{src}: calibration images feed one input, the net has {len(names)} "
                            f"({', '.join(names)}); give an .npz keyed by input name")
        from .sources import db_backend
        if suffix == ".prototxt":
            x, desc, notes = _train_val(p, n, seed)
        elif p.is_dir() and not db_backend(p):
            x, desc = _images(p, input_shape, pre, n), f"images of {src}"
        else:
            from .stream import open_data
            ds = open_data(p, input_shape=input_shape, pre=pre, seed=seed)
            x, desc, notes = _stream_first(ds, n), f"{src}", list(ds.notes)
        arrays = {names[0]: x}
    count = len(next(iter(arrays.values())))
    if count == 0:
        raise BadFileError("holds no calibration samples", path=src)
    if input_shape is not None and len(names) == 1:
        got, want = tuple(arrays[names[0]].shape[1:]), tuple(int(d) for d in input_shape[1:])
        if want and got != want:
            raise BadFileError(f"calibration samples are {got}, the net's input '{names[0]}' takes {want} "
                               f"(images: --resize N and the crop to the input size)", path=src)
    if count < n:
        notes.append(f"calibration: {src} holds {count} sample(s), fewer than --calib-n {n}")
    return CalibSet(arrays, f"{count} samples of {desc}", notes)


__all__ = ["CalibSet", "load_calib"]
