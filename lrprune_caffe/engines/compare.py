"""THE numeric comparison of two sets of blobs (reference vs test), for the CLI and the tests.

``compare_outputs(ref, test)`` gives, per blob both hold:

* ``max_abs``: max |test - ref|;
* ``rel_l2``: ||test - ref||_2 / ||ref||_2 (0 when both are zero);
* ``snr_db``: 10 log10(||ref||^2 / ||test - ref||^2); ``None`` when identical
  (infinite SNR; JSON has no infinity);
* ``top1_agreement`` for class outputs (2-D ``(N, classes)`` or 4-D
  ``(N, classes, 1, 1)`` with more than one class): the share of samples whose
  arg-max class is the same; ``None`` for other blobs;
* with ``labels`` (N,), ``top1_ref`` / ``top1_test``: each side's accuracy.

and a summary over the blobs (``worst_rel_l2``, ``max_abs``,
``min_top1_agreement``). Everything is computed in float64.
"""

from __future__ import annotations

import math

import numpy as np


def is_class_output(shape) -> bool:
    shape = tuple(int(d) for d in shape)
    if len(shape) == 2:
        return shape[1] > 1
    if len(shape) == 4:
        return shape[1] > 1 and shape[2] == 1 and shape[3] == 1
    return False


def class_predictions(arr) -> np.ndarray:
    a = np.asarray(arr)
    return np.argmax(a.reshape(a.shape[0], a.shape[1]), axis=1)


def compare_arrays(ref, test, labels=None) -> dict:
    r = np.asarray(ref, dtype=np.float64)
    t = np.asarray(test, dtype=np.float64)
    if r.shape != t.shape:
        return {"shape": list(r.shape), "test_shape": list(t.shape),
                "error": f"shapes differ: {tuple(r.shape)} vs {tuple(t.shape)}"}
    d = t - r
    ref_sq = float(np.sum(r * r))
    err_sq = float(np.sum(d * d))
    finite = bool(np.all(np.isfinite(t)))
    out = {
        "shape": list(r.shape),
        "max_abs": float(np.max(np.abs(d))) if d.size else 0.0,
        "rel_l2": (math.sqrt(err_sq / ref_sq) if ref_sq > 0 else (0.0 if err_sq == 0 else math.inf)),
        "snr_db": (None if err_sq == 0 else (10 * math.log10(ref_sq / err_sq) if ref_sq > 0 else -math.inf)),
        "finite": finite,
        "top1_agreement": None,
    }
    if not finite:
        out["max_abs"] = math.inf
        out["rel_l2"] = math.inf
        out["snr_db"] = -math.inf
    if r.size and is_class_output(r.shape):
        pr, pt = class_predictions(r), class_predictions(t)
        out["top1_agreement"] = float(np.mean(pr == pt))
        if labels is not None:
            lab = np.asarray(labels).reshape(-1)
            if lab.size == pr.size:
                out["top1_ref"] = float(np.mean(pr == lab))
                out["top1_test"] = float(np.mean(pt == lab))
    return out


def compare_outputs(ref: dict, test: dict, labels=None, blobs=None) -> dict:
    """Compare the blobs of ``ref`` and ``test`` ({name: array}); ``blobs`` limits the names.

    Returns ``{"blobs": {name: {...}}, "missing": [...], "worst_rel_l2", "max_abs",
    "min_top1_agreement"}`` (see the module docstring).
    """
    names = list(blobs) if blobs is not None else list(ref)
    per, missing = {}, []
    for name in names:
        if name not in ref or name not in test:
            missing.append(name)
            continue
        per[name] = compare_arrays(ref[name], test[name], labels)
    ok = [v for v in per.values() if "error" not in v]
    agree = [v["top1_agreement"] for v in ok if v.get("top1_agreement") is not None]
    return {
        "blobs": per,
        "missing": missing,
        "worst_rel_l2": max((v["rel_l2"] for v in ok), default=None),
        "max_abs": max((v["max_abs"] for v in ok), default=None),
        "min_top1_agreement": min(agree) if agree else None,
        "errors": [f"{k}: {v['error']}" for k, v in per.items() if "error" in v],
    }


def json_safe(obj):
    """Infinities and NaN as strings ("inf", "-inf", "nan"), so json.dumps writes standard JSON."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


__all__ = ["compare_outputs", "compare_arrays", "is_class_output", "class_predictions", "json_safe"]
