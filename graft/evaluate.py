"""Evaluation of a trained model on labelled images: the run's held-out test split by
default, or any folder laid out like the training data.

Reports accuracy, loss, per-class precision/recall/F1 and the confusion matrix (as PNG).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, RunFolderError
from .io import atomic_write_json, read_json
from .model import GraftModel


def metrics_from_probs(
    probs: np.ndarray, labels: Sequence[int], classes: Sequence[str]
) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y = np.asarray(labels)
    pred = probs.argmax(1)
    k = len(classes)
    eps = 1e-12
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], eps, 1.0)).mean()) if len(y) else 0.0
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=list(range(k)), zero_division=0)
    return {
        "n": len(y),
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "loss": loss,
        "per_class": {
            c: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i, c in enumerate(classes)
        },
        "macro_f1": float(f[s > 0].mean()) if (s > 0).any() else 0.0,
        "confusion_matrix": confusion_matrix(y, pred, labels=list(range(k))).tolist(),
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
) -> dict[str, Any]:
    """Predict ``paths`` and score them against ``labels``; files that fail are listed."""
    from .plots import plot_confusion_matrix
    from .predict import Predictor

    predictor = Predictor(model, engine=engine, workers=workers, onnx_path=onnx_path)
    probs, failed = predictor.predict_proba(paths)
    keep = [i for i in range(len(paths)) if i not in failed]
    result = metrics_from_probs(probs[keep], [labels[i] for i in keep], classes)
    result["data"] = title
    result["failed"] = [{"path": str(paths[i]), "reason": r} for i, r in sorted(failed.items())]
    if out_dir is not None:
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
    result = evaluate_files(
        model,
        paths,
        labels,
        classes,
        out_dir=out,
        title=title,
        onnx_path=resolve_model_file(run).with_suffix(".onnx"),
    )
    if folder is not None:
        result["failed"] = result_skipped + result["failed"]
        atomic_write_json(out / "evaluation.json", result)
    result["output_dir"] = str(out)
    return result
