"""Evaluation of a trained model on labelled images: the run's held-out test split by
default, or any folder laid out like the training data.

Reports accuracy, loss, per-class precision/recall/F1 and the confusion matrix (as PNG).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, RunFolderError
from .io import atomic_write_json, read_json
from .model import GraftModel


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
    if len(ok) == 0:  # never reached: answer only the single most confident band
        return float(conf[order[0]])
    return float(conf[order[ok.max()]])


def open_set_stats(probs: np.ndarray, labels: Sequence[int], threshold: float) -> dict:
    y = np.asarray(labels)
    if not len(y):
        return {"threshold": threshold, "coverage": 0.0, "answered_accuracy": 0.0}
    answered = probs.max(1) >= threshold
    acc = float((probs.argmax(1) == y)[answered].mean()) if answered.any() else 0.0
    return {
        "threshold": threshold,
        "coverage": float(answered.mean()),
        "answered_accuracy": acc,
        "unknown": int((~answered).sum()),
    }


def metrics_from_probs(
    probs: np.ndarray, labels: Sequence[int], classes: Sequence[str]
) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y = np.asarray(labels)
    pred = probs.argmax(1) if len(y) else np.zeros(0, dtype=int)
    k = len(classes)
    eps = 1e-12
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], eps, 1.0)).mean()) if len(y) else 0.0
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=list(range(k)), zero_division=0)
    matrix = confusion_matrix(y, pred, labels=list(range(k)))
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


def evaluate_files(
    model: GraftModel,
    paths: Sequence[Path],
    labels: Sequence[int],
    classes: Sequence[str],
    out_dir: Path | None = None,
    engine: Any = None,
    workers: int = 0,
    title: str = "",
    onnx_path: Path | None = None,
    tta: bool = False,
) -> dict[str, Any]:
    """Predict ``paths`` and score them against ``labels``; files that fail are listed."""
    from .plots import plot_confusion_matrix
    from .predict import Predictor

    predictor = Predictor(model, engine=engine, workers=workers, onnx_path=onnx_path, tta=tta)
    probs, failed = predictor.predict_proba(paths)
    keep = [i for i in range(len(paths)) if i not in failed]
    result = metrics_from_probs(probs[keep], [labels[i] for i in keep], classes)
    result["data"] = title
    result["temperature"] = model.info.temperature
    result["open_set"] = open_set_stats(
        probs[keep], [labels[i] for i in keep], model.info.unknown_threshold
    )
    result["failed"] = [{"path": str(paths[i]), "reason": r} for i, r in sorted(failed.items())]
    # The most confidently wrong images: where to look for label errors and hard cases.
    wrong = [i for i in keep if probs[i].argmax() != labels[i]]
    wrong.sort(key=lambda i: -float(probs[i].max()))
    result["top_losses"] = [
        {
            "path": str(paths[i]),
            "true": classes[labels[i]],
            "predicted": classes[int(probs[i].argmax())],
            "probability": float(probs[i].max()),
            "probability_of_true": float(probs[i][labels[i]]),
        }
        for i in wrong[:12]
    ]
    if out_dir is not None:
        from .plots import plot_reliability, plot_top_losses

        plot_reliability(
            result["calibration"],
            Path(out_dir) / "reliability.png",
            title=f"Calibration: {title} (ECE {result['calibration']['ece']:.3f})",
        )
        plot_top_losses(result["top_losses"], Path(out_dir) / "top_losses.png")
        plot_confusion_matrix(
            np.asarray(result["confusion_matrix"]),
            classes,
            Path(out_dir) / "confusion_matrix.png",
            title=f"Confusion matrix: {title} ({result['n']} images, "
            f"accuracy {result['accuracy']:.1%})",
        )
        atomic_write_json(Path(out_dir) / "evaluation.json", result)
    return result


def evaluate_run(
    run: str | Path,
    folder: str | Path | None = None,
    out_dir: str | Path | None = None,
    reporter: Any = None,
    tta: bool = False,
) -> dict[str, Any]:
    """Evaluate a run on its held-out test split, or on a labelled ``folder``."""
    from .data import read_split, scan
    from .model import load_model, resolve_model_file

    run = Path(run)
    model = load_model(run)
    classes = list(model.info.classes)
    if folder is None:
        split = run / "split.csv"
        config = run / "config.json"
        if not split.is_file() or not config.is_file():
            raise RunFolderError(
                f"{run} has no split.csv/config.json; pass a FOLDER to evaluate on."
            )
        root = Path(read_json(config)["data_root"])
        paths, labels, subsets = read_split(split, root, classes)
        test = [i for i, s in enumerate(subsets) if s == "test"]
        paths, labels = [paths[i] for i in test], [labels[i] for i in test]
        title = "held-out test split"
        out = Path(out_dir) if out_dir else run
    else:
        data = scan(folder, classes=classes, progress=reporter.iter if reporter else None)
        if not data.paths:
            raise DataError(f"No usable images in {folder}.")
        paths, labels = data.paths, data.labels
        title = f"folder {Path(folder).name}"
        out = Path(out_dir) if out_dir else run / f"eval-{Path(folder).resolve().name}"
        result_skipped = [{"path": str(p), "reason": r} for p, r in data.skipped]
    onnx = resolve_model_file(run).with_suffix(".onnx")
    plain = None
    if tta:  # the same images without TTA, to report what TTA changed
        plain = evaluate_files(model, paths, labels, classes, onnx_path=onnx)
    result = evaluate_files(
        model, paths, labels, classes, out_dir=out, title=title, onnx_path=onnx, tta=tta
    )
    result["tta"] = tta
    if plain is not None:
        result["tta_effect"] = {
            "accuracy_without": plain["accuracy"],
            "accuracy_with": result["accuracy"],
            "loss_without": plain["loss"],
            "loss_with": result["loss"],
            "ece_without": plain["calibration"]["ece"],
            "ece_with": result["calibration"]["ece"],
        }
        atomic_write_json(out / "evaluation.json", result)
    if folder is not None:
        result["failed"] = result_skipped + result["failed"]
        atomic_write_json(out / "evaluation.json", result)
    result["output_dir"] = str(out)
    return result
