"""Figures of a run: class counts, learning curves, confusion matrix, prediction grid,
reliability, top losses and the open-set histogram (in-class vs --others scores).

Plotting reads plain records and arrays; it never needs torch. Every figure is written
atomically as PNG.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from .io import atomic_save

STAGE_COLOURS = {"frozen": "#e8f0fe", "fine-tune": "#fef3e2"}


@contextlib.contextmanager
def _quiet_glyphs() -> Iterator[None]:
    """Class and file names in scripts the font lacks (CJK, emoji) are drawn as boxes;
    matplotlib's warning for each missing glyph would reach the user's terminal as a raw
    Python warning. Silenced where graft's figures are drawn (laid out, saved) only, not
    in the process (a notebook's own plots keep theirs)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        yield


def subplots(*grid: int, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    """``pyplot.subplots`` without pyplot: a Figure of its own, drawn by Agg when saved.
    pyplot would choose, or switch, the process's backend (in a notebook, the user's own
    plots would stop showing) and keep every figure until closed."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kwargs)


def clipped(text: str, width: int, keep_end: bool = False) -> str:
    """``text`` cut to ``width`` characters with an ellipsis where it was cut (a file name's
    start, or a path's end with ``keep_end``)."""
    if len(text) <= width:
        return text
    return "…" + text[1 - width :] if keep_end else text[: width - 1] + "…"


def tight_layout(fig: Any) -> None:
    with _quiet_glyphs():
        fig.tight_layout()


def save_figure(fig: Any, path: Path) -> None:
    with _quiet_glyphs():
        atomic_save(
            Path(path),
            lambda tmp: fig.savefig(
                tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": "graft"}
            ),
        )


def plot_class_counts(counts: dict[str, int], path: Path) -> None:
    """Horizontal bars: class names stay readable however many or long they are."""
    names, values = list(counts)[::-1], list(counts.values())[::-1]
    fig, ax = subplots(figsize=(7.0, max(2.4, 0.38 * len(names) + 1.2)))
    bars = ax.barh(names, values, color="#4c72b0")
    ax.bar_label(bars, padding=3, fontsize=9)
    ax.set_xlabel("images")
    ax.set_title(f"Images per class ({sum(values)} in {len(names)} classes)")
    ax.set_xlim(0, max(values) * 1.12 + 1)
    ax.spines[["top", "right"]].set_visible(False)
    save_figure(fig, path)


def by_stage(history: Sequence[Any], field: str) -> tuple[list[float], list[float]]:
    """Steps and values of ``field`` with a gap (NaN) where the stage changes, so a plotted
    line breaks between stages."""
    xs: list[float] = []
    ys: list[float] = []
    for i, r in enumerate(history):
        if i and r.stage != history[i - 1].stage:
            xs.append(r.step - 0.5)
            ys.append(math.nan)
        xs.append(r.step)
        ys.append(getattr(r, field, math.nan))
    return xs, ys


def x_label(history: Sequence[Any]) -> str:
    """What a step of the curves is: a probe's L2 points (graft.probe), epochs, or both."""
    probed = any(math.isfinite(getattr(r, "l2", math.nan)) for r in history)
    epochs = any(not math.isfinite(getattr(r, "l2", math.nan)) for r in history)
    if probed:
        return "step: L2 path points, then epochs" if epochs else "step: L2 path points"
    stages = {r.stage for r in history}
    return "epoch (both stages)" if len(stages) > 1 else "epoch"


def plot_learning_curves(
    history: Sequence[Any], path: Path, best_step: int | None = None, title: str = "Learning curves"
) -> None:
    """Accuracy and loss, train vs validation, both stages on one epoch axis."""
    steps = [r.step for r in history]
    fig, axes = subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "acc", "accuracy"), (axes[1], "loss", "loss")):
        # shade each stage and mark the boundary
        for stage, colour in STAGE_COLOURS.items():
            s = [r.step for r in history if r.stage == stage]
            if s:
                # a probe's rows are points of its L2 path (graft.probe), not epochs
                rows = [r for r in history if r.stage == stage]
                probe = any(math.isfinite(getattr(r, "l2", math.nan)) for r in rows)
                ax.axvspan(min(s) - 0.5, max(s) + 0.5, color=colour, zorder=0)
                ax.text(
                    (min(s) + max(s)) / 2,
                    1.01,
                    f"{stage}: L2 path, strong to weak" if probe else stage,
                    transform=ax.get_xaxis_transform(),
                    ha="center",
                    va="bottom",
                    fontsize=9,
                    color="#555",
                )
        boundary = [r.step for r in history if r.stage == "fine-tune"]
        if boundary and boundary[0] > 1:
            ax.axvline(boundary[0] - 0.5, color="#888", ls="--", lw=1)
        # Each stage's line stands alone: a probe's last L2 point and the first fine-tuning
        # epoch are different kinds of step, and a segment between them would read as a trend.
        ax.plot(
            *by_stage(history, f"train_{key}"),
            "o-",
            ms=3,
            label=f"train {label}",
            color="#4c72b0",
        )
        ax.plot(
            *by_stage(history, f"val_{key}"),
            "s-",
            ms=3,
            label=f"validation {label}",
            color="#dd8452",
        )
        unseen = [getattr(r, f"unseen_{key}", float("nan")) for r in history]
        if any(np.isfinite(unseen)):
            ax.plot(
                *by_stage(history, f"unseen_{key}"),
                "^--",
                ms=4,
                label=f"images from elsewhere {label}",
                color="#8e44ad",
            )
        if best_step:
            ax.axvline(best_step, color="#2a9d4b", lw=1.2, alpha=0.8, label="best (kept)")
        ax.set_xlabel(x_label(history))
        if not ax.get_ylabel():
            ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        if key == "loss":
            losses = [
                getattr(r, f"{p}_loss", float("nan"))
                for r in history
                for p in ("train", "val", "unseen")
            ]
            losses = [v for v in losses if np.isfinite(v)]
            positive = [v for v in losses if v > 0]
            # Losses spanning orders of magnitude flatten to a line at 0 on a linear axis.
            if positive and max(positive) / min(positive) > 50:
                ax.set_yscale("log")
                ax.set_ylabel("loss (log scale)")
        if key == "acc":
            ax.set_ylim(-0.02, 1.02)
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.legend(loc="best", fontsize=8)
        if steps:
            ax.set_xlim(0.5, max(steps) + 0.5)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(title, y=1.04)
    save_figure(fig, path)


def plot_confusion_matrix(
    matrix: np.ndarray, classes: Sequence[str], path: Path, title: str = "Confusion matrix"
) -> None:
    n = len(classes)
    size = max(4.5, 0.6 * n + 2.5)
    fig, ax = subplots(figsize=(size, size * 0.9))
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros_like(matrix, dtype=float), where=totals > 0)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=40, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        str(int(matrix[i, j])),
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
    ax.set_title(title)
    save_figure(fig, path)


