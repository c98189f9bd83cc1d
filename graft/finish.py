"""After the stages: calibrate the kept model on validation data, evaluate it once on the
held-out test split (and the --unseen folder), plot the curves with their diagnosis and
summarise the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Best
from .data import ScanResult
from .device import Device
from .familiarity import FamiliarityFit
from .features import logits_cached
from .loading import ImageFiles, transform_for
from .model import GraftModel
from .plan import Features, Plan, Run
from .rundir import EpochRecord, Summary
from .split import Split, class_shares, split_problems

__all__ = [
    "Calibration",
    "calibrate",
    "describe_kept",
    "export_for_predict",
    "finish",
    "report_result",
]


@dataclass
class Calibration:
    temperature: float
    fitted: bool
    unknown_threshold: float
    familiarity: dict[str, Any] | None = None  # FamiliarityFit.to_dict(); None when off


def calibrate(
    run: Run, model: GraftModel, device: Device, plan: Plan, features: Features
) -> Calibration:
    """Temperature scaling, the 'unknown' confidence threshold and the familiarity score
    (graft.familiarity), all on training and validation data; the calibrated model is
    saved."""
    from .metrics import choose_unknown_threshold, fit_temperature

    config, reporter = run.config, run.reporter
    model.eval()
    labels = features.labels["val"]
    stale_cache = _cache_is_stale(config, plan)
    if stale_cache:
        info = model.info
        eval_tf = transform_for(info.preprocessing)
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
    familiarity = None
    if config.unknown_keep > 0:
        fit = _fit_familiarity(run, model, device, plan, features, stale_cache)
        model.familiarity = fit.module
        model.info = replace(
            model.info, familiarity_k=fit.module.k, familiarity_threshold=fit.threshold
        )
        familiarity = fit.to_dict()
    model.save(run.dir.model)
    return Calibration(temperature, not val_right, unknown, familiarity)


def _fit_familiarity(
    run: Run, model: GraftModel, device: Device, plan: Plan, features: Features, stale: bool
) -> FamiliarityFit:
    """The familiarity bank from the training images' pooled features, its threshold from
    the --unseen images, else validation images under strong augmentation, else (asked)
    plain validation images (graft.familiarity says why)."""
    from .familiarity import BANK_CAP, balanced_sample, fit_familiarity
    from .features import pool_cached

    config, info = run.config, model.info
    if config.unknown_keep < 0.5:
        run.reporter.warn(
            f"--unknown-keep {config.unknown_keep}: the threshold keeps only "
            f"{config.unknown_keep:.0%} of the reference images answered, so most images of "
            "the classes will be 'unknown' too (0.95 is the default; 0 turns the score off)."
        )
    clean = transform_for(info.preprocessing)
    train_y = features.labels["train"].tolist()
    rows = balanced_sample(train_y, BANK_CAP, config.seed)

    def pooled(maps: torch.Tensor | None, paths: list[Path]) -> torch.Tensor:
        if stale or maps is None:  # the backbone changed since the cache was filled
            return _from_images(model, model.backbone, paths, clean, device, run.workers)
        return pool_cached(model, maps, plan.extract_at, device)

    train_paths = [features.paths["train"][i] for i in rows]
    train_f = pooled(features.train[0][torch.as_tensor(rows)], train_paths)
    val_f = pooled(features.val, features.paths["val"])
    val_y = features.labels["val"].tolist()
    unseen_f = None
    if features.unseen is not None:
        unseen_f = pooled(features.unseen_maps, list(features.unseen.paths))
    if unseen_f is not None and len(unseen_f):
        reference, ref_f = f"the {len(unseen_f)} --unseen images", unseen_f
    elif config.unknown_reference == "validation":
        reference, ref_f = "validation images", val_f
    else:
        reference = "validation images under strong augmentation"
        ref_f = _shifted_features(run, model, device, plan, features)
    fit = fit_familiarity(
        train_f,
        [train_y[i] for i in rows],
        ref_f,
        config.unknown_keep,
        val_f,
        val_y,
        reference=reference,
        unseen_features=unseen_f,
        seed=config.seed,
    )
    _say_familiarity(run, fit)
    return fit


def _shifted_features(
    run: Run, model: GraftModel, device: Device, plan: Plan, features: Features
) -> torch.Tensor:
    """Pooled features of validation images under strong augmentation (several seeded views
    each, at most SHIFT_MAX_IMAGES images): pictures of the classes as if from elsewhere."""
    from .cache import item_seed
    from .familiarity import SHIFT_AUGMENT, SHIFT_MAX_IMAGES, SHIFT_VIEWS, balanced_sample
    from .features import pool_cached

    info, seed = model.info, run.config.seed
    chosen = balanced_sample(features.labels["val"].tolist(), SHIFT_MAX_IMAGES, seed)
    paths = [features.paths["val"][i] for i in chosen]
    shift = transform_for(info.preprocessing, SHIFT_AUGMENT)
    frozen = features.frozen
    if frozen is not None and not _cache_is_stale(run.config, plan):
        # The frozen blocks are those of the cache: its fast runner makes every view of an
        # image from one decode, and only the trained top runs in PyTorch.
        seeds = [[item_seed(str(p), v, seed) for v in range(1, SHIFT_VIEWS + 1)] for p in paths]
        maps = frozen.transient_views(paths, shift, seeds, "Simulating pictures from elsewhere")
        return pool_cached(model, maps.transpose(0, 1).flatten(0, 1), plan.extract_at, device)
    views = [
        _from_images(
            model,
            model.backbone,
            paths,
            shift,
            device,
            run.workers,
            [item_seed(str(p), v, seed) for p in paths],
        )
        for v in range(1, SHIFT_VIEWS + 1)
    ]
    return torch.cat(views)


def _say_familiarity(run: Run, fit: FamiliarityFit) -> None:
    message = (
        f"Open set: images less familiar than {fit.threshold:.3f} (cosine similarity to the "
        f"nearest of {fit.bank_rows} training images) will answer 'unknown', a threshold "
        f"that keeps {fit.reference_kept:.0%} of {fit.reference} answered; "
        f"{fit.val_kept:.0%} of validation images keep an answer"
    )
    if fit.unseen_kept is not None:
        message += f", {fit.unseen_kept:.0%} of the --unseen images"
    if fit.new_class_rejected is not None:
        message += (
            f". A picture of a new class from the training source would be answered "
            f"'unknown' about {fit.new_class_rejected:.0%} of the time (validation images "
            "scored without their own class)"
        )
    run.reporter.info(message + ".")
    if "--unseen" in fit.reference and fit.val_kept < 0.9:
        run.reporter.warn(
            f"The threshold set on {fit.reference} answers only {fit.val_kept:.0%} of the "
            "validation images: a few pictures, or pictures of few classes, set it high. Give "
            "--unseen more pictures of every class, or lower --unknown-keep."
        )
    if (
        run.config.unknown_reference == "augmented"
        and "augmentation" in fit.reference
        and fit.new_class_rejected is not None
        and fit.new_class_rejected < 0.5
    ):
        run.reporter.info(
            "If new images will come from the same source as the training images, "
            "--unknown-reference validation catches more images of new classes (at about 5% "
            "of in-class images); --unseen DIR with a few pictures from where they will come "
            "sets the threshold on them."
        )


def _logits_from_images(
    model: GraftModel, paths: list[Path], transform: Any, device: Device, workers: int
) -> torch.Tensor:
    return _from_images(model, model.forward, paths, transform, device, workers)


@torch.no_grad()
def _from_images(
    model: GraftModel,
    fn: Any,
    paths: list[Path],
    transform: Any,
    device: Device,
    workers: int,
    seeds: list[int] | None = None,
) -> torch.Tensor:
    """``fn`` (images -> rows) over image files with ``transform`` (seeded per file when
    ``seeds`` are given), in order. A file that no longer reads is fatal: these are the
    run's own images, checked when training began."""
    from .errors import DataError
    from .loading import make_loader

    files = ImageFiles(paths, None, transform, model.info.img_size, seeds)
    out: torch.Tensor | None = None
    for batch in make_loader(files, 64, shuffle=False, seed=0, workers=workers):
        if batch["failed"]:
            index, reason = batch["failed"][0]
            raise DataError(f"{paths[index]} could not be read any more: {reason}")
        with device.context():
            rows = fn(device.prepare(batch["images"])).float().cpu()
        if out is None:
            out = torch.empty(len(paths), *rows.shape[1:])
        out[batch["index"]] = rows
    return out if out is not None else torch.empty(0)


