"""Labelled data for ``evaluate`` and ``finetune``: npz files and image folders.

* ``DATA.npz`` holds ``x`` (N x C x H x W, float, already preprocessed as the
  net expects) and ``y`` (N integer class labels).
* An image folder holds one subfolder per class (sorted names give labels
  0, 1, ...), images read with Pillow (optional) and preprocessed the way
  Caffe's ``caffe.io.Transformer`` / ``transform_param`` do:
  resize (shorter side), center crop to the net's input size, channel order
  (BGR by default, as Caffe models expect), ``(pixel - mean) * scale`` with
  pixels in 0..255.
* ``load_mnist_split(path)``: the MNIST split in ``shared/data`` (uint8
  digits) as LeNet takes them, ``x = pixels / 256`` (Caffe's ``scale:
  0.00390625``).

Problems with the data are :class:`BadFileError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from lrprune_caffe.errors import BadFileError, UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pnm", ".tif", ".tiff", ".webp", ".gif"}


@dataclass
class Dataset:
    """x: N x C x H x W float32; y: N int64 labels; source: where it came from."""

    x: np.ndarray
    y: np.ndarray
    source: str = "data"
    classes: Optional[list] = None  # class names (image folders)
    notes: list = field(default_factory=list)  # what loading did that the user should know

    def __len__(self):
        return int(self.x.shape[0])

    def subset(self, idx) -> "Dataset":
        return Dataset(self.x[idx], self.y[idx], self.source, self.classes, list(self.notes))


def make_dataset(x, y, source="data") -> Dataset:
    """Check and convert arrays into a Dataset (float32 x, int64 y)."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 2:
        raise BadFileError(f"x has shape {x.shape}; expected N x C x H x W", path=source)
    if not np.issubdtype(x.dtype, np.floating):
        raise BadFileError(f"x is {x.dtype}; expected float32 values already preprocessed as the net "
                           f"expects (e.g. MNIST pixels / 256 for LeNet)", path=source)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise BadFileError(f"y has shape {y.shape}; expected one label per sample ({x.shape[0]})", path=source)
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise BadFileError("y holds non-integer labels", path=source)
    elif not np.issubdtype(y.dtype, np.integer):
        raise BadFileError(f"y is {y.dtype}; expected integer class labels", path=source)
    if x.shape[0] == 0:
        raise BadFileError("the data holds no samples", path=source)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise BadFileError("x holds NaN or infinite values", path=source)
    return Dataset(x, y.astype(np.int64), str(source))


