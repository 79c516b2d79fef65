"""Moment retrieval measures, as the field reports them (QVHighlights / Moment-DETR's evaluation):

* R1@t: the fraction of queries whose top-1 predicted window overlaps a ground-truth window of the query
  with temporal IoU >= t (0.5 and 0.7);
* mAP: per query, the average precision of its (at most 10) predicted windows ranked by score, a
  prediction counting as a true positive when it matches a ground-truth window not matched yet with
  tIoU >= t, for t in 0.5, 0.55, ..., 0.95 (the precision envelope summed over recall steps, as
  ActivityNet's detection AP); averaged over queries, then over the ten thresholds.

A window is ``(video, start, end)``: over a collection of videos, a window in another video than the
query's moment overlaps it nowhere (a false positive).
"""
from __future__ import annotations

import numpy as np

from retrieval.segments import tiou

MAP_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
MAX_PREDICTIONS = 10


def window_iou(a: tuple, b: tuple) -> float:
    """tIoU of two (video, start, end) windows; 0 across videos."""
    return tiou((a[1], a[2]), (b[1], b[2])) if a[0] == b[0] else 0.0


def recall_at_1(predictions: list[list[tuple]], truths: list[list[tuple]], threshold: float) -> float:
    """R1@threshold. ``predictions[q]``: (video, start, end, score) best first; ``truths[q]``: (video, start, end)."""
    hits = [bool(p) and any(window_iou(p[0], g) >= threshold for g in gts) for p, gts in zip(predictions, truths)]
    return float(np.mean(hits)) if hits else 0.0


def interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """Area under the precision envelope (the best precision at this recall or beyond), over recall steps."""
    prec = np.concatenate([[0.0], precision, [0.0]])
    rec = np.concatenate([[0.0], recall, [1.0]])
    for i in range(len(prec) - 2, -1, -1):
        prec[i] = max(prec[i], prec[i + 1])
    steps = np.flatnonzero(rec[1:] != rec[:-1]) + 1
    return float(np.sum((rec[steps] - rec[steps - 1]) * prec[steps]))


def average_precision(predictions: list[tuple], truths: list[tuple], thresholds=MAP_THRESHOLDS) -> np.ndarray:
    """AP of one query at each threshold: ``predictions`` (video, start, end, score), ``truths`` (video,
    start, end). Predictions are ranked by score (stable); each takes the unmatched truth it overlaps most
    when that tIoU reaches the threshold, else it is a false positive."""
    thresholds = np.asarray(thresholds, dtype=float)
    if not truths:
        return np.zeros(len(thresholds))
    ranked = sorted(predictions, key=lambda p: -p[3])
    tp = np.zeros((len(thresholds), len(ranked)))
    for t, threshold in enumerate(thresholds):
        matched = set()
        for i, p in enumerate(ranked):
            overlaps = sorted(((window_iou(p, g), j) for j, g in enumerate(truths)), key=lambda x: -x[0])
            for value, j in overlaps:
                if value < threshold:
                    break
                if j not in matched:
                    matched.add(j)
                    tp[t, i] = 1
                    break
    out = np.zeros(len(thresholds))
    if not ranked:
        return out
    for t in range(len(thresholds)):
        tps = np.cumsum(tp[t])
        fps = np.cumsum(1 - tp[t])
        out[t] = interpolated_ap(tps / (tps + fps), tps / len(truths))
    return out


def moment_metrics(predictions: list[list[tuple]], truths: list[list[tuple]]) -> dict:
    """{"R1@0.5", "R1@0.7", "mAP", "mAP@0.5", "mAP@0.75"} (fractions 0..1) over the queries; each query's
    predictions are cut to its best MAX_PREDICTIONS."""
    per_query = np.stack([average_precision(p[:MAX_PREDICTIONS], g) for p, g in zip(predictions, truths)])
    by_threshold = per_query.mean(axis=0)
    return {"R1@0.5": recall_at_1(predictions, truths, 0.5), "R1@0.7": recall_at_1(predictions, truths, 0.7),
            "mAP": float(by_threshold.mean()), "mAP@0.5": float(by_threshold[0]),
            "mAP@0.75": float(by_threshold[MAP_THRESHOLDS.index(0.75)])}