def plot_prediction_grid(
    items: Sequence[tuple[Any, str, str, bool | None]], path: Path, cols: int = 5
) -> None:
    """Images with their file name and predicted class, like the seed's figure of unseen
    images. ``items``: (PIL image, line 1, line 2, correct?) — the title is green when the
    prediction matches the image's folder name, red when it does not, black when unknown."""
    n = len(items)
    cols = min(cols, max(1, n))
    rows = (n + cols - 1) // cols
    fig, axes = subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    colours = {True: "#1a7f37", False: "#cf222e", None: "black"}
    for ax, (image, line1, line2, correct) in zip(axes.flat, items, strict=False):
        ax.imshow(image)
        ax.set_title(f"{line1}\n{line2}", fontsize=9, color=colours[correct])
    tight_layout(fig)
    save_figure(fig, path)


def plot_reliability(calib: dict, path: Path, title: str = "Calibration") -> None:
    """Reliability diagram: how often predictions of each confidence were right."""
    fig, ax = subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], "--", color="#888", lw=1, label="perfectly calibrated")
    bins = calib.get("bins", [])
    if bins:
        centres = [(b["low"] + b["high"]) / 2 for b in bins]
        ax.bar(
            centres,
            [b["accuracy"] for b in bins],
            width=0.09,
            color="#4c72b0",
            alpha=0.8,
            label="accuracy in bin",
        )
        ax.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            "o",
            color="#dd8452",
            ms=4,
            label="mean confidence",
        )
        for c, b in zip(centres, bins, strict=True):
            ax.text(
                c,
                min(1.0, b["accuracy"]) + 0.02,
                str(b["n"]),
                ha="center",
                fontsize=7,
                color="#555",
            )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("predicted probability of the top class")
    ax.set_ylabel("fraction correct")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    save_figure(fig, path)


