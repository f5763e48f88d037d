"""Compare two DetectionOutput results as detections, not as tensors.

A DetectionOutput blob (SSD fork) is 1x1xDx7, rows ``[image, label, score,
xmin, ymin, xmax, ymax]``. Its length and order are data-dependent, so a
relative L2 between two of them means nothing. Instead the new net's rows are
matched to the original's, per image and label:

* the original's detections are taken in descending score order; each one is
  matched to the not-yet-matched new detection of the same image and label
  with the highest IoU, if that IoU is >= ``iou_threshold`` (0.5, as in
  PASCAL VOC); ties go to the higher-scoring new detection;
* recall = matched / original count, precision = matched / new count, the mean
  IoU of the matched pairs and the largest |score change| between them.

Rows that are not detections are dropped first: the fork's placeholder rows
``[i, -1, -1, -1, -1, -1, -1]`` (no detection in image i) and OpenCV's zero
padding (its output is keep_top_k x batch rows; unused ones are all zero).

IoU here is the continuous one (no +1 pixel terms); a box with xmax < xmin or
ymax < ymin has area 0, as in the fork's ``BBoxSize``. Pure numpy.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

IOU_THRESHOLD = 0.5


def looks_like_detections(shape) -> bool:
    """Whether a blob of this shape can be a DetectionOutput result (1 x 1 x D x 7)."""
    shape = tuple(int(d) for d in shape) if shape is not None else ()
    return len(shape) == 4 and shape[:2] == (1, 1) and shape[3] == 7


def detection_rows(arr) -> np.ndarray:
    """The real detections of a DetectionOutput blob, as a (D, 7) float64 array."""
    rows = np.asarray(arr, dtype=np.float64)
    if rows.size % 7:
        raise ValueError(f"a DetectionOutput blob has 7 values per row, got shape {rows.shape}")
    rows = rows.reshape(-1, 7)
    placeholder = rows[:, 1] < 0  # the fork's "no detection in this image" row
    padding = ~rows.any(axis=1)  # OpenCV's unused rows
    return rows[~placeholder & ~padding]


def box_iou(a, b) -> np.ndarray:
    """IoU matrix of boxes a (n, 4) and b (m, 4), [xmin, ymin, xmax, ymax]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)

    def area(x):
        return np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)

    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = area(a)[:, None] + area(b)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _match_group(ref, test, iou_threshold):
    """Greedy matches [(ref row, test row, iou)] within one image and label."""
    if not len(ref) or not len(test):
        return []
    ious = box_iou(ref[:, 3:], test[:, 3:])
    test_order = np.argsort(-test[:, 2], kind="stable")
    taken = np.zeros(len(test), dtype=bool)
    pairs = []
    for i in np.argsort(-ref[:, 2], kind="stable"):
        best, best_iou = -1, iou_threshold
        for j in test_order:  # by score, so a tie in IoU goes to the higher score
            if not taken[j] and ious[i, j] >= best_iou and (best < 0 or ious[i, j] > best_iou):
                best, best_iou = j, ious[i, j]
        if best >= 0:
            taken[best] = True
            pairs.append((i, best, float(ious[i, best])))
    return pairs


def match_detections(ref, test, iou_threshold: float = IOU_THRESHOLD) -> dict:
    """Match ``test`` (the new net's DetectionOutput) against ``ref`` (the original's).

    Returns counts (``ref``, ``test``, ``matched``), ``recall``, ``precision``
    (1.0 when there is nothing to find / nothing found), ``mean_iou`` and
    ``max_score_change`` over the matched pairs (None without a match), and
    ``per_label`` {label: {ref, test, matched}}.
    """
    r, t = detection_rows(ref), detection_rows(test)
    groups = defaultdict(lambda: ([], []))
    for row in r:
        groups[(int(row[0]), int(row[1]))][0].append(row)
    for row in t:
        groups[(int(row[0]), int(row[1]))][1].append(row)
    ious, changes = [], []
    per_label: dict = {}
    for (image, label), (gr, gt) in sorted(groups.items()):
        gr, gt = np.asarray(gr).reshape(-1, 7), np.asarray(gt).reshape(-1, 7)
        pairs = _match_group(gr, gt, iou_threshold)
        for i, j, iou in pairs:
            ious.append(iou)
            changes.append(abs(float(gr[i, 2]) - float(gt[j, 2])))
        c = per_label.setdefault(label, {"ref": 0, "test": 0, "matched": 0})
        c["ref"] += len(gr)
        c["test"] += len(gt)
        c["matched"] += len(pairs)
    matched = len(ious)
    return {
        "iou_threshold": float(iou_threshold),
        "ref": int(len(r)), "test": int(len(t)), "matched": matched,
        "recall": matched / len(r) if len(r) else 1.0,
        "precision": matched / len(t) if len(t) else 1.0,
        "mean_iou": float(np.mean(ious)) if ious else None,
        "max_score_change": float(max(changes)) if changes else None,
        "per_label": per_label,
    }


__all__ = ["IOU_THRESHOLD", "box_iou", "detection_rows", "looks_like_detections", "match_detections"]
