"""After the stages: calibrate the kept model on validation data, evaluate it once on the
held-out test split (and the --unseen folder), plot the curves with their diagnosis and
summarise the run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Best
from .data import ImageFiles, ScanResult, build_transform
from .device import Device
from .features import logits_cached
from .model import GraftModel
from .plan import Features, Plan, Run
from .rundir import EpochRecord, Summary
from .split import Split, class_shares, share_problems

__all__ = ["Calibration", "calibrate", "describe_kept", "finish", "report_result"]


@dataclass
class Calibration:
    temperature: float
    fitted: bool
    unknown_threshold: float


def calibrate(
    run: Run, model: GraftModel, device: Device, plan: Plan, features: Features
) -> Calibration:
    """Temperature scaling and the 'unknown' threshold, both on validation data; the
    calibrated model is saved."""
    from .metrics import choose_unknown_threshold, fit_temperature

    config, reporter = run.config, run.reporter
    model.eval()
    labels = features.labels["val"]
    stale_cache = config.fine_tune_epochs > 0 and not plan.cache_cut  # backbone changed below
    if stale_cache:
        info = model.info
        eval_tf = build_transform(info.img_size, info.mean, info.std, "none", info.trim)
        val_logits = _logits_from_images(model, features.paths["val"], eval_tf, device, run.workers)
    else:
        val_logits = logits_cached(model, features.val, plan.extract_at, device)
    val_right = bool((val_logits.argmax(1) == labels).all())
    if val_right:
        # With no validation errors the log-loss keeps falling as the temperature goes to 0:
        # fitting would make every prediction look certain. Leave the model as it is.
        temperature = 1.0
        reporter.info("Calibration: not fitted (no validation errors to calibrate against).")
    else:
        temperature = fit_temperature(val_logits.numpy(), labels.tolist())
        reporter.info(f"Calibration: temperature {temperature:.3f} fitted on the validation split.")
    val_probs = (val_logits / temperature).softmax(1).numpy()
    unknown = choose_unknown_threshold(val_probs, labels.tolist(), config.unknown_precision)
    if unknown > 0:
        answered = float((val_probs.max(1) >= unknown).mean())
        message = (
            f"Open set: predictions below {unknown:.1%} confidence will answer 'unknown'; "
            f"{answered:.0%} of validation images keep an answer, right at least "
            f"{config.unknown_precision:.0%} of the time."
        )
        if answered < 0.5:
            reporter.warn(
                message + " The model is unsure of most images: more images per class, or "
                "--unknown-precision 0 to always answer."
            )
        else:
            reporter.info(message)
    model.info = replace(model.info, temperature=temperature, unknown_threshold=unknown)
    model.save(run.dir.model)
    return Calibration(temperature, not val_right, unknown)


@torch.no_grad()
def _logits_from_images(
    model: GraftModel, paths: list[Path], transform: Any, device: Device, workers: int
) -> torch.Tensor:
    from .data import make_loader

    files = ImageFiles(paths, None, transform, model.info.img_size)
    out = torch.empty(len(paths), len(model.info.classes))
    for batch in make_loader(files, 64, shuffle=False, seed=0, workers=workers):
        with device.context():
            out[batch["index"]] = model(device.prepare(batch["images"])).float().cpu()
    return out


def describe_kept(run: Run, plan: Plan, best: Best) -> str:
    kept = f"epoch {best.step} ({best.stage} stage), the lowest validation loss"
    if "fine-tune" in plan.stages and best.stage == "frozen":
        # The guard: fine-tuning that does not help on honest validation only narrows the
        # model to this dataset, so the frozen-stage model is the one kept.
        kept = (
            f"the frozen-stage model (epoch {best.step}): fine-tuning did not improve the "
            "validation loss, so its weights were not kept"
        )
        run.reporter.info(f"Kept {kept}.")
    return kept


def finish(
    run: Run,
    model: GraftModel,
    device: Device,
    plan: Plan,
    data: ScanResult,
    split: Split,
    features: Features,
    history: list[EpochRecord],
    best: Best,
    kept: str,
    calibration: Calibration,
) -> Summary:
    """Evaluate the kept model once on the held-out test split (and on --unseen), plot the
    curves with their diagnosis; returns the run's summary."""
    from .diagnose import diagnose
    from .evaluate import evaluate_files
    from .plots import plot_learning_curves
    from .predict import fresh_onnx_path

    config, rundir = run.config, run.dir
    model.eval()
    diagnosis = diagnose(history, grouped=split.grouped, n_val=len(features.labels["val"]))
    suspicious = diagnosis.notes and not split.grouped
    plot_learning_curves(
        history,
        rundir / "learning_curves.png",
        best_step=best.step,
        title=f"{config.backbone} @ {config.img_size}px: {diagnosis.verdict}"
        + (
            "\n(but validation was perfect at once: suspect near-duplicates across the split)"
            if suspicious
            else ""
        ),
    )
    test = evaluate_files(
        model,
        features.paths["test"],
        features.labels["test"].tolist(),
        data.classes,
        out_dir=rundir.path,
        device=device,
        workers=run.workers,
        title="held-out test split",
        onnx_path=fresh_onnx_path(rundir.model),
    )
    unseen = evaluate_unseen(run, history, plan, test) if features.unseen is not None else None
    return Summary(
        classes=data.classes,
        counts=data.counts,
        split={s: len(split.indices(s)) for s in ("train", "val", "test")},
        skipped_files=len(data.skipped),
        class_weights=features.class_weights_note,
        engine=device.reason,
        plan=plan.text,
        best={"stage": best.stage, "step": best.step, "val_loss": best.loss},
        kept=kept,
        backbone_choice=None,
        unseen=unseen,
        diagnosis=diagnosis.to_dict(),
        class_shares=class_shares(split.subsets, data.labels, data.classes),
        share_warnings=share_problems(
            split.subsets,
            data.labels,
            data.classes,
            config.test_size,
            config.val_size,
            split.groups if split.grouped else None,
        ),
        audit=rundir.read_optional(rundir.audit.name),
        test={k: test[k] for k in ("accuracy", "accuracy_ci95", "loss", "n")},
        open_set=test["open_set"],
        calibration={
            "temperature": calibration.temperature,
            "fitted": calibration.fitted,
            "test_ece": test["calibration"]["ece"],
        },
        timings=run.timings,
        epoch_seconds=_epoch_seconds(history),
    )


