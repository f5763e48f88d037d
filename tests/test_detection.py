"""Detection matching (engines/detection.py) on hand-made boxes, expected values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from lrprune_caffe.engines.detection import box_iou, detection_rows, looks_like_detections, match_detections


def rows(*dets):
    """A 1x1xDx7 blob from (image, label, score, xmin, ymin, xmax, ymax) tuples."""
    return np.asarray(dets, np.float32).reshape(1, 1, -1, 7)


def test_box_iou_by_hand():
    a = [[0, 0, 10, 10]]
    b = [[0, 0, 10, 5],     # inside: 50 / 100
         [5, 0, 15, 10],    # half over: 50 / 150
         [10, 0, 20, 10],   # touching: 0
         [6, 0, 4, 10]]     # inverted: area 0
    np.testing.assert_allclose(box_iou(a, b), [[0.5, 1 / 3, 0.0, 0.0]])


def test_identical_detections():
    d = rows((0, 1, 0.9, 0, 0, 10, 10), (0, 2, 0.8, 20, 20, 30, 30), (1, 1, 0.7, 5, 5, 9, 9))
    m = match_detections(d, d.copy())
    assert (m["ref"], m["test"], m["matched"]) == (3, 3, 3)
    assert m["recall"] == m["precision"] == 1.0
    assert m["mean_iou"] == pytest.approx(1.0)
    assert m["max_score_change"] == 0.0


def test_partial_match_counts():
    """A vs A' at IoU exactly 0.5 (matched, >=), B vs B' at 1/3 (not), C an extra of label 2."""
    ref = rows((0, 1, 0.9, 0, 0, 10, 10), (0, 1, 0.8, 20, 20, 30, 30))
    test = rows((0, 1, 0.85, 0, 0, 10, 5), (0, 1, 0.8, 25, 20, 35, 30), (0, 2, 0.6, 50, 50, 60, 60))
    m = match_detections(ref, test)
    assert (m["ref"], m["test"], m["matched"]) == (2, 3, 1)
    assert m["recall"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["mean_iou"] == pytest.approx(0.5)
    assert m["max_score_change"] == pytest.approx(0.05, abs=1e-6)
    assert m["per_label"] == {1: {"ref": 2, "test": 2, "matched": 1}, 2: {"ref": 0, "test": 1, "matched": 0}}


def test_label_and_image_must_agree():
    box = (0, 0, 10, 10)
    ref = rows((0, 1, 0.9, *box))
    assert match_detections(ref, rows((0, 2, 0.9, *box)))["matched"] == 0
    assert match_detections(ref, rows((1, 1, 0.9, *box)))["matched"] == 0


def test_greedy_by_reference_score():
    """R1 (0.9) takes T1 (IoU 0.9 against 0.75 for T2); R2 (0.5) then takes T2 (IoU 0.9375)."""
    ref = rows((0, 1, 0.9, 0, 0, 10, 10), (0, 1, 0.5, 0, 0, 10, 8))
    test = rows((0, 1, 0.6, 0, 0, 10, 9), (0, 1, 0.4, 0, 0, 10, 7.5))
    m = match_detections(ref, test)
    assert m["matched"] == 2
    assert m["mean_iou"] == pytest.approx((0.9 + 0.9375) / 2)
    assert m["max_score_change"] == pytest.approx(0.3, abs=1e-6)  # 0.9 -> 0.6


def test_iou_tie_goes_to_the_higher_score():
    """T1 and T2 both overlap R at IoU 0.6; the higher-scoring T2 is matched."""
    ref = rows((0, 1, 0.8, 0, 0, 10, 10))
    test = rows((0, 1, 0.3, 0, 0, 10, 6), (0, 1, 0.7, 0, 4, 10, 10))
    m = match_detections(ref, test)
    assert m["matched"] == 1
    assert m["max_score_change"] == pytest.approx(0.1, abs=1e-6)


def test_threshold_is_a_parameter():
    ref = rows((0, 1, 0.9, 0, 0, 10, 10))
    test = rows((0, 1, 0.9, 5, 0, 15, 10))  # IoU 1/3
    assert match_detections(ref, test)["matched"] == 0
    assert match_detections(ref, test, iou_threshold=0.3)["matched"] == 1


def test_placeholders_and_padding_are_not_detections():
    """The fork's no-detection rows and OpenCV's zero rows count as nothing."""
    fork_empty = rows((0, -1, -1, -1, -1, -1, -1), (1, -1, -1, -1, -1, -1, -1))
    opencv_empty = np.zeros((1, 1, 20, 7), np.float32)
    assert detection_rows(fork_empty).shape == (0, 7)
    m = match_detections(fork_empty, opencv_empty)
    assert (m["ref"], m["test"], m["matched"]) == (0, 0, 0)
    assert m["recall"] == m["precision"] == 1.0
    assert m["mean_iou"] is None and m["max_score_change"] is None
    padded = np.concatenate([rows((0, 1, 0.9, 0, 0, 10, 10)), np.zeros((1, 1, 3, 7), np.float32)], axis=2)
    m = match_detections(rows((0, 1, 0.9, 0, 0, 10, 10)), padded)
    assert (m["test"], m["matched"], m["precision"]) == (1, 1, 1.0)


def test_everything_missed():
    m = match_detections(rows((0, 1, 0.9, 0, 0, 10, 10)), np.zeros((1, 1, 5, 7), np.float32))
    assert (m["recall"], m["precision"], m["mean_iou"]) == (0.0, 1.0, None)


def test_looks_like_detections():
    assert looks_like_detections((1, 1, 50, 7))
    assert looks_like_detections((1, 1, 0, 7))
    assert not looks_like_detections((2, 7))
    assert not looks_like_detections((1, 10))
    assert not looks_like_detections(None)
    with pytest.raises(ValueError):
        detection_rows(np.zeros(8))
