"""THE comparison of two sets of blobs (reference vs test), each output by its kind.

Kinds (:func:`output_kinds`; decided by the producing layer where the net is
known, by the values only as a fallback):

* ``"class_scores"``: a Softmax output (Caffe layer or ONNX node), or, with no
  producer known, a probability-like blob (non-negative, summing to 1 along
  axis 1) of at least two classes;
* ``"detections"``: a DetectionOutput result (1 x 1 x D x 7; by shape when the
  producer is unknown, e.g. an ONNX file, whose lowering ends in other ops);
* ``"tensor"``: anything else (box regressions, features, logits).

``compare_outputs(ref, test, labels=None, blobs=None, kinds=None)`` returns::

    {"blobs": {name: entry},          # class scores and tensors
     "detections": {name: match},     # detection lists (never in "blobs")
     "kinds": {name: kind},
     "missing": [...], "errors": [...],
     "worst_rel_l2", "max_abs",       # over "blobs" (None without one)
     "min_top1_agreement",            # over class scores (None without one)
     "min_recall"}                    # over detection lists (None without one)

A ``"blobs"`` entry (everything in float64): ``kind``, ``shape``, ``finite``,
``max_abs`` (max |test - ref|), ``rel_l2`` (||test - ref|| / ||ref||; 0 when
both are zero), ``snr_db`` (10 log10(||ref||^2 / ||test - ref||^2), ``None``
when identical), ``top1_agreement`` (``None`` unless class scores). Class
scores add ``samples`` (the number of score vectors: batch x positions),
``classes``, ``top5_agreement`` (the share of samples whose reference top-1
class is among the test's top 5; ``None`` with 5 classes or fewer),
``kl`` (mean KL(ref || test) in nats, probabilities clipped at 1e-12),
``few_samples`` (True under :data:`FEW_SAMPLES` samples: say the count with
the agreement, see :func:`describe`), and with ``labels`` (one per sample)
``top1_ref`` / ``top1_test``: each side's accuracy.

A ``"detections"`` entry is :func:`lrprune_caffe.engines.detection.match_detections`
pooled over the leading slices (an engine that ran in chunks concatenates one
1x1xDx7 list per chunk): ``kind``, ``ref``, ``test``, ``matched``, ``recall``,
``precision``, ``mean_iou``, ``max_score_change``, ``iou_threshold``.
"""

from __future__ import annotations

import math

import numpy as np

from .detection import IOU_THRESHOLD, looks_like_detections, match_detections

CLASS_SCORES, DETECTIONS, TENSOR = "class_scores", "detections", "tensor"
KINDS = (CLASS_SCORES, DETECTIONS, TENSOR)
FEW_SAMPLES = 100  # a top-1 agreement over fewer samples is reported with its count