def evaluate_unseen(
    run: Run, history: list[EpochRecord], plan: Plan, test: dict[str, Any]
) -> dict[str, Any]:
    """The kept model on the --unseen folder, against the held-out split of the source."""
    from .evaluate import evaluate_run

    folder = run.config.unseen
    ev = evaluate_run(run.dir.path, folder)  # also writes eval-<folder>/ for the report
    lo, hi = ev["accuracy_ci95"]
    tlo, thi = test["accuracy_ci95"]
    run.reporter.info(
        f"Images from elsewhere ({folder}): accuracy {ev['accuracy']:.1%} "
        f"(95% CI {lo:.1%}-{hi:.1%}, {ev['n']} images) against {test['accuracy']:.1%} "
        f"(95% CI {tlo:.1%}-{thi:.1%}) on the held-out split of the training source."
    )
    by_stage = {}
    for stage in plan.stages:
        recs = [r for r in history if r.stage == stage]
        if recs:  # in-domain validation vs --unseen accuracy at the stage's best epoch
            r = min(recs, key=lambda r: r.val_loss)
            by_stage[stage] = {"epoch": r.epoch, "val_acc": r.val_acc, "unseen_acc": r.unseen_acc}
    return {
        "folder": str(folder),
        "n": ev["n"],
        "accuracy": ev["accuracy"],
        "accuracy_ci95": ev["accuracy_ci95"],
        "by_stage": by_stage,
    }


def report_result(run: Run, summary: Summary) -> None:
    from .diagnose import Diagnosis

    run.reporter.diagnosis(Diagnosis(**summary["diagnosis"]))
    test = summary["test"]
    lo, hi = test["accuracy_ci95"]
    run.reporter.info(
        f"Held-out test accuracy {test['accuracy']:.1%} (95% CI {lo:.1%}-{hi:.1%}) on "
        f"{test['n']} images, loss {test['loss']:.3f}, calibration error "
        f"{summary['calibration']['test_ece']:.3f}."
    )


def _epoch_seconds(history: list[EpochRecord]) -> dict[str, float]:
    out = {}
    for stage in ("frozen", "fine-tune"):
        secs = [r.seconds for r in history if r.stage == stage]
        if secs:
            out[stage] = float(np.mean(secs))
    return out
