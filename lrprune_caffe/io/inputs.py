"""Input arrays and labels from .npz files, checked against a net's inputs."""

from __future__ import annotations

import numpy as np

from lrprune_caffe.errors import BadFileError
from lrprune_caffe.fileutil import read_npz


def load_inputs(path, net) -> dict:
    """Arrays of an .npz keyed by the net's input names, checked against the input shapes."""
    arrays = read_npz(path, "an .npz of input arrays keyed by input name")
    shapes = net.input_shapes()
    out = {}
    if len(shapes) == 1 and next(iter(shapes)) not in arrays and "x" in arrays:
        arrays[next(iter(shapes))] = arrays["x"]  # a DATA.npz (x, y) as evaluate/finetune take it
    for name, shape in shapes.items():
        if name not in arrays:
            raise BadFileError(f"has no array '{name}' for the net's input (it holds: "
                               f"{', '.join(arrays) or 'nothing'})", path=path)
        a = arrays[name]
        if shape is not None and (a.ndim != len(shape) or tuple(a.shape[1:]) != tuple(shape[1:])):
            raise BadFileError(f"array '{name}' has shape {tuple(a.shape)}; the net's input is "
                               f"{tuple(shape)} (any batch size)", path=path)
        out[name] = np.ascontiguousarray(a, dtype=np.float32)
        if not np.all(np.isfinite(out[name])):
            raise BadFileError(f"array '{name}' holds NaN or infinite values", path=path)
    return out


def load_labels(path) -> np.ndarray:
    """Labels from an .npz: its array 'y' or 'labels' if present (a DATA.npz), else its first array."""
    arrays = read_npz(path, "an .npz of labels")
    if not arrays:
        raise BadFileError("holds no array (expected labels)", path=path)
    key = next((k for k in ("y", "labels") if k in arrays), next(iter(arrays)))
    return arrays[key].reshape(-1)


__all__ = ["load_inputs", "load_labels"]
