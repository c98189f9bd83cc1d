"""Evaluation of a trained model on labelled images: the run's held-out test split by
default, or any folder laid out like the training data.

Reports accuracy, loss, per-class precision/recall/F1 and the confusion matrix (as PNG).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, RunFolderError, UsageError
from .io import atomic_write_json, check_output_folder
from .metrics import Metrics, metrics_from_probs, open_set_stats
from .model import GraftModel
from .rundir import EVALUATION, RunDir


class Evaluation(Metrics, total=False):
    """``evaluation.json``: the metrics plus what was evaluated and how."""

    data: str  # what was evaluated ("held-out test split", "folder NAME")
    temperature: float
    open_set: dict[str, Any]
    failed: list[dict[str, str]]  # files that could not be read, with the reason
    top_losses: list[dict[str, Any]]  # the most confidently wrong images
    tta: bool
    tta_effect: dict[str, float]
    output_dir: str


def evaluate_files(
    model: GraftModel,
    paths: Sequence[Path],
    labels: Sequence[int],
    classes: Sequence[str],
    out_dir: Path | None = None,
    device: Any = None,
    workers: int = 0,
    title: str = "",
    onnx_path: Path | None = None,
    tta: bool = False,
) -> Evaluation:
    """Predict ``paths`` and score them against ``labels``; files that fail are listed."""
    from .plots import plot_confusion_matrix
    from .predict import Predictor

    predictor = Predictor(model, device=device, workers=workers, onnx_path=onnx_path, tta=tta)
    probs, failed = predictor.predict_proba(paths)
    keep = [i for i in range(len(paths)) if i not in failed]
    result: Evaluation = metrics_from_probs(  # type: ignore[assignment]
        probs[keep], [labels[i] for i in keep], classes
    )
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
        atomic_write_json(Path(out_dir) / EVALUATION, result)
    return result


def evaluate_run(
    run: str | Path,
    folder: str | Path | None = None,
    out_dir: str | Path | None = None,
    reporter: Any = None,
    tta: bool = False,
    data_root: str | Path | None = None,
) -> Evaluation:
    """Evaluate a run on its held-out test split, or on a labelled ``folder``.

    The test split is read from split.csv and checked before anything is written: the file
    whole, its images present (under ``data_root`` when the data folder moved) and
    unchanged (graft.integrity)."""
    from .data import scan
    from .model import load_model, resolve_model_file
    from .predict import fresh_onnx_path

    run = Path(run)
    if folder is not None and data_root is not None:
        raise UsageError(
            "--data-root says where the run's held-out split is now; with a FOLDER to "
            "evaluate on it has no use. Give one or the other."
        )
    model = load_model(run)
    classes = list(model.info.classes)
    if folder is None:
        paths, labels = _test_split(run, classes, data_root)
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
    if out != run and out.exists() and out.name not in (RunDir(run).owned() or []):
        check_output_folder(out, "the evaluation folder")  # new, empty or an evaluation
    # an eval-* folder graft writes in the run is graft's: --force replaces it, the report
    # shows it (one holding the user's other files was refused just above)
    claim = out.parent.resolve() == run.resolve() and out != run
    onnx = fresh_onnx_path(resolve_model_file(run))
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
        atomic_write_json(out / EVALUATION, result)
    if folder is not None:
        result["failed"] = result_skipped + result["failed"]
        atomic_write_json(out / EVALUATION, result)
    if claim:
        RunDir(run).claim([out.name])
    result["output_dir"] = str(out)
    return result


def _test_split(
    run: Path, classes: Sequence[str], data_root: str | Path | None
) -> tuple[list[Path], list[int]]:
    """The run's held-out test images and labels, every record checked
    (:func:`graft.split.data_from_split`)."""
    from .integrity import read_run_config
    from .rundir import RunDir
    from .split import data_from_split

    rundir = RunDir(run)
    if not rundir.split.is_file() or not rundir.config.is_file():
        raise RunFolderError(f"{run} has no split.csv/config.json; pass a FOLDER to evaluate on.")
    saved = read_run_config(rundir)["classes"]
    if list(saved) != list(classes):
        raise RunFolderError(
            f"config.json and model.safetensors in {run} disagree on the classes "
            f"({', '.join(saved)} against {', '.join(classes)}): one of them was changed or "
            "replaced after training; retrain the run or restore the files."
        )
    data, _ = data_from_split(run, data_root, subsets=("test",), purpose="evaluate")
    if not data.paths:
        raise RunFolderError(
            f"split.csv in {run} lists no test images: nothing held out to evaluate on; pass "
            "a FOLDER to evaluate on."
        )
    return data.paths, data.labels