def is_class_output(shape) -> bool:
    """Shape test only: (N, C) or (N, C, 1, 1) with C > 1."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 2:
        return shape[1] > 1
    if len(shape) == 4:
        return shape[1] > 1 and shape[2] == 1 and shape[3] == 1
    return False


def class_predictions(arr) -> np.ndarray:
    a = np.asarray(arr)
    return np.argmax(a.reshape(a.shape[0], a.shape[1]), axis=1)


# ---- kinds ------------------------------------------------------------------------------------

def output_kinds(net, blobs=None) -> dict:
    """{blob: kind or None} from the layer (IR Net) or node (:class:`~lrprune_caffe.engines.model.OnnxModel`)
    that produces each blob; None where the producer says nothing (the values then decide)."""
    names = list(blobs) if blobs is not None else list(net.outputs())
    if hasattr(net, "layers"):  # an IR Net: the last layer writing the blob
        producer = {}
        for layer in net.layers:
            for t in layer.tops:
                producer[t] = layer.type
        by_type = {"Softmax": CLASS_SCORES, "DetectionOutput": DETECTIONS}
        return {n: by_type.get(producer.get(n), TENSOR if n in producer else None) for n in names}
    ops = getattr(net, "producers", {}) or {}
    return {n: CLASS_SCORES if ops.get(n) == "Softmax" else None for n in names}


def _probability_axis(r: np.ndarray):
    """The axis (1, else the last) along which ``r`` is a probability vector, or None."""
    if r.ndim < 2 or r.size == 0 or np.any(r < -1e-6):
        return None
    for axis in dict.fromkeys((1, r.ndim - 1)):
        if r.shape[axis] > 1 and np.allclose(r.sum(axis=axis), 1.0, atol=1e-3):
            return axis
    return None


def kind_of(ref, test=None, hint=None) -> tuple:
    """(kind, class axis or None) of one blob: ``hint`` (from :func:`output_kinds`) first, then values."""
    r = np.asarray(ref)
    if hint == DETECTIONS:
        return DETECTIONS, None
    if hint == TENSOR:
        return TENSOR, None
    axis = _probability_axis(np.asarray(r, np.float64)) if r.size else None
    if hint == CLASS_SCORES:
        if axis is None and r.ndim >= 2 and r.shape[1] > 1:
            axis = 1
        return (CLASS_SCORES, axis) if axis is not None else (TENSOR, None)
    shapes = [r.shape] + ([np.shape(test)] if test is not None else [])
    if all(len(s) == 4 and looks_like_detections((1, *s[1:])) for s in shapes):
        return DETECTIONS, None
    return (CLASS_SCORES, axis) if axis is not None else (TENSOR, None)


# ---- per kind ---------------------------------------------------------------------------------

def _tensor_numbers(r, t) -> dict:
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
        out.update(max_abs=math.inf, rel_l2=math.inf, snr_db=-math.inf)
    return out


def _class_numbers(r, t, axis, labels) -> dict:
    """Top-1 / top-5 agreement and KL of score vectors along ``axis`` (all other axes are samples)."""
    pr = np.moveaxis(r, axis, -1).reshape(-1, r.shape[axis])
    pt = np.moveaxis(t, axis, -1).reshape(-1, r.shape[axis])
    n, c = pr.shape
    top_r, top_t = np.argmax(pr, axis=1), np.argmax(pt, axis=1)
    out = {"samples": int(n), "classes": int(c), "top1_agreement": float(np.mean(top_r == top_t)) if n else None,
           "few_samples": bool(n < FEW_SAMPLES), "top5_agreement": None, "kl": None}
    if n and c > 5 and np.all(np.isfinite(pt)):
        top5 = np.argpartition(-pt, 5, axis=1)[:, :5]
        out["top5_agreement"] = float(np.mean(np.any(top5 == top_r[:, None], axis=1)))
    if n and np.all(np.isfinite(pt)):
        p, q = np.clip(pr, 1e-12, None), np.clip(pt, 1e-12, None)
        p, q = p / p.sum(axis=1, keepdims=True), q / q.sum(axis=1, keepdims=True)
        out["kl"] = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))
    if labels is not None:
        lab = np.asarray(labels).reshape(-1)
        if lab.size == n:
            out["top1_ref"] = float(np.mean(top_r == lab))
            out["top1_test"] = float(np.mean(top_t == lab))
    return out


def compare_detections(ref, test, iou_threshold: float = IOU_THRESHOLD) -> dict:
    """Detection lists matched per image and class (:func:`match_detections`), pooled over the
    leading slices of ``ref`` / ``test`` (k x 1 x D x 7, one list per slice; D may differ)."""
    r, t = np.asarray(ref), np.asarray(test)
    if r.ndim == 4 and t.ndim == 4 and r.shape[0] != t.shape[0]:
        return {"kind": DETECTIONS, "error": f"{r.shape[0]} detection lists vs {t.shape[0]}"}
    slices = range(r.shape[0]) if r.ndim == 4 else [None]
    per = [match_detections(r if i is None else r[i:i + 1], t if i is None else t[i:i + 1], iou_threshold)
           for i in slices]
    tot = {k: int(sum(p[k] for p in per)) for k in ("ref", "test", "matched")}
    ious = [(p["mean_iou"], p["matched"]) for p in per if p["mean_iou"] is not None]
    ch = [p["max_score_change"] for p in per if p["max_score_change"] is not None]
    return {"kind": DETECTIONS, "iou_threshold": float(iou_threshold), **tot,
            "recall": tot["matched"] / tot["ref"] if tot["ref"] else 1.0,
            "precision": tot["matched"] / tot["test"] if tot["test"] else 1.0,
            "mean_iou": float(sum(m * k for m, k in ious) / sum(k for _, k in ious)) if ious else None,
            "max_score_change": max(ch) if ch else None}


def compare_arrays(ref, test, labels=None, kind=None) -> dict:
    """One blob of kind ``kind`` (a hint: see :func:`kind_of`); a detections entry when it is one."""
    k, axis = kind_of(ref, test, kind)
    if k == DETECTIONS:
        return compare_detections(ref, test)
    r = np.asarray(ref, dtype=np.float64)
    t = np.asarray(test, dtype=np.float64)
    if r.shape != t.shape:
        return {"kind": k, "shape": list(r.shape), "test_shape": list(t.shape),
                "error": f"shapes differ: {tuple(r.shape)} vs {tuple(t.shape)}"}
    out = {"kind": k, **_tensor_numbers(r, t)}
    if k == CLASS_SCORES and r.size:
        out.update(_class_numbers(r, t, axis, labels))
    return out


def compare_outputs(ref: dict, test: dict, labels=None, blobs=None, kinds=None) -> dict:
    """Compare the blobs of ``ref`` and ``test`` ({name: array}), each by its kind; ``blobs``
    limits the names, ``kinds`` ({name: kind or None}, e.g. :func:`output_kinds`) gives what
    the producers say. The structure returned is the module docstring's (a stable contract)."""
    names = list(blobs) if blobs is not None else list(ref)
    kinds = kinds or {}
    per, dets, missing, found = {}, {}, [], {}
    for name in names:
        if name not in ref or name not in test:
            missing.append(name)
            continue
        entry = compare_arrays(ref[name], test[name], labels, kinds.get(name))
        found[name] = entry["kind"]
        (dets if entry["kind"] == DETECTIONS else per)[name] = entry
    ok = [v for v in per.values() if "error" not in v]
    agree = [v["top1_agreement"] for v in ok if v.get("top1_agreement") is not None]
    recalls = [v["recall"] for v in dets.values() if "error" not in v]
    return {
        "blobs": per,
        "detections": dets,
        "kinds": found,
        "missing": missing,
        "worst_rel_l2": max((v["rel_l2"] for v in ok), default=None),
        "max_abs": max((v["max_abs"] for v in ok), default=None),
        "min_top1_agreement": min(agree) if agree else None,
        "min_recall": min(recalls) if recalls else None,
        "errors": [f"{k}: {v['error']}" for k, v in {**per, **dets}.items() if "error" in v],
    }


