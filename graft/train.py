"""Training: the seed's two stages, done right. :func:`fit` reads top to bottom:

    1. load the data: scan the folder (or, on --resume, read the run's split.csv);
    2. build the model and make a plan: where the backbone is cut, what is cached, which
       engine runs the frozen passes;
    3. fill the caches: the frozen part runs once per image (and per augmented view); the
       clean pass also feeds the duplicate audit, which decides the split;
    4. stage 1 ("frozen"): only the new head learns, on cached features;
    5. stage 2 ("fine-tune"): the last N blocks learn too, with a much lower learning rate
       and a smaller batch, on activations cached at the cut when they fit, else on images;
    6. after every epoch: a history row, the best-so-far weights (by validation loss) and a
       checkpoint to resume from;
    7. calibrate the kept model on validation data, then finish: evaluate it once on the
       held-out test split, plot the curves, diagnose, summarise and report.

BatchNorm layers of the backbone stay in inference mode throughout (see ``GraftModel.train``).
"""

from __future__ import annotations

import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from ._malloc import tune_malloc
from .config import TrainConfig
from .data import ScanResult, open_dataset, scan
from .device import Device, choose_device
from .errors import DataError, SplitError
from .features import FrozenFeatures, pool_cached
from .finish import calibrate, describe_kept, export_for_predict, finish, report_result
from .loading import default_workers
from .loop import class_weights_for
from .model import GraftModel, build_model
from .plan import Features, Plan, Run, make_plan
from .progress import Reporter
from .refit import refit_probe
from .rundir import CONFIG, SPLIT, EpochRecord, RunDir, Summary
from .split import Split
from .stages import run_stages


@dataclass
class TrainResult:
    run_dir: Path
    classes: list[str]
    history: list[EpochRecord]
    summary: Summary = field(default_factory=Summary)  # type: ignore[arg-type]