def epochs_of(history: list[EpochRecord], min_delta: float) -> list[EpochRecord]:
    """The history as the diagnosis reads it: a linear probe's L2 path (graft.probe) is not a
    run of epochs, so only the point it kept stands for stage 1."""
    from .probe import choose_point

    path = [r for r in history if math.isfinite(r.l2)]
    if not path:
        return history
    kept = path[choose_point([r.val_loss for r in path], min_delta)]
    return [kept, *(r for r in history if not math.isfinite(r.l2))]


def describe_kept(run: Run, plan: Plan, best: Best) -> str:
    kept = f"epoch {best.step} ({best.stage} stage), the lowest validation loss"
    if best.stage == "wise" and run.wise is not None:
        alpha = run.wise["alpha"]
        kept = (
            f"a weight-space mix (WiSE-FT) of {alpha:g} x the fine-tuned and {1 - alpha:g} x "
            f"the frozen-stage weights ({run.wise['chosen_by']})"
        )
    elif "fine-tune" in plan.stages and best.stage == "frozen":
        # The guard: fine-tuning that does not help on honest validation only narrows the
        # model to this dataset, so the frozen-stage model is the one kept.
        kept = (
            f"the frozen-stage model (epoch {best.step}): fine-tuning did not improve the "
            "validation loss, so its weights were not kept"
        )
        run.reporter.info(f"Kept {kept}.")
    return kept