def describe(name: str, entry: dict) -> str:
    """One line for a console / report: the numbers that fit the entry's kind."""
    if "error" in entry:
        return f"{name}: {entry['error']}"
    if entry.get("kind") == DETECTIONS:
        s = (f"{name}: detections recall {100 * entry['recall']:.1f}%, precision {100 * entry['precision']:.1f}% "
             f"at IoU {entry['iou_threshold']:g} ({entry['matched']} of {entry['ref']} matched, "
             f"{entry['test']} found)")
        if entry.get("mean_iou") is not None:
            s += f", mean IoU {entry['mean_iou']:.4f}, largest score change {entry['max_score_change']:.3g}"
        return s
    s = f"{name}: rel L2 {entry['rel_l2']:.3g}, max abs {entry['max_abs']:.3g}"
    if entry.get("top1_agreement") is not None:
        s += f", top-1 agreement {100 * entry['top1_agreement']:.2f}%"
        if entry.get("few_samples"):
            s += f" (over only {entry['samples']} samples)"
        if entry.get("top5_agreement") is not None:
            s += f", top-5 {100 * entry['top5_agreement']:.2f}%"
        if entry.get("kl") is not None:
            s += f", KL {entry['kl']:.3g}"
    return s


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


__all__ = ["compare_outputs", "compare_arrays", "compare_detections", "output_kinds", "kind_of", "describe",
           "is_class_output", "class_predictions", "json_safe", "CLASS_SCORES", "DETECTIONS", "TENSOR", "KINDS",
           "FEW_SAMPLES"]
