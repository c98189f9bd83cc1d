from __future__ import annotations

from graft.diagnose import diagnose
from graft.rundir import EpochRecord


def hist(rows: list[tuple[float, float, float, float]], stage: str = "frozen") -> list:
    return [
        EpochRecord(stage, i + 1, i + 1, tl, ta, vl, va, 1e-3, 0.1)
        for i, (tl, ta, vl, va) in enumerate(rows)
    ]


def test_good_fit() -> None:
    d = diagnose(
        hist(
            [
                (0.9, 0.6, 0.8, 0.65),
                (0.4, 0.85, 0.42, 0.84),
                (0.3, 0.9, 0.33, 0.88),
                (0.28, 0.91, 0.32, 0.89),
                (0.27, 0.91, 0.325, 0.89),
            ]
        )
    )
    assert d.verdict == "good fit"
    assert "best validation loss" in d.explanation and d.best_step == 4


def test_overfitting_when_val_loss_climbs_while_train_loss_falls() -> None:
    d = diagnose(
        hist(
            [
                (0.9, 0.6, 0.7, 0.7),
                (0.5, 0.8, 0.5, 0.8),
                (0.3, 0.9, 0.45, 0.82),
                (0.1, 0.97, 0.6, 0.8),
                (0.05, 0.99, 0.8, 0.79),
            ]
        )
    )
    assert d.verdict == "overfitting"
    assert d.best_step == 3 and round(d.final_gap, 2) == 0.20


def test_underfitting_when_even_training_accuracy_is_low() -> None:
    d = diagnose(hist([(1.5, 0.3, 1.5, 0.3), (1.3, 0.4, 1.3, 0.41), (1.2, 0.45, 1.25, 0.44)]))
    assert d.verdict == "underfitting"


def test_still_improving_when_the_last_epoch_is_best_and_falling() -> None:
    d = diagnose(hist([(0.9, 0.6, 0.9, 0.6), (0.7, 0.75, 0.7, 0.74), (0.5, 0.85, 0.5, 0.84)]))
    assert d.verdict == "still improving" and d.trend < 0


def test_perfect_validation_at_once_is_flagged_as_suspicious() -> None:
    d = diagnose(hist([(0.5, 0.9, 0.05, 1.0), (0.05, 1.0, 0.02, 1.0), (0.03, 1.0, 0.019, 1.0)]))
    assert any("near-identical images" in n for n in d.notes)