def as_dataset(data, what="data") -> Dataset:
    """A Dataset from a Dataset, an (x, y) pair or a {'x', 'y'} mapping."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, dict):
        return make_dataset(data["x"], data["y"], what)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return make_dataset(data[0], data[1], what)
    raise UserError(f"{what}: expected a Dataset, an (x, y) pair or a dict with 'x' and 'y'")


def load_npz_data(path, x_key="x", y_key="y") -> Dataset:
    """DATA.npz with ``x`` (N x C x H x W float) and ``y`` (N integer labels)."""
    from lrprune_caffe.fileutil import read_npz
    z = read_npz(path, f"an .npz with arrays '{x_key}' and '{y_key}'")
    if x_key not in z or y_key not in z:
        raise BadFileError(f"expected arrays '{x_key}' and '{y_key}', the file has {list(z)}", path=path)
    return make_dataset(z[x_key], z[y_key], str(path))


def load_mnist_split(path):
    """(train, test) Datasets from an npz with x_train/y_train/x_test/y_test uint8 digits.

    x becomes N x 1 x 28 x 28 float32 = uint8 / 256 (Caffe's LeNet scale 0.00390625).
    """
    from lrprune_caffe.fileutil import read_npz
    z = read_npz(path, "an MNIST-style split .npz (x_train, y_train, x_test, y_test)")
    need = ["x_train", "y_train", "x_test", "y_test"]
    missing = [k for k in need if k not in z]
    if missing:
        raise BadFileError(f"expected arrays {need}, missing {missing}", path=path)
    out = []
    for part in ("train", "test"):
        x = z[f"x_{part}"]
        if x.dtype != np.uint8 or x.ndim not in (3, 4):
            raise BadFileError(f"x_{part} is {x.dtype} {x.shape}; expected N x 28 x 28 uint8", path=path)
        if x.ndim == 3:
            x = x[:, None]
        out.append(make_dataset(x.astype(np.float32) / np.float32(256.0), z[f"y_{part}"],
                                f"{path}[{part}]"))
    return tuple(out)


# ---- image folders -----------------------------------------------------------

@dataclass
class Preprocess:
    """Caffe-style preprocessing of 0..255 images: resize, crop, channel order, (x - mean) * scale."""

    mean: Optional[tuple] = None  # per channel, in the net's channel order (Caffe: BGR)
    scale: float = 1.0
    bgr: bool = True
    resize: Optional[int] = None  # shorter side, before the center crop
    gray: bool = False


def parse_mean(text) -> Optional[tuple]:
    if text is None or text == "":
        return None
    try:
        return tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise UserError(f"--mean '{text}' must be one number or comma-separated numbers, "
                        f"e.g. 104,117,123") from None


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise UserError("reading an image folder needs Pillow: pip install 'lrprune-caffe[images]' "
                        "(or pip install Pillow)") from None
    return Image


def _preprocess(img, pre: Preprocess, size, channels):
    Image = _pil()
    img = img.convert("L" if (pre.gray or channels == 1) else "RGB")
    if pre.resize:
        w, h = img.size
        s = pre.resize / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    th, tw = size
    h, w = arr.shape[:2]
    if h < th or w < tw:
        return None, f"is {w}x{h}, smaller than the net input {tw}x{th} (use --resize)"
    top, left = (h - th) // 2, (w - tw) // 2
    arr = arr[top:top + th, left:left + tw]
    if arr.shape[2] == 3 and pre.bgr:
        arr = arr[:, :, ::-1]
    arr = arr.transpose(2, 0, 1)
    if pre.mean is not None:
        mean = np.asarray(pre.mean, dtype=np.float32)
        if mean.size not in (1, arr.shape[0]):
            raise UserError(f"--mean has {mean.size} values for {arr.shape[0]} channels")
        arr = arr - mean.reshape(-1, 1, 1)
    if pre.scale != 1.0:
        arr = arr * np.float32(pre.scale)
    return np.ascontiguousarray(arr, dtype=np.float32), None


def read_image(f, pre, size, channels):
    """One image file as the net's (channels, H, W) float32 input and the file's own (width, height);
    BadFileError naming the file when it cannot be read or does not fit."""
    Image = _pil()
    try:
        with Image.open(f) as img:
            img.load()
            arr, why = _preprocess(img, pre, size, channels)
            image_size = img.size
    except UserError:
        raise
    except Exception as e:
        raise BadFileError(f"cannot read the image: {e}", path=f) from None
    if arr is None:
        raise BadFileError(f"image {why}", path=f)
    return arr, image_size


def load_image_folder(path, input_shape, pre: Preprocess = None) -> Dataset:
    """An image folder (one subfolder per class) as a Dataset shaped like ``input_shape``.

    ``input_shape`` is the net's (N, C, H, W); images are center-cropped to H x W.
    """
    pre = pre or Preprocess()
    root = Path(path)
    if not root.is_dir():
        raise BadFileError("image folder not found", path=path)
    if input_shape is None or len(input_shape) != 4:
        raise UserError(f"{path}: image folders need a net with a 4-D input, the input is {input_shape}")
    channels, size = int(input_shape[1]), (int(input_shape[2]), int(input_shape[3]))
    if pre.gray and channels != 1:
        raise UserError(f"--gray gives 1 channel, the net's input has {channels}")
    if channels not in (1, 3):
        raise UserError(f"images give 1 or 3 channels, the net's input has {channels}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise BadFileError("expected one subfolder per class, found none", path=path)
    xs, ys = [], []
    cropped = 0
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() not in IMAGE_EXTENSIONS or not f.is_file():
                continue
            arr, image_size = read_image(f, pre, size, channels)
            if not pre.resize and image_size != (size[1], size[0]):
                cropped += 1
            xs.append(arr)
            ys.append(label)
    if not xs:
        raise BadFileError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the class subfolders",
                           path=path)
    ds = make_dataset(np.stack(xs), np.asarray(ys, dtype=np.int64), str(path))
    ds.classes = classes
    if cropped:
        ds.notes.append(f"{cropped} of {len(xs)} images are larger than the net's {size[1]}x{size[0]} input and "
                        f"were center-cropped without resizing (--resize N scales the shorter side first)")
    return ds


def load_data(path, input_shape=None, pre: Preprocess = None) -> Dataset:
    """An npz file or an image folder."""
    p = Path(path)
    if p.is_dir():
        return load_image_folder(p, input_shape, pre)
    if pre is not None and pre != Preprocess():
        raise UserError(f"{path}: preprocessing flags (--mean, --scale, --resize, --gray, --rgb) apply to "
                        f"image folders; an npz holds data already preprocessed")
    return load_npz_data(p)


def check_against_net(ds: Dataset, net_input_shape, classes: int = None, input_name="data"):
    """The data fits the net: sample shape == input shape (less the batch), labels < classes."""
    if net_input_shape is not None:
        want = tuple(int(d) for d in net_input_shape[1:])
        got = tuple(int(d) for d in ds.x.shape[1:])
        if got != want:
            raise BadFileError(f"samples have shape {got} (x is {tuple(ds.x.shape)}), but the net's input "
                               f"'{input_name}' takes {want} per sample", path=ds.source)
    if classes is not None:
        lo, hi = int(ds.y.min()), int(ds.y.max())
        if lo < 0 or hi >= classes:
            bad = int(np.sum((ds.y < 0) | (ds.y >= classes)))
            raise BadFileError(f"{bad} label(s) out of range (labels span {lo}..{hi}); the net has "
                               f"{classes} classes, so labels must be 0..{classes - 1}", path=ds.source)


__all__ = ["Dataset", "Preprocess", "make_dataset", "as_dataset", "load_npz_data", "load_mnist_split",
           "load_image_folder", "load_data", "check_against_net", "parse_mean"]