def fit(
    config: TrainConfig,
    data_root: str | Path | None,
    out: str | Path,
    force: bool = False,
    reporter: Reporter | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train a classifier on ``data_root`` and write a self-describing run folder to ``out``.

    ``resume=True`` continues an interrupted run in ``out`` from its last finished epoch, on
    exactly the files of its split; the result equals that of an uninterrupted run.
    ``config.track`` also logs the run to MLflow and/or TensorBoard (graft.tracking).
    """
    from .distributed import setup, teardown
    from .tracking import Tracker, parse_track

    tune_malloc()
    ddp = setup()  # a no-op unless started by torchrun
    out, reporter = Path(out), reporter or Reporter()
    scratch: Path | None = None
    if not ddp.main:
        # Only rank 0 writes the run folder; the others write into a scratch copy.
        scratch = Path(tempfile.mkdtemp(prefix=f"graft-rank{ddp.rank}-"))
        if resume:
            for name in (CONFIG, SPLIT, "audit.json", RunDir(out).checkpoint.name):
                if (out / name).is_file():
                    shutil.copy2(out / name, scratch / name)
        out, reporter, force = scratch, Reporter(verbose=False), True
    # MLflow's experiment: the data folder's name (on --resume it comes from the run folder)
    saved = RunDir(out).config
    root = data_root or (RunDir(out).read_config().get("data_root") if saved.is_file() else None)
    names = parse_track(config.track) if ddp.main else ()
    tracker = Tracker(names, out, Path(root or out).resolve().name)
    workers = default_workers() if config.workers < 0 else config.workers
    run = Run(config, RunDir(out), reporter, tracker, ddp, resume, workers)
    try:
        result = _fit(run, data_root, force)
        if ddp.main:
            run.dir.claim_new(run.user_files)
            run.dir.drop_replaced()
        return result
    except BaseException:
        tracker.abort()
        _after_failure(run)
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        teardown(ddp)


def _after_failure(run: Run) -> None:
    """A run that failed before its first epoch leaves nothing behind (the corrected
    command needs no --force) and puts back the run --force was replacing; one that
    trained keeps its files for --resume, records them as graft's, and has replaced it."""
    if not run.ddp.main or run.user_files is None or not run.dir.path.is_dir():
        return
    if run.resume or run.dir.checkpoint.is_file():
        run.dir.claim_new(run.user_files)
        run.dir.drop_replaced()
    else:
        run.dir.discard_new(run.user_files, created=run.created)
        run.dir.restore_replaced()


def _fit(run: Run, data_root: str | Path | None, force: bool) -> TrainResult:
    started = time.perf_counter()
    config, reporter = run.config, run.reporter
    with run.phase("scan"):
        data, split = load_data(run, data_root, force)
    choice = None
    if config.backbone == "auto" and not run.resume:
        from .choose import choose_backbone

        with run.phase("backbone_choice"):
            choice = choose_backbone(config, data, reporter, run.workers, run.ddp)
        run.config = config = replace(config, backbone=choice.backbone)
        split = choice.split
        reporter.info(choice.describe())
    with run.phase("build"):
        model, weights_source, device = build(run, data)
        plan = make_plan(run, model, len(data.paths))
    # fill_caches times the audit and the cache, run_stages each stage, finish the
    # evaluation and the export
    split, features = fill_caches(run, model, weights_source, device, plan, data, split)
    history, best = run_stages(run, model, device, plan, features)
    if not run.ddp.main:
        return TrainResult(run.dir.path, data.classes, history)  # rank 0 finishes the run
    with run.phase("calibration"):
        kept = describe_kept(run, plan, best)
        calibration = calibrate(run, model, device, plan, features)
        refit = refit_probe(run, model, device, plan, features, history, best)
        if refit is not None:
            kept += (
                f"; its linear head then solved again on training + validation images "
                f"(L2 {refit['l2']:g})"
            )
    model.eval()
    with run.phase("export"):
        onnx_path = export_for_predict(run, model)
    with run.phase("evaluation"):
        summary = finish(
            run,
            model,
            device,
            plan,
            data,
            split,
            features,
            history,
            best,
            kept,
            calibration,
            onnx_path,
        )
    summary["backbone_choice"] = choice.to_dict() if choice is not None else None
    summary["detail_size"] = model.info.detail_size  # what --detail-size auto came to
    summary["wise"] = run.wise
    summary["refit"] = refit
    with run.phase("report"):
        from .report import write_report

        run.dir.write_summary(summary)
        write_report(run.dir.path)
        run.tracker.finish(summary)
    run.timings["total_seconds"] = time.perf_counter() - started
    run.dir.write_summary(summary)  # again: with the report's time and the total
    report_result(run, summary)
    return TrainResult(run.dir.path, data.classes, history, summary)


# --------------------------------------------------------------------------- 1. data


def load_data(run: Run, data_root: str | Path | None, force: bool) -> tuple[ScanResult, Split]:
    """The images of the run: scanned from ``data_root`` (a new run: the folder is created
    only once the data root is known to be good), or as its split.csv lists them."""
    from .split import data_from_split

    run.config.check_paths()
    data = None
    if not run.resume:
        # Everything that can be checked before training is checked before the run folder
        # exists: a wrong path or an unusable folder costs nothing and leaves nothing.
        # a folder in any layout, or --labels-csv (graft.layouts)
        data = open_dataset(data_root, run.config.labels_csv, progress=run.reporter.iter)
        _check_trainable(data)
        run.reporter.info(data.layout_note)
        run.created = not run.dir.path.exists()
        run.user_files = run.dir.prepare(force)
        run.dir.claim([])  # from here on the manifest says which files are graft's
    else:
        run.user_files = sorted(p.name for p in run.dir.path.iterdir())
        for leftover in run.dir.path.glob(".*.tmp"):  # half-written files of the interruption
            leftover.unlink(missing_ok=True)
    run.tracker.start()
    run.tracker.params(run.config.to_dict())
    for where in run.tracker.where:
        run.reporter.info(f"Tracking: {where}")
    torch.manual_seed(run.config.seed)
    np.random.seed(run.config.seed)
    if run.resume:
        data, split = data_from_split(run.dir.path, data_root)
        saved = run.dir.read_config()
        if data_root is not None and saved.get("data_root") != str(data.root):
            # the data moved: later commands (evaluate, report) look where it is now
            run.dir.write_config({**saved, "data_root": str(data.root)})
        run.reporter.info(f"Resuming {run.dir.path}: {len(data.paths)} images from its split.csv")
        return data, split
    assert data is not None
    run.dir.write_skipped(data.skipped)
    if data.skipped:  # said here too, not only in skipped.csv
        shown = "; ".join(f"{p}: {why}" for p, why in data.skipped[:5])
        more = f"; and {len(data.skipped) - 5} more" if len(data.skipped) > 5 else ""
        run.reporter.warn(
            f"{len(data.skipped)} file(s) or row(s) could not be used and are left out "
            f"(listed in {run.dir.path / 'skipped.csv'}): {shown}{more}"
        )
    for warning in data.warnings:
        run.reporter.warn(warning)
    from .plots import plot_class_counts

    plot_class_counts(data.counts, run.dir / "class_counts.png")
    return data, Split([])  # the split waits for the audit (fill_caches)


def _check_trainable(data: ScanResult) -> None:
    """A folder that cannot make a classifier is refused before anything is written."""
    from .data import MIN_PER_CLASS

    if len(data.classes) < 2:
        raise DataError(
            f"{data.root} has only one class folder ({data.classes[0]!r}): a classifier needs "
            "at least two. Add a folder of images for each other class."
        )
    small = [f"'{k}' ({v})" for k, v in data.counts.items() if v < MIN_PER_CLASS]
    if small:
        raise SplitError(
            "Too few images for a stratified train/validation/test split in: "
            f"{', '.join(small)}. Each class needs at least {MIN_PER_CLASS} images (20 or more "
            "gives meaningful numbers). Add images or remove those classes."
        )


# --------------------------------------------------------------------------- 2. model and plan


def build(run: Run, data: ScanResult) -> tuple[GraftModel, str, Device]:
    """The pretrained backbone with a new head, on the chosen device."""
    from .detail import new_model_info

    config = run.config
    info = new_model_info(config, data, reporter=run.reporter)
    model, weights_source = build_model(
        info, config.pretrained, config.weights, config.allow_download
    )
    device = choose_device()
    model.to(device.device)
    if device.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, weights_source, device


# --------------------------------------------------------------------------- 3. caches


def fill_caches(
    run: Run,
    model: GraftModel,
    weights_source: str,
    device: Device,
    plan: Plan,
    data: ScanResult,
    split: Split,
) -> tuple[Split, Features]:
    """Run the frozen part once per image and view, through the on-disk cache; a new run
    audits the clean pass for duplicates and splits on it."""
    config, reporter = run.config, run.reporter
    reporter.info(f"Backbone {config.backbone} ({weights_source}); engine: {device.reason}")
    reporter.info("Plan: " + plan.text)
    t0 = time.perf_counter()
    model.eval()
    frozen = FrozenFeatures(
        model,
        weights_source,
        plan.extract_at,
        cache_dir=config.cache_dir,
        augment=config.augment,
        seed=config.seed,
        workers=run.workers,
        device=device,
        reporter=reporter,
        ddp=run.ddp,
    )
    # Every image once, unaugmented: the validation/test inputs, view 0 of the training
    # images, and the embeddings the duplicate audit compares.
    clean = frozen.views(data, range(len(data.paths)))
    pooled: torch.Tensor | None = None
    if not run.resume:
        embeddings = (
            clean if not plan.cache_cut else pool_cached(model, clean, plan.extract_at, device)
        )
        with run.phase("audit"):
            split = audit_and_split(
                run, data, embeddings.numpy(), split, weights_source, device, plan
            )
        pooled = embeddings if plan.cache_cut else None
        del embeddings  # (it may be `clean` itself, which is let go below)
    idx = {s: split.indices(s) for s in ("train", "val", "test")}
    labels = {
        s: torch.tensor([data.labels[i] for i in ix], dtype=torch.long) for s, ix in idx.items()
    }
    train_counts = [int((labels["train"] == c).sum()) for c in range(len(data.classes))]
    weights, weights_note = class_weights_for(train_counts, config.class_weights)
    reporter.info(
        f"{len(data.paths)} images in {len(data.classes)} classes -> "
        f"train {len(idx['train'])} / validation {len(idx['val'])} / test {len(idx['test'])} "
        f"({'grouped' if split.grouped else 'stratified'}, seed {config.seed}); "
        f"class weights: {weights_note}"
    )
    if frozen.cache.folder is not None:
        # The audit is done: read the subsets back from the memory-mapped cache instead of
        # copying them out of `clean`, so memory never holds the cache twice.
        del clean
        counted = frozen.cache.hits  # re-reading what this run just stored is not a reuse
        train_clean, val_maps, test_maps = (frozen.views(data, idx[s]) for s in SUBSETS)
        frozen.cache.hits = counted
    else:
        train_clean, val_maps, test_maps = (clean[idx[s]] for s in SUBSETS)
        del clean
    augmented = (
        frozen.augmented_views(data, idx["train"], plan.views, "Caching augmented views")
        if plan.views > 1
        else []
    )
    train_views = train_clean[None] if plan.views == 1 else torch.stack([train_clean, *augmented])
    del train_clean, augmented
    paths = {s: [data.paths[i] for i in ix] for s, ix in idx.items()}
    features = Features(paths, labels, train_views, val_maps, test_maps, weights, weights_note)
    features.frozen = frozen
    if pooled is not None:  # the audit's pooled clean images: stage 1 need not pool them again
        features.pooled_clean = {s: pooled[idx[s]] for s in ("train", "val")}
        del pooled
    if config.unseen:
        watch_unseen(run, data, frozen, features)
    if device.channels_last:
        model.to(memory_format=torch.channels_last)
    reporter.info(
        "Frozen forward passes: "
        + (" and ".join(frozen.engines_used) or "none (every output came from the cache)")
    )
    cache = frozen.cache
    reporter.info(
        f"Feature cache: {cache.hits} reused, {cache.misses} computed "
        f"({cache.folder or 'in memory only'})"
    )
    audit = run.timings.get("audit_seconds", 0.0)  # inside this function, timed apart
    run.timings.update(
        cache_seconds=time.perf_counter() - t0 - audit,
        cache_hits=cache.hits,
        cache_misses=cache.misses,
    )
    return split, features


SUBSETS = ("train", "val", "test")


def audit_and_split(
    run: Run,
    data: ScanResult,
    embeddings: np.ndarray,
    split: Split,
    weights_source: str,
    device: Device,
    plan: Plan,
) -> Split:
    """The duplicate audit on the clean pass, then the split (unless --backbone auto made
    it already); writes split.csv, audit.json, the example pairs and config.json."""
    from .audit import audit_for_split, check_split, draw_examples, explain
    from .split import split_new_run, write_split

    config, reporter, rundir = run.config, run.reporter, run.dir
    if split.subsets:  # --backbone auto made it on the same audit
        report = audit_for_split(config, data, embeddings)
    else:
        split, report = split_new_run(config, data, embeddings, reporter)
    split_record = write_split(rundir.split, data, split.subsets, split.groups)
    check_split(report, split.subsets, data.given)  # and across the user's own split
    findings = explain(report, data.classes, data.labels, data.paths, data.root, data.layout)
    for finding in findings:
        reporter.warn(finding)
    if split.note:
        reporter.info(split.note)
    for problem in split.problems:
        reporter.warn(f"Split not stratified within bounds: {problem}.")
    draw_examples(
        report, data.paths, data.labels, split.subsets, rundir / "leakage_pairs.png", data.root
    )
    rundir.write_json(
        rundir.audit.name,
        {
            **report.to_dict(data.paths, data.root),
            "findings": findings,
            "grouping": split.note or "none: images split one by one",
            "split_source": split.source,  # which parts the user made, which graft carved
        },
    )
    rundir.write_config(
        {
            **config.to_dict(),
            "data_root": str(data.root),
            "classes": data.classes,
            "split_csv": split_record,  # rows and sha256: graft.integrity checks them
            "weights_source": weights_source,
            "engine": device.reason,
            "plan": plan.text,
            "world_size": run.ddp.world,
            "versions": versions(),
        }
    )
    return split


def watch_unseen(run: Run, data: ScanResult, frozen: FrozenFeatures, features: Features) -> None:
    """Images from elsewhere (--unseen): cached and watched after every epoch; used for no
    choice but the 'unknown' threshold (graft.familiarity)."""
    unseen = scan(run.config.unseen, classes=data.classes)  # type: ignore[arg-type]
    for path, reason in unseen.skipped:
        run.reporter.warn(f"--unseen: skipped {path}: {reason}")
    if not unseen.paths:
        raise DataError(f"--unseen {run.config.unseen} holds no usable images.")
    features.unseen = unseen
    features.unseen_maps = frozen.views(
        unseen, range(len(unseen.paths)), label="Computing features of the --unseen images"
    )
    features.unseen_labels = torch.tensor(unseen.labels, dtype=torch.long)
    run.reporter.info(
        f"--unseen: {len(unseen.paths)} images from {run.config.unseen}, evaluated after "
        "every epoch (reported; used for no choice but the 'unknown' threshold)."
    )


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import timm
    import torchvision

    return {
        "graft": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        # from the metadata: importing scikit-learn costs a training run about 1 s
        "scikit-learn": version("scikit-learn"),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
