"""A plain-language reading of the learning curves, with the numbers behind it.

The seed judged "good fit" by eye. graft reads the same curves by rule:

- **underfitting**: even on training images the model is weak (train accuracy < 80%), and
  validation is no better;
- **overfitting**: validation loss has risen well above its best (> 10%) while training loss
  kept falling, or training accuracy beats validation by more than 10 points;
- **still improving**: the best validation loss came in the last epoch of the run and was
  still falling (by more than 2% and 0.01 over the last 3 epochs), so more epochs would
  likely help;
- **good fit**: none of the above.
- **inconclusive**: validation accuracy is far above training accuracy (> 15 points), or
  there are fewer than 10 validation images: the curves cannot be read, whatever they show.

It also flags numbers too good to trust (100% validation accuracy early on usually means
near-duplicate images on both sides of the split).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Diagnosis:
    # "good fit" | "overfitting" | "underfitting" | "still improving" | "inconclusive"
    verdict: str
    explanation: str
    final_gap: float  # train acc - val acc at the last epoch
    best_step: int
    best_val_loss: float
    trend: float  # relative change of val loss over the last 3 epochs (negative = falling)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _where(best: Any, history: Sequence[Any]) -> str:
    """Which point of the history ``best`` is, in the words of its stage: a linear probe's
    kept strength or the stage's own epoch (the run's step counts across stages)."""
    l2 = getattr(best, "l2", math.nan)
    if math.isfinite(l2):
        return f"the linear probe's kept point (L2 {l2:g})"
    stage = getattr(best, "stage", None)
    if stage is None:
        return f"epoch {best.step} of {len(history)}"
    n = sum(1 for r in history if getattr(r, "stage", None) == stage)
    return f"{stage} epoch {best.epoch} of {n}"


#: fewer validation images than this and no verdict is given
MIN_VAL_IMAGES = 10


def diagnose(history: Sequence[Any], grouped: bool = False, n_val: int | None = None) -> Diagnosis:
    """The verdict on ``history`` (EpochRecords); ``n_val`` is the number of validation
    images, when known (too few and the verdict is "inconclusive")."""
    if not history:
        return Diagnosis("no data", "No epochs were run.", 0.0, 0, float("nan"), 0.0)
    last = history[-1]
    val_losses = [r.val_loss for r in history]
    best_i = min(range(len(history)), key=val_losses.__getitem__)
    best = history[best_i]
    gap = last.train_acc - last.val_acc
    window = val_losses[-3:]
    trend = (window[-1] - window[0]) / max(abs(window[0]), 1e-8) if len(window) > 1 else 0.0
    rise = (last.val_loss - best.val_loss) / max(best.val_loss, 1e-8)
    train_falling = len(history) > 1 and history[-1].train_loss < history[best_i].train_loss
    numbers = (
        f"final train accuracy {last.train_acc:.1%}, validation {last.val_acc:.1%} "
        f"(gap {gap * 100:+.1f} points); best validation loss {best.val_loss:.3g} at "
        f"{_where(best, history)}; validation loss over the last epochs "
        f"{trend * 100:+.1f}%"
    )

    if n_val is not None and n_val < MIN_VAL_IMAGES:
        verdict = "inconclusive"
        explanation = (
            f"only {n_val} validation image(s): too few for the curves to say whether the "
            "model fits; add images (20 or more per class) before trusting any verdict; "
            + numbers
            + "."
        )
    elif gap < -0.15:
        verdict = "inconclusive"
        explanation = (
            "validation accuracy is far above training accuracy, which the curves cannot "
            "explain as fit: usually too few validation images, or training images made much "
            "harder by augmentation, dropout or a class-weighted loss; " + numbers + "."
        )
    elif last.train_acc < 0.8 and last.val_acc <= last.train_acc + 0.05:
        verdict = "underfitting"
        explanation = (
            "the model does not fit even its training images well: train longer, "
            "use a higher learning rate, a bigger head, or unfreeze more blocks; " + numbers + "."
        )
    elif (rise > 0.10 and train_falling and best_i < len(history) - 1) or gap > 0.10:
        verdict = "overfitting"
        explanation = (
            "the model is learning its training images rather than the classes; "
            "the best epoch is kept, but more data, stronger augmentation or fewer "
            "epochs would help; " + numbers + "."
        )
    elif best_i == len(history) - 1 and trend < -0.02 and window[0] - window[-1] > 0.01:
        verdict = "still improving"
        explanation = (
            "validation loss was still falling when training stopped: more epochs "
            "would likely help; " + numbers + "."
        )
    else:
        verdict = "good fit"
        explanation = (
            "training and validation agree and validation loss has levelled off; " + numbers + "."
        )

    notes = []
    early_perfect = [r for r in history[:2] if r.val_acc >= 0.999]
    if early_perfect and grouped:
        notes.append(
            "Validation accuracy reached 100% within the first two epochs although related "
            "images were kept on one side of the split: the classes are easy to tell apart in "
            "this data. Whether that holds for pictures from another source only such "
            "pictures can tell (--unseen DIR)."
        )
    elif early_perfect:
        notes.append(
            "Validation accuracy reached 100% within the first two epochs. That is rare for a "
            "real task and usually means near-identical images (e.g. video or animation frames) "
            "are on both sides of the split, so the validation score overstates how well the "
            "model works on new images."
        )
    return Diagnosis(verdict, explanation, gap, best.step, best.val_loss, trend, notes)
