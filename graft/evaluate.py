"""Evaluation of a trained model on labelled images: the run's held-out test split by
default, or any folder laid out like the training data.

Reports accuracy, loss, per-class precision/recall/F1 and the confusion matrix (as PNG).
With ``--others DIR`` (images of none of the classes) it also measures how well "unknown"
keeps them out: AUROC and the false-positive rate at 95% true positives of the score that
decides (the familiarity, graft.familiarity, or the top probability for a model without it),
the share of them answered "unknown", and a histogram of both sides (familiarity.png).

A run whose ``model.onnx`` is current is evaluated on it without importing torch
(graft.fast), as ``graft predict`` does; a stale or missing export, ``GRAFT_ENGINE=torch``
or ``--tta`` (its views are torch operations) take the PyTorch model, which makes the
export again for the next call.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DataError, RunFolderError, SystemResourceError, UsageError
from .io import atomic_write_json, check_output_file, check_output_folder, png_by_graft
from .metrics import Metrics, metrics_from_probs, open_set_stats
from .modelinfo import ModelInfo
from .predictions import ScorePredictor
from .rundir import EVALUATION, MANIFEST, RunDir
from .runtime import is_unknown

if TYPE_CHECKING:
    from .model import GraftModel


class Evaluation(Metrics, total=False):
    """``evaluation.json``: the metrics plus what was evaluated and how."""

    data: str  # what was evaluated ("held-out test split", "folder NAME")
    temperature: float
    open_set: dict[str, Any]
    failed: list[dict[str, str]]  # files that could not be read, with the reason
    top_losses: list[dict[str, Any]]  # the most confidently wrong images
    tta: bool
    tta_effect: dict[str, float]
    others: dict[str, Any]  # --others DIR: how well "unknown" keeps out images of no class
    output_dir: str


#: the histogram of in-class and --others scores, beside evaluation.json
FAMILIARITY_PNG = "familiarity.png"


@dataclass
class Others:
    """``--others DIR``: images of none of the model's classes, in any layout."""

    folder: Path
    paths: list[Path]


def find_others(folder: str | Path) -> Others:
    """The images under ``folder`` (recursively), checked before anything is written: a
    missing folder, a file, an unreadable folder or one without images is refused here."""
    from .files import IMAGE_EXTENSIONS, expand_inputs, iter_files

    what = "images of none of the model's classes, in any layout"
    if not str(folder).strip():
        raise UsageError(f"--others is empty: give a folder of {what}.")
    root = Path(folder).expanduser()
    if not root.exists():
        raise DataError(f"--others {root} does not exist: give a folder of {what}.")
    if not root.is_dir():
        raise UsageError(
            f"--others {root} is a file: give a folder of {what} (put the file in one)."
        )
    try:
        next(os.scandir(root), None)  # os.walk would hide a refusal as an empty folder
    except OSError as exc:
        raise SystemResourceError(
            f"--others {root} cannot be read ({exc.strerror or exc}): fix its permissions "
            "(chmod +rx) or give another folder."
        ) from exc
    paths = expand_inputs([root])
    if not paths:
        others = [p for p in iter_files(root) if p.suffix.lower() not in IMAGE_EXTENSIONS]
        found = f"only {len(others)} file(s) of other types" if others else "no files"
        raise DataError(
            f"--others {root} holds no images ({found}; graft reads "
            f"{', '.join(IMAGE_EXTENSIONS)}): give a folder of {what}."
        )
    return Others(root, paths)


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
    others: Others | None = None,
) -> Evaluation:
    """Predict ``paths`` with ``model`` (PyTorch, or its export at ``onnx_path``) and score
    them against ``labels``; files that fail are listed. ``others`` (images of no class)
    adds ``result["others"]`` and familiarity.png."""
    from .predict import Predictor

    predictor = Predictor(model, device=device, workers=workers, onnx_path=onnx_path, tta=tta)
    return score_files(predictor, model.info, paths, labels, classes, out_dir, title, others)


