"""Weight masks: which entries of a net's blobs are held at zero.

A mask is a bool array shaped like its blob, ``True`` = keep. A set of masks
is a dict keyed ``"<layer>/<blob index>"`` (e.g. ``"conv1/0"``), the same key
in memory and in ``masks.npz``; the index is after the *last* slash, so layer
names with slashes work. Pruning makes them (:mod:`lrprune_caffe.transforms.prune`),
fine-tuning holds them (:mod:`lrprune_caffe.train.finetune`), ``compress``,
``pipeline`` and ``finetune`` write them with :func:`masks_npz`.
"""

from __future__ import annotations

import io

import numpy as np

from lrprune_caffe.errors import BadFileError


def mask_key(layer: str, idx: int = 0) -> str:
    """``"<layer>/<idx>"``."""
    return f"{layer}/{int(idx)}"


def split_key(key) -> tuple:
    """(layer, blob index) of ``"<layer>/<idx>"``; a ``(layer, idx)`` tuple is taken as it is.
    Raises ValueError for anything else."""
    if isinstance(key, tuple) and len(key) == 2:
        return str(key[0]), int(key[1])
    name, sep, idx = str(key).rpartition("/")
    if not sep or not name or not idx.isdigit():
        raise ValueError(f"mask key '{key}' is not '<layer>/<blob index>'")
    return name, int(idx)


def _as_bool(key, arr, path):
    arr = np.asarray(arr)
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind in "iuf" and np.isin(arr, (0, 1)).all():
        return arr.astype(bool)
    raise BadFileError(f"mask '{key}' holds {arr.dtype} values, expected bool (True = keep)", path=path)


def check_masks(net, masks: dict, source=None) -> dict:
    """``masks`` with ``"<layer>/<idx>"`` keys and bool arrays, each checked to fit a blob of ``net``
    (layer exists, blob exists, same shape); BadFileError naming ``source`` otherwise."""
    out = {}
    if not masks:
        return out
    by_name = {layer.name: layer for layer in net.layers}
    for key, arr in masks.items():
        try:
            name, idx = split_key(key)
        except ValueError as e:
            raise BadFileError(str(e), path=source) from None
        arr = _as_bool(key, arr, source)
        layer = by_name.get(name)
        if layer is None:
            known = [mask_key(x.name, i) for x in net.layers for i in range(len(x.blobs))][:6]
            raise BadFileError(f"mask file is for another net: no layer '{name}' in the net (mask '{key}'; "
                               f"expected keys like {', '.join(known)}...)", path=source)
        if idx >= len(layer.blobs):
            raise BadFileError(f"mask file is for another net: layer {name} ({layer.type}) has "
                               f"{len(layer.blobs)} blobs, the mask is for blob {idx}", path=source)
        shape = tuple(layer.blobs[idx].shape)
        if tuple(arr.shape) != shape:
            raise BadFileError(f"mask file is for another net: layer {name} blob {idx} shape "
                               f"{tuple(arr.shape)} vs {shape}", path=source)
        out[mask_key(name, idx)] = arr
    return out


def load_masks(path, net=None) -> dict:
    """{"<layer>/<idx>": bool array} from a masks.npz; with ``net``, each is checked to fit
    (:func:`check_masks`)."""
    from lrprune_caffe.fileutil import read_npz
    items = read_npz(path, "a masks .npz")
    if net is not None:
        return check_masks(net, items, path)
    out = {}
    for key, arr in items.items():
        try:
            split_key(key)
        except ValueError as e:
            raise BadFileError(str(e), path=path) from None
        out[key] = _as_bool(key, arr, path)
    return out


def masks_npz(masks: dict) -> bytes:
    """The bytes of a masks.npz (compressed) holding ``masks``."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **{mask_key(*split_key(k)): np.asarray(m, dtype=bool) for k, m in masks.items()})
    return buf.getvalue()


def apply_masks(net, masks: dict) -> None:
    """Zero (exactly, +0.0) every entry whose mask is False, in place.
    Raises ValueError when a mask does not fit its blob."""
    by_name = {layer.name: layer for layer in net.layers}
    for key, mask in masks.items():
        name, idx = split_key(key)
        layer = by_name[name]
        blob = layer.blobs[idx]
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != blob.shape:
            raise ValueError(f"mask for layer '{name}' blob {idx} has shape {mask.shape}, the blob {blob.shape}")
        layer.blobs[idx] = np.where(mask, blob, np.float32(0)).astype(np.float32, copy=False)


def grow_masks(old: dict, new: dict) -> dict:
    """Union of the pruned sets (keep = keep in both)."""
    out = dict(new)
    for k, m in old.items():
        out[k] = out[k] & m if k in out else m
    return out


__all__ = ["mask_key", "split_key", "check_masks", "load_masks", "masks_npz", "apply_masks", "grow_masks"]
