"""Pure metrics: numbers from probabilities and labels, with no model code.

Wilson intervals, the calibration error and reliability bins, temperature scaling, the
"unknown" confidence threshold, open-set coverage and the per-class report. numpy, scipy and
scikit-learn only: :mod:`graft.evaluate` builds on these for a model and its files, and the
trainer uses them to calibrate.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, TypedDict

import numpy as np

__all__ = [
    "Metrics",
    "calibration",
    "choose_unknown_threshold",
    "fit_temperature",
    "metrics_from_probs",
    "open_set_stats",
    "wilson",
]


class Metrics(TypedDict):
    """What :func:`metrics_from_probs` returns (and ``evaluation.json`` starts with)."""

    n: int
    accuracy: float
    accuracy_ci95: tuple[float, float]
    loss: float
    per_class: dict[str, dict[str, Any]]
    macro_f1: float
    confusion_matrix: list[list[int]]
    most_confused: list[dict[str, Any]]
    calibration: dict[str, Any]
    classes: list[str]


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (sound at 0%, 100% and small n)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def calibration(probs: np.ndarray, labels: Sequence[int], bins: int = 10) -> dict[str, Any]:
    """Expected calibration error and the reliability-diagram bins (by top probability)."""
    y = np.asarray(labels)
    conf = probs.max(1) if len(y) else np.zeros(0)
    right = (probs.argmax(1) == y) if len(y) else np.zeros(0, dtype=bool)
    edges = np.linspace(0, 1, bins + 1)
    table, ece = [], 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            gap = abs(right[inside].mean() - conf[inside].mean())
            ece += inside.mean() * gap
            table.append(
                {
                    "low": float(lo),
                    "high": float(hi),
                    "n": int(inside.sum()),
                    "confidence": float(conf[inside].mean()),
                    "accuracy": float(right[inside].mean()),
                }
            )
    return {"ece": float(ece), "bins": table}


def fit_temperature(logits: np.ndarray, labels: Sequence[int]) -> float:
    """The temperature that minimises the validation log-loss (1-D, bounded search)."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(labels)
    z = np.asarray(logits, dtype=np.float64)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        s = s - s.max(1, keepdims=True)
        logp = s - np.log(np.exp(s).sum(1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean())

    best = minimize_scalar(nll, bounds=(np.log(0.25), np.log(10.0)), method="bounded")
    return float(np.exp(best.x))


def choose_unknown_threshold(
    probs: np.ndarray, labels: Sequence[int], target_precision: float
) -> float:
    """The lowest confidence threshold at which the answered predictions are right at least
    ``target_precision`` of the time (so as few images as possible are called unknown)."""
    if target_precision <= 0 or not len(labels):
        return 0.0
    y = np.asarray(labels)
    conf = probs.max(1)
    right = probs.argmax(1) == y
    if right.mean() >= target_precision:
        return 0.0
    order = np.argsort(-conf)
    precision = np.cumsum(right[order]) / np.arange(1, len(y) + 1)
    ok = np.nonzero(precision >= target_precision)[0]
    last = 0 if len(ok) == 0 else int(ok.max())  # never reached: only the most confident
    return _below(conf[order[last]], conf[order[last + 1]] if last + 1 < len(y) else 0.0)


#: how far below the last answered validation image the threshold sits: engines differ by
#: about 1e-6 in a probability, and an image exactly on the threshold would then flip
#: between an answer and "unknown" with the engine
THRESHOLD_MARGIN = 1e-4


def _below(value: float, next_lower: float) -> float:
    """A threshold just under ``value``, but above ``next_lower`` (the next validation
    image down, which stays "unknown"): at most halfway between them."""
    return float(value - min(THRESHOLD_MARGIN, (value - next_lower) / 2))


def open_set_stats(
    probs: np.ndarray,
    labels: Sequence[int],
    threshold: float,
    familiarity: np.ndarray | None = None,
    familiarity_threshold: float = -1.0,
) -> dict:
    """How many images are answered (not "unknown", by graft.runtime.is_unknown's rule)
    and how often the answered ones are right."""
    y = np.asarray(labels)
    out: dict[str, Any] = {"threshold": threshold}
    if familiarity is not None:
        out["familiarity_threshold"] = familiarity_threshold
    if not len(y):
        return {**out, "coverage": 0.0, "answered_accuracy": 0.0, "unknown": 0}
    answered = probs.max(1) >= threshold
    if familiarity is not None:
        answered &= np.asarray(familiarity) >= familiarity_threshold
    acc = float((probs.argmax(1) == y)[answered].mean()) if answered.any() else 0.0
    return {
        **out,
        "coverage": float(answered.mean()),
        "answered_accuracy": acc,
        "unknown": int((~answered).sum()),
    }


def confusion_and_scores(
    y: np.ndarray, pred: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The confusion matrix (rows: true class) and per-class precision, recall, F1 and
    support, as scikit-learn's ``confusion_matrix`` and ``precision_recall_fscore_support``
    (``zero_division=0``) give them (tests/test_evaluate_predict.py compares). Computed here
    because importing ``sklearn.metrics`` takes about 1.1 s, a third of a torch-free
    ``graft evaluate``."""
    matrix = np.bincount(y * k + pred, minlength=k * k).reshape(k, k) if k else np.zeros((0, 0))
    tp = np.diag(matrix).astype(float)
    support, predicted = matrix.sum(1), matrix.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros(k), where=total > 0)
    return matrix.astype(np.int64), precision, recall, f1, support.astype(np.int64)


def metrics_from_probs(probs: np.ndarray, labels: Sequence[int], classes: Sequence[str]) -> Metrics:
    y = np.asarray(labels, dtype=np.int64)
    pred = probs.argmax(1) if len(y) else np.zeros(0, dtype=np.int64)
    k = len(classes)
    eps = 1e-12
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], eps, 1.0)).mean()) if len(y) else 0.0
    matrix, p, r, f, s = confusion_and_scores(y, pred, k)
    correct = int((pred == y).sum())
    confused = sorted(
        (
            (int(matrix[i, j]), classes[i], classes[j])
            for i in range(k)
            for j in range(k)
            if i != j and matrix[i, j]
        ),
        reverse=True,
    )
    return {
        "n": len(y),
        "accuracy": correct / len(y) if len(y) else 0.0,
        "accuracy_ci95": wilson(correct, len(y)),
        "loss": loss,
        "per_class": {
            c: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "recall_ci95": wilson(int(matrix[i, i]), int(s[i])),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i, c in enumerate(classes)
        },
        "macro_f1": float(f[s > 0].mean()) if (s > 0).any() else 0.0,
        "confusion_matrix": matrix.tolist(),
        "most_confused": [{"true": t, "predicted": q, "count": n} for n, t, q in confused[:5]],
        "calibration": calibration(probs, y) if len(y) else {"ece": 0.0, "bins": []},
        "classes": list(classes),
    }