def export_for_predict(run: Run, model: GraftModel) -> Path | None:
    """``model.onnx`` beside the weights, stamped with their hash: what ``graft predict``
    and ``graft serve`` run without torch (graft.fast). None where it cannot be made (a
    read-only folder, no ONNX exporter); predict then builds the model as before."""
    from .engines import Probabilities, export_onnx
    from .modelinfo import fresh_onnx_path, stamp_onnx

    onnx_path = fresh_onnx_path(run.dir.model)
    if onnx_path is None or onnx_path.is_file():
        return onnx_path
    try:
        export_onnx(Probabilities(model), model.info.img_size, onnx_path)
        stamp_onnx(run.dir.model)
    except Exception as exc:  # prediction still works through PyTorch
        run.reporter.warn(f"Could not export the model to ONNX ({exc}); predict will use PyTorch.")
        return None
    return onnx_path


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
    onnx_path: Path | None,
) -> Summary:
    """Evaluate the kept model once on the held-out test split (and on --unseen) through
    ``onnx_path`` (:func:`export_for_predict`), plot the curves with their diagnosis;
    returns the run's summary."""
    from .diagnose import diagnose
    from .plots import plot_learning_curves

    config, rundir = run.config, run.dir
    model.eval()
    epochs, n_val = epochs_of(history, config.min_delta), len(features.labels["val"])
    diagnosis = diagnose(epochs, grouped=split.grouped, n_val=n_val)
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
    test = evaluate_test(run, model, device, plan, features, data.classes, onnx_path)
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
        # for a dataset that came split, only the parts graft carved had a share to keep
        share_warnings=split_problems(split, data, config),
        audit=rundir.read_optional(rundir.audit.name),
        test={k: test[k] for k in ("accuracy", "accuracy_ci95", "loss", "n")},
        open_set=test["open_set"],
        calibration={
            "temperature": calibration.temperature,
            "fitted": calibration.fitted,
            "test_ece": test["calibration"]["ece"],
            "familiarity": calibration.familiarity,
        },
        timings=run.timings,
        # a resumed run times its continuation only: the interrupted process's time is gone
        timings_of="the continuation (--resume)" if run.resume else "the whole run",
        epoch_seconds=_epoch_seconds(history),
    )


def evaluate_test(
    run: Run,
    model: GraftModel,
    device: Device,
    plan: Plan,
    features: Features,
    classes: list[str],
    onnx_path: Path | None,
) -> Any:
    """The kept model, once, on the held-out split. Its clean activations at the cut are in
    the cache whenever the blocks below the cut are those that made it (the usual plan), so
    only the trained top runs; otherwise its images are decoded and run through the export
    (``onnx_path``) or PyTorch."""
    from .evaluate import evaluate_files, score_files
    from .features import CachedScores

    paths, labels = features.paths["test"], features.labels["test"].tolist()
    title = "held-out test split"
    if features.test is not None and not _cache_is_stale(run.config, plan):
        predictor = CachedScores(model, features.test, plan.extract_at, device)
        return score_files(predictor, model.info, paths, labels, classes, run.dir.path, title)
    return evaluate_files(
        model,
        paths,
        labels,
        classes,
        out_dir=run.dir.path,
        device=device,
        workers=run.workers,
        title=title,
        onnx_path=onnx_path,
    )


def _cache_is_stale(config: Any, plan: Plan) -> bool:
    """Whether stage 2 changed blocks below the cached activations (it fine-tuned on images:
    the cut's activations did not fit the cache, or the whole backbone learned)."""
    return bool(config.fine_tune_epochs > 0 and not plan.cache_cut)


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
    o = summary.get("open_set") or {}
    if o.get("unknown"):  # the accuracy above is of the top class; say what 'unknown' takes
        run.reporter.info(
            f"With 'unknown': {o['coverage']:.1%} of the held-out images answered, "
            f"{o['answered_accuracy']:.1%} of those right ({o['unknown']} answered 'unknown')."
        )
    run.reporter.info(describe_timings(run.timings, resumed=run.resume))


#: the phases of a run in the order they happen (summary.json's ``timings``)
PHASES = (
    "scan",
    "backbone_choice",
    "build",
    "audit",
    "cache",
    "frozen",
    "fine-tune",
    "calibration",
    "evaluation",
    "export",
    "report",
)


def describe_timings(timings: dict[str, float], resumed: bool = False) -> str:
    """``Time 48.2 s: scan 1.2 s, cache 28.7 s, ...``: where a run's time went (after
    ``--resume``, the continuation's: the interrupted process's time is not counted)."""
    parts = [
        f"{name}\u00a0{timings[f'{name}_seconds']:.1f}\u00a0s"  # never wrapped apart
        for name in PHASES
        if timings.get(f"{name}_seconds", 0.0) >= 0.05
    ]
    what = "Time of this continuation" if resumed else "Time"
    return f"{what} {timings.get('total_seconds', 0.0):.1f} s: " + ", ".join(parts) + "."


def _epoch_seconds(history: list[EpochRecord]) -> dict[str, float]:
    out = {}
    for stage in ("frozen", "fine-tune"):
        secs = [r.seconds for r in history if r.stage == stage]
        if secs:
            out[stage] = float(np.mean(secs))
    return out
