"""Caffe's DataTransformer (``transform_param``), one C x H x W record at a time.

Source: BVLC Caffe 1.0 ``src/caffe/data_transformer.cpp``, ``Transform(const
Datum&)`` and ``Transform(const cv::Mat&)``, which compute the same thing::

    h_off, w_off = TRAIN: uniform in [0, H - crop], [0, W - crop]
                   TEST:  (H - crop) // 2, (W - crop) // 2      (crop = crop_size, 0 = none)
    out[c, h, w'] = (x[c, h_off + h, w_off + w] - mean[c, h_off + h, w_off + w]) * scale   (mean_file)
                  = (x[c, h_off + h, w_off + w] - mean_value[c]) * scale                   (mean_value)
                  =  x[c, h_off + h, w_off + w] * scale                                    (neither)
    w' = crop_w - 1 - w when mirroring, else w

so the mean file is full-size (it must match the record's C x H x W) and is
subtracted *before* the crop, at the same pixels, and the scale multiplies after
the subtraction, in float32. One ``mean_value`` is repeated over the channels.
``mean_file`` and ``mean_value`` together are an error, as in Caffe.

Mirroring: Caffe flips with probability 1/2 whenever ``mirror: true``, in any
phase. We flip at TRAIN only: at TEST a mirror is random noise on an
evaluation, so it is left out and :attr:`notes` says so.

``force_color`` / ``force_gray`` choose how encoded records decode (see
:mod:`lrprune_caffe.data.caffe_io`); both at once is an error, as in Caffe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from lrprune_caffe.errors import BadFileError, UserError
from .caffe_io import COLOR, GRAY, NATIVE, read_mean_file

#: transform_param fields of the SSD fork that this transformer does not apply
_UNSUPPORTED = ("resize_param", "noise_param", "emit_constraint", "distort_param", "expand_param")


@dataclass
class Transformer:
    scale: float = 1.0
    mean: Optional[np.ndarray] = None  # C x H x W (mean_file)
    mean_values: tuple = ()
    crop: int = 0
    mirror: bool = False
    phase: str = "TEST"
    decode: str = NATIVE  # how encoded records decode: native / color / gray
    mean_file: Optional[str] = None
    notes: list = field(default_factory=list)

    @property
    def identity(self) -> bool:
        return (self.scale == 1.0 and self.mean is None and not self.mean_values and not self.crop
                and not (self.mirror and self.phase == "TRAIN"))

    def output_shape(self, shape) -> tuple:
        c, h, w = (int(d) for d in shape)
        if self.crop:
            return c, self.crop, self.crop
        return c, h, w

    def offsets(self, h, w, rng=None):
        if not self.crop:
            return 0, 0
        if self.phase == "TRAIN":
            rng = rng if rng is not None else np.random.default_rng()
            return int(rng.integers(0, h - self.crop + 1)), int(rng.integers(0, w - self.crop + 1))
        return (h - self.crop) // 2, (w - self.crop) // 2

    def __call__(self, x, rng=None, where="record") -> np.ndarray:
        """One C x H x W record (uint8 or float) -> float32, as Caffe's DataTransformer gives it."""
        c, h, w = x.shape
        if self.crop and (h < self.crop or w < self.crop):
            raise BadFileError(f"a record is {h}x{w}, smaller than crop_size {self.crop}", path=where)
        hoff, woff = self.offsets(h, w, rng)
        mean = self.mean
        if mean is not None and mean.shape != x.shape:
            raise BadFileError(f"a record is {c}x{h}x{w} but the mean file "
                               f"{self.mean_file or ''} is {'x'.join(map(str, mean.shape))}; "
                               f"Caffe needs them equal", path=where)
        if self.crop:  # the same pixels of the record and of the full-size mean
            x = x[:, hoff:hoff + self.crop, woff:woff + self.crop]
            if mean is not None:
                mean = mean[:, hoff:hoff + self.crop, woff:woff + self.crop]
        x = x.astype(np.float32)
        if mean is not None:
            x = x - mean
        elif self.mean_values:
            mv = np.asarray(self.mean_values, np.float32)
            if mv.size == 1:
                mv = np.repeat(mv, c)
            if mv.size != c:
                raise BadFileError(f"{len(self.mean_values)} mean_value(s) for {c} channels; Caffe needs "
                                   f"one or one per channel", path=where)
            x = x - mv.reshape(c, 1, 1)
        if self.scale != 1.0:
            x = x * np.float32(self.scale)
        if self.mirror and self.phase == "TRAIN" and (rng if rng is not None else np.random).random() < 0.5:
            x = x[:, :, ::-1]
        return np.ascontiguousarray(x, dtype=np.float32)


def from_param(tp, phase="TEST", base_dir=None, where="transform_param") -> Transformer:
    """A Transformer from a TransformationParameter (paths resolved by :func:`resolve_path`)."""
    for f in _UNSUPPORTED:
        if tp.HasField(f):
            raise UserError(f"{where}: transform_param {f} (SSD fork) is not supported")
    if tp.crop_h or tp.crop_w:
        raise UserError(f"{where}: transform_param crop_h/crop_w (SSD fork) are not supported; use crop_size")
    if tp.HasField("mean_file") and len(tp.mean_value):
        raise UserError(f"{where}: transform_param has both mean_file and mean_value; Caffe takes one")
    if tp.force_color and tp.force_gray:
        raise UserError(f"{where}: transform_param has both force_color and force_gray")
    t = Transformer(scale=float(np.float32(tp.scale)), crop=int(tp.crop_size), mirror=bool(tp.mirror),
                    phase=phase, decode=COLOR if tp.force_color else GRAY if tp.force_gray else NATIVE,
                    mean_values=tuple(float(v) for v in tp.mean_value))
    if tp.HasField("mean_file"):
        t.mean_file = str(resolve_path(tp.mean_file, base_dir, f"{where}: mean_file"))
        t.mean = read_mean_file(t.mean_file)
    if tp.mirror and phase == "TEST":
        t.notes.append(f"{where}: mirror is set at TEST, where Caffe flips half the images at random; "
                       f"evaluated without flipping")
    return t


def resolve_path(path, base_dir=None, what="path"):
    """A path from a prototxt: as given when it exists (Caffe resolves against its working folder),
    else relative to ``base_dir`` (the prototxt's folder)."""
    from pathlib import Path
    p = Path(path)
    if p.is_absolute() or p.exists() or base_dir is None:
        if not p.exists():
            raise BadFileError(f"{what} '{path}' not found", path=str(p))
        return p
    q = Path(base_dir) / p
    if not q.exists():
        raise BadFileError(f"{what} '{path}' not found (neither in the working folder nor next to the "
                           f"prototxt)", path=str(q))
    return q


__all__ = ["Transformer", "from_param", "resolve_path"]
