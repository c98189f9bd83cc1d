"""``graft.runtime.rank_classes``: the one place probabilities become an answer (top-k
classes and "unknown") for ``graft predict``, ``graft serve`` and exported models."""

from __future__ import annotations

import numpy as np
import pytest

from graft.runtime import rank_classes

CLASSES = ["cat", "dog", "fox"]


def test_top_classes_best_first() -> None:
    top, unknown = rank_classes(np.array([0.2, 0.7, 0.1], np.float32), CLASSES, 2, 0.5)
    assert [c for c, _ in top] == ["dog", "cat"]
    assert top[0][1] == pytest.approx(0.7) and top[1][1] == pytest.approx(0.2)
    assert all(isinstance(p, float) for _, p in top)
    assert unknown is False


def test_top_k_larger_than_the_classes_gives_every_class() -> None:
    top, _ = rank_classes(np.array([0.2, 0.7, 0.1]), CLASSES, 10, 0.0)
    assert [c for c, _ in top] == ["dog", "cat", "fox"]


def test_top_k_below_one_still_gives_the_best_class() -> None:
    top, _ = rank_classes(np.array([0.2, 0.7, 0.1]), CLASSES, 0, 0.0)
    assert top == [("dog", pytest.approx(0.7))]


def test_ties_keep_the_order_of_the_classes() -> None:
    top, _ = rank_classes(np.array([0.25, 0.375, 0.375]), CLASSES, 3, 0.0)
    assert [c for c, _ in top] == ["dog", "fox", "cat"]
    # many classes (numpy's default sort is not stable beyond small arrays)
    classes = [f"c{i}" for i in range(100)]
    top, _ = rank_classes(np.full(100, 0.01, np.float32), classes, 100, 0.0)
    assert [c for c, _ in top] == classes


def test_threshold_boundary() -> None:
    p = np.array([0.5, 0.25, 0.25])  # exact in binary: no rounding at the boundary
    assert rank_classes(p, CLASSES, 1, 0.5)[1] is False  # equal to the threshold: answered
    assert rank_classes(p, CLASSES, 1, np.nextafter(0.5, 1.0))[1] is True  # above: unknown
    assert rank_classes(p, CLASSES, 1, 0.49)[1] is False


def test_threshold_zero_answers_everything() -> None:
    uniform = np.full(3, 1 / 3, np.float32)
    assert rank_classes(uniform, CLASSES, 3, 0.0)[1] is False
    assert rank_classes(np.zeros(3), CLASSES, 3, 0.0)[1] is False


def test_float32_probabilities_compare_as_python_floats() -> None:
    # the top probability is reported as float(p[j]) and compared unrounded
    p = np.array([0.9, 0.05, 0.05], np.float32)
    top, unknown = rank_classes(p, CLASSES, 1, float(p[0]))
    assert top[0][1] == float(p[0]) and unknown is False


def test_probabilities_must_match_the_classes() -> None:
    with pytest.raises(ValueError, match="2 probabilities for 3 classes"):
        rank_classes(np.array([0.5, 0.5]), CLASSES, 1, 0.0)