def plot_top_losses(items: Sequence[dict], path: Path, cols: int = 4) -> None:
    """The most confidently wrong images, with predicted / true class and probability."""
    from .data import load_image
    from .io import display

    if not items:
        fig, ax = subplots(figsize=(5, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, "No wrong predictions.", ha="center", va="center")
        save_figure(fig, path)
        return
    n = len(items)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = subplots(rows, cols, figsize=(2.7 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items, strict=False):
        try:
            ax.imshow(load_image(item["path"], 256))
        except Exception:  # the file changed since evaluation: show the text only
            pass
        ax.set_title(
            f"{clipped(display(Path(item['path']).name), 24)}\npredicted {item['predicted']} "
            f"{item['probability']:.0%}\ntrue {item['true']}",
            fontsize=8,
            color="#cf222e",
        )
    fig.suptitle("Most confidently wrong", fontsize=11)
    tight_layout(fig)
    save_figure(fig, path)


def plot_familiarity(inside: np.ndarray, outside: np.ndarray, stats: dict, path: Path) -> None:
    """The score of in-class images against that of ``--others`` images (images of none of
    the classes), each side normalised to its own count so that a few hundred others and a
    dozen test images are both readable, with the threshold that answers "unknown"."""
    inside, outside = np.asarray(inside, float), np.asarray(outside, float)
    both = np.r_[inside, outside]
    threshold = float(stats["threshold"])
    lo, hi = float(min(both.min(), threshold)), float(max(both.max(), threshold))
    pad = 0.02 * (hi - lo or 1.0)
    edges = np.linspace(lo - pad, hi + pad, 31)
    fig, ax = subplots(figsize=(7.0, 4.2))
    for values, colour, label in (
        (inside, "#4c72b0", f"in-class ({len(inside)} images)"),
        (outside, "#dd8452", f"others ({len(outside)} images)"),
    ):
        # weights: each side sums to 1, so the bars are shares of that side's images
        ax.hist(
            values,
            bins=edges,
            weights=np.full(len(values), 1 / max(1, len(values))),
            color=colour,
            alpha=0.55,
            edgecolor=colour,
            label=label,
        )
    ax.axvline(threshold, color="#cf222e", lw=1.6, ls="--")
    ax.text(
        threshold,
        0.98,
        f" threshold {threshold:.3f}\n below: 'unknown'"
        if threshold > (-1.0 if stats["score"] == "familiarity" else 0.0)
        else f" threshold {threshold:.3f}:\n never 'unknown'",
        transform=ax.get_xaxis_transform(),
        ha="left" if threshold < (lo + hi) / 2 else "right",
        va="top",
        fontsize=8,
        color="#cf222e",
    )
    ax.set_xlabel(
        "familiarity (similarity to the nearest training images)"
        if stats["score"] == "familiarity"
        else "top class probability (the model has no familiarity score)"
    )
    ax.set_ylabel("share of each side's images")
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
    auroc = stats.get("auroc")
    ax.set_title(
        (f"AUROC {auroc:.3f} · " if auroc is not None else "")
        + f"others answered 'unknown' {stats['others_rejected']:.0%} · "
        f"in-class answered {stats['in_class_answered']:.0%}",
        fontsize=10,
    )
    fig.suptitle("'Unknown': in-class images vs images of none of the classes", fontsize=11)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.2)  # headroom: the legend never covers a bar
    ax.legend(loc="best", fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    save_figure(fig, path)