def score_files(
    predictor: ScorePredictor,
    info: ModelInfo,
    paths: Sequence[Path],
    labels: Sequence[int],
    classes: Sequence[str],
    out_dir: Path | None = None,
    title: str = "",
    others: Others | None = None,
) -> Evaluation:
    """:func:`evaluate_files` with any predictor (the PyTorch one, or graft.fast's on the
    run's export, which needs no torch); ``info`` is the model's metadata (its temperature
    and "unknown" thresholds). Writes evaluation.json and the plots when ``out_dir`` is given."""
    from .plots import plot_confusion_matrix

    probs, familiarity, failed = predictor.predict_scores(paths)
    keep = [i for i in range(len(paths)) if i not in failed]
    result: Evaluation = metrics_from_probs(  # type: ignore[assignment]
        probs[keep], [labels[i] for i in keep], classes
    )
    result["data"] = title
    result["temperature"] = info.temperature
    result["open_set"] = open_set_stats(
        probs[keep],
        [labels[i] for i in keep],
        info.unknown_threshold,
        None if familiarity is None else familiarity[keep],
        info.familiarity_threshold,
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
    scores: tuple[np.ndarray, np.ndarray] | None = None
    if others is not None:
        fam_in = None if familiarity is None else familiarity[keep]
        result["others"], scores = _others_result(
            info, predictor, others, probs[keep], fam_in, [labels[i] for i in keep]
        )
    if out_dir is not None:
        from .plots import plot_familiarity, plot_reliability, plot_top_losses

        if scores is not None:
            plot_familiarity(
                scores[0], scores[1], result["others"], Path(out_dir) / FAMILIARITY_PNG
            )

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


def _others_result(
    info: ModelInfo,
    predictor: ScorePredictor,
    others: Others,
    probs: np.ndarray,
    familiarity: np.ndarray | None,
    labels: Sequence[int],
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """``result["others"]`` and the scores of both sides (in-class, others) for the plot.

    The score is what decides "unknown" beside the confidence: the familiarity when the
    model has one, else the top probability. Files of ``others`` that cannot be read are
    listed; when none can, there is nothing to measure and nothing is written."""
    o_probs, o_fam, o_failed = predictor.predict_scores(others.paths)
    ok = [i for i in range(len(others.paths)) if i not in o_failed]
    failed = [{"path": str(others.paths[i]), "reason": r} for i, r in sorted(o_failed.items())]
    if not ok:
        first = "; ".join(f"{f['path']}: {f['reason']}" for f in failed[:3])
        raise DataError(
            f"--others {others.folder}: none of its {len(failed)} image file(s) could be read "
            f"({first}). Give a folder of readable images."
        )
    o_probs = o_probs[ok]
    o_fam = None if o_fam is None else o_fam[ok]
    thresholds = (info.unknown_threshold, info.familiarity_threshold)

    def unknown(p: np.ndarray, f: np.ndarray | None) -> np.ndarray:
        return np.array(
            [
                is_unknown(
                    float(row.max()),
                    thresholds[0],
                    None if f is None else float(f[i]),
                    thresholds[1],
                )
                for i, row in enumerate(p)
            ],
            dtype=bool,
        )

    if familiarity is not None and o_fam is not None:
        inside, outside = np.asarray(familiarity, float), np.asarray(o_fam, float)
        score, threshold = "familiarity", info.familiarity_threshold
        nearest = (
            "the most similar"
            if info.familiarity_k == 1
            else f"the {info.familiarity_k}th most similar"
        )
        meaning = f"cosine similarity of the image's features to those of {nearest} training image"
    else:
        inside, outside = probs.max(1).astype(float), o_probs.max(1).astype(float)
        score, threshold = "top probability", info.unknown_threshold
        meaning = (
            "the top class probability: this model has no familiarity score (trained with "
            "--unknown-keep 0 or by an older graft); retrain to get one"
        )
    answered = ~unknown(probs, familiarity)
    right = probs.argmax(1) == np.asarray(labels)
    result = {
        "folder": str(others.folder),
        "score": score,
        "score_meaning": meaning,
        "threshold": float(threshold),
        "confidence_threshold": float(info.unknown_threshold),
        "familiarity_threshold": float(info.familiarity_threshold)
        if score == "familiarity"
        else None,
        "n_in_class": len(inside),
        "n_others": len(outside),
        **separation(inside, outside),
        "others_rejected": float(unknown(o_probs, o_fam).mean()),
        "in_class_answered": float(answered.mean()) if len(answered) else 0.0,
        "in_class_answered_accuracy": float(right[answered].mean()) if answered.any() else 0.0,
        "failed": failed,
    }
    return result, (inside, outside)


def separation(inside: np.ndarray, outside: np.ndarray) -> dict[str, float | None]:
    """How well a score (higher = more in-class) tells ``inside`` from ``outside``: AUROC
    (in-class positive; 0.5 is chance, 1 perfect) and the false-positive rate at 95% true
    positives (the share of ``outside`` at or above the score 95% of ``inside`` reach).
    None where a side is empty."""
    from sklearn.metrics import roc_auc_score

    if not len(inside) or not len(outside):
        return {"auroc": None, "fpr_at_95_tpr": None}
    y = np.r_[np.ones(len(inside)), np.zeros(len(outside))]
    # the highest cut that still keeps at least 95% of ``inside`` (an interpolated quantile
    # would keep fewer on a small split and flatter the rate)
    cut = np.sort(inside)[int(np.floor(0.05 * len(inside)))]
    return {
        "auroc": float(roc_auc_score(y, np.r_[inside, outside])),
        "fpr_at_95_tpr": float((outside >= cut).mean()),
    }


def evaluate_run(
    run: str | Path,
    folder: str | Path | None = None,
    out_dir: str | Path | None = None,
    reporter: Any = None,
    tta: bool = False,
    data_root: str | Path | None = None,
    others: str | Path | None = None,
) -> Evaluation:
    """Evaluate a run on its held-out test split, or on a labelled ``folder``.

    The test split is read from split.csv and checked before anything is written: the file
    whole, its images present (under ``data_root`` when the data folder moved) and
    unchanged (graft.integrity). So is ``others`` (a folder of images of none of the
    classes, :func:`find_others`), which adds ``result["others"]`` and familiarity.png.
    The run's current ONNX export answers when it can (no torch import; graft.fast)."""
    from .modelinfo import read_info

    run = Path(run)
    if folder is not None and data_root is not None:
        raise UsageError(
            "--data-root says where the run's held-out split is now; with a FOLDER to "
            "evaluate on it has no use. Give one or the other."
        )
    other_images = find_others(others) if others is not None else None
    if other_images is not None and other_images.folder.resolve().is_relative_to(run.resolve()):
        raise UsageError(
            f"--others {others} is inside the run folder {run}: it holds graft's own plots, "
            "not images of other things. Give a folder of images of none of the classes."
        )
    weights, info = read_info(run)
    job = _job(run, folder, out_dir, list(info.classes), data_root, reporter)
    out = job.out
    if out != run and out.exists() and out.name not in (RunDir(run).owned() or []):
        if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
            raise UsageError(
                f"--out {out} is another run's folder: its own evaluation would be replaced "
                f"by {run}'s. Choose a new or empty folder (or evaluate that run itself)."
            )
        check_output_folder(out, "the evaluation folder")  # new, empty or an evaluation
    # an eval-* folder graft writes in the run is graft's: --force replaces it, the report
    # shows it (one holding the user's other files was refused just above)
    claim = out.parent.resolve() == run.resolve() and out != run
    _check_writable(out)  # before the scoring, which a refused write would throw away
    histogram = _histogram_target(out, other_images is not None)
    result, plain = _score(weights, info, job, tta, other_images)
    if histogram is not None:
        histogram.unlink()  # graft's, from an earlier --others: not this evaluation's
    result["tta"] = tta
    if plain is not None:
        result["tta_effect"] = _tta_effect(plain, result)
        atomic_write_json(out / EVALUATION, result)
    if folder is not None:
        result["failed"] = job.skipped + result["failed"]
        atomic_write_json(out / EVALUATION, result)
    if claim:
        RunDir(run).claim([out.name])
    elif out == run and other_images is not None and (run / MANIFEST).is_file():
        RunDir(run).claim([FAMILIARITY_PNG])
    result["output_dir"] = str(out)
    return result


def _check_writable(out: Path) -> None:
    """Refuse an output folder this process cannot write to (a run on read-only media, a
    shared run of another user), saying where else the evaluation can go."""
    target = out if out.exists() else out.parent
    while not target.exists() and target != target.parent:
        target = target.parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise SystemResourceError(
            f"Cannot write the evaluation to {out}: {target} is not writable here (read-only "
            "or another user's). Give another output folder: graft evaluate RUN --out DIR "
            "(the run itself is only read)."
        )


@dataclass
class _Job:
    """What :func:`evaluate_run` scores, and where the results go."""

    paths: list[Path]
    labels: list[int]
    title: str
    out: Path
    skipped: list[dict[str, str]]  # files of FOLDER that could not be read


def _job(
    run: Path,
    folder: str | Path | None,
    out_dir: str | Path | None,
    classes: list[str],
    data_root: str | Path | None,
    reporter: Any,
) -> _Job:
    """The held-out test split (written to the run) or the labelled ``folder`` (written to
    ``RUN/eval-NAME``), checked; ``out_dir`` overrides where."""
    from .data import scan

    if folder is None:
        paths, labels = _test_split(run, classes, data_root)
        return _Job(paths, labels, "held-out test split", Path(out_dir) if out_dir else run, [])
    data = scan(folder, classes=classes, progress=reporter.iter if reporter else None)
    if not data.paths:
        raise DataError(f"No usable images in {folder}.")
    out = Path(out_dir) if out_dir else run / f"eval-{Path(folder).resolve().name}"
    skipped = [{"path": str(p), "reason": r} for p, r in data.skipped]
    return _Job(data.paths, data.labels, f"folder {Path(folder).name}", out, skipped)


def _score(
    weights: Path, info: ModelInfo, job: _Job, tta: bool, others: Others | None
) -> tuple[Evaluation, Evaluation | None]:
    """The evaluation written to ``job.out``, and with ``tta`` the same images without it
    (to report what TTA changed). The run's current export answers without torch when it
    can (graft.fast.open_export_predictor, the choice ``graft predict`` makes); otherwise
    the PyTorch model, which makes the export again and stamps it for the next call."""
    from .fast import open_export_predictor

    n_images = len(job.paths) + (len(others.paths) if others is not None else 0)
    fast = None if tta else open_export_predictor(weights, info, workers=-1, n_images=n_images)
    if fast is not None:
        return score_files(
            fast, info, job.paths, job.labels, list(info.classes), job.out, job.title, others
        ), None
    from .model import load_model
    from .modelinfo import fresh_onnx_path, stamp_onnx

    model = load_model(weights)
    classes = list(model.info.classes)
    onnx = fresh_onnx_path(weights)
    plain = None
    if tta:
        plain = evaluate_files(model, job.paths, job.labels, classes, onnx_path=onnx)
    result = evaluate_files(
        model,
        job.paths,
        job.labels,
        classes,
        out_dir=job.out,
        title=job.title,
        onnx_path=onnx,
        tta=tta,
        others=others,
    )
    if onnx is not None:  # the graph made for this evaluation serves the next predict too
        with contextlib.suppress(OSError):
            stamp_onnx(weights)
    return result, plain


def _tta_effect(plain: Evaluation, result: Evaluation) -> dict[str, float]:
    """Accuracy, loss and calibration error without TTA and with it."""
    return {
        "accuracy_without": plain["accuracy"],
        "accuracy_with": result["accuracy"],
        "loss_without": plain["loss"],
        "loss_with": result["loss"],
        "ece_without": plain["calibration"]["ece"],
        "ece_with": result["calibration"]["ece"],
    }


def _histogram_target(out: Path, others: bool) -> Path | None:
    """With ``others``: check that familiarity.png may be written in ``out`` (a file of that
    name there that graft did not write is refused before anything is written: never
    overwritten). Without: graft's familiarity.png from an earlier --others evaluation, to
    remove (it is not this evaluation's), or None."""
    target = out / FAMILIARITY_PNG
    try:
        check_output_file(target, "the histogram", ".png")  # new, or graft's own
        ours = True
    except UsageError:
        ours = False
    if not others:
        # removed only when graft's own mark is in it: a Matplotlib PNG of that name may be
        # the user's (check_output_file lets graft overwrite those, never delete them)
        return target if ours and target.is_file() and png_by_graft(target) else None
    if not ours:
        raise UsageError(
            f"{target} exists and was not written by graft, so graft evaluate does not "
            "replace it: move it away, or write the evaluation elsewhere with --out."
        )
    return None


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
