"""Stage 1 (frozen: only the head learns) and stage 2 (fine-tune: the last blocks too),
epoch by epoch, with early stopping, model selection and a checkpoint after every epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .checkpoint import Best, load_checkpoint, restore_checkpoint, save_checkpoint
from .device import Device
from .errors import DivergedError
from .features import pool_cached
from .loading import ImageFiles, transform_for
from .loop import (
    NO_EVAL,
    CachedBatches,
    CachedEval,
    ImageBatches,
    ImageEval,
    l2sp_penalty,
    make_optimizer,
    train_one_epoch,
    wrap_ddp,
)
from .model import GraftModel, Top
from .plan import Features, Plan, Run
from .rundir import EpochRecord
from .schedule import StepSchedule
from .wise import mix_weights, wise_anchor

__all__ = ["Stage", "run_stages"]


@dataclass
class Stage:
    """One stage's inputs: what learns, on which batches, validated how."""

    name: str
    index: int
    epochs: int
    lr: float
    title: str
    optimizer: torch.optim.Optimizer
    net: nn.Module
    batches: CachedBatches | ImageBatches
    validate: CachedEval | ImageEval
    unseen: CachedEval | ImageEval | None
    penalty: Any = None
    schedule: StepSchedule | None = None
    #: stage 1 solved as a linear probe (graft.probe) instead of trained epoch by epoch
    probe: bool = False


def run_stages(
    run: Run, model: GraftModel, device: Device, plan: Plan, features: Features
) -> tuple[list[EpochRecord], Best]:
    """Stage 1 (frozen) then stage 2 (fine-tune); each keeps the best epoch so far."""
    config, reporter = run.config, run.reporter
    weights = features.class_weights
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device.device) if weights is not None else None)
    history: list[EpochRecord] = []
    best = Best(model, run.dir.model)
    generators = {"generator": torch.Generator(), "loader": torch.Generator()}
    generators["generator"].manual_seed(config.seed)
    state = load_checkpoint(run.dir.checkpoint) if run.resume else None
    if state is not None:
        history.extend(EpochRecord(**r) for r in state["history"])
        best.resume(state["best"], state["tensors"])
        reporter.info(
            f"Continuing after {state['stage']} epoch {state['epoch']} "
            f"({len(history)} epochs done)."
        )
    elif run.resume:
        reporter.info("No finished epoch to continue from: starting the stages afresh.")
    for index, name in enumerate(plan.stages):
        if state is not None and plan.stages.index(state["stage"]) > index:
            continue  # finished before the interruption
        # Each stage's randomness (dropout, batch order, augmentation) starts from the seed,
        # so a resumed run enters a stage exactly as an uninterrupted one does.
        # (Dropout draws differ per rank, so the shards of a batch get independent masks.)
        torch.manual_seed(config.seed + index + 7919 * run.ddp.rank)
        for g in generators.values():
            g.manual_seed(config.seed + index)
        t = time.perf_counter()
        stage = prepare_stage(run, model, device, plan, features, name, index, generators)
        if name == "fine-tune":  # the frozen-stage model, for --wise
            run.anchor = wise_anchor(model, best, state, config.wise != "off")
        if stage.probe:
            run_probe(run, model, device, stage, history, best, generators, state)
        else:
            run_stage(run, model, device, stage, history, best, loss_fn, generators, state)
        if name == "fine-tune" and config.wise != "off" and history[-1].stage == name:
            if state is not None and state["stage"] == name and state["stage_done"]:
                # resumed after the last epoch: its weights are the checkpoint's
                tensors = state["tensors"]
                model.load_state_dict(
                    {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False
                )
            run.wise = mix_weights(
                run, model, run.anchor, stage.validate, best, device, history[-1].step
            )
        run.timings[f"{name}_seconds"] = time.perf_counter() - t
        best.restore()
    return history, best


def prepare_stage(
    run: Run,
    model: GraftModel,
    device: Device,
    plan: Plan,
    features: Features,
    name: str,
    index: int,
    generators: dict[str, torch.Generator],
) -> Stage:
    """Freeze or unfreeze, and choose the stage's parameters, batches and validation."""
    config, ddp, weights = run.config, run.ddp, features.class_weights
    rank, world = (ddp.rank, ddp.world) if ddp.active else (0, 1)
    if name == "frozen":
        model.freeze_backbone()
        train, val, unseen = features.train, features.val, features.unseen_maps
        if plan.cache_cut:  # pool the cut activations through the frozen top once
            # the clean view and validation were pooled by the audit already, when it ran
            known = features.pooled_clean or {}
            train = torch.stack(
                [
                    known["train"]
                    if k == 0 and "train" in known
                    else pool_cached(model, v, plan.extract_at, device)
                    for k, v in enumerate(train)
                ]
            )
            val = known.get("val")
            if val is None:
                val = pool_cached(model, features.val, plan.extract_at, device)
            unseen = (
                pool_cached(model, unseen, plan.extract_at, device) if unseen is not None else None
            )
        batches: CachedBatches | ImageBatches = CachedBatches(
            train,
            features.labels["train"],
            config.batch_size,
            generators["generator"],
            weights,
            rank,
            world,
        )
        validate: CachedEval | ImageEval = CachedEval(val, features.labels["val"], plan.n_blocks)
        watch = (
            CachedEval(unseen, features.unseen_labels, plan.n_blocks)
            if unseen is not None
            else None
        )
        params: Any = model.head.parameters()
        lr, cut, below = config.lr, plan.n_blocks, False
        title = (
            f"Stage 1: frozen {config.backbone}, training the head "
            f"(lr {config.lr:g}, batch {config.batch_size})"
        )
    else:
        model.unfreeze(plan.unfreeze)
        # Discriminative learning rates: the head moves faster than the pretrained
        # blocks under it, which change only a little (they know more than this data).
        head_lr = config.fine_tune_head_lr or 10 * config.fine_tune_lr
        params = [
            {"params": [p for p in model.backbone.parameters() if p.requires_grad]},
            {"params": list(model.head.parameters()), "lr": head_lr},
        ]
        lr, cut, below = config.fine_tune_lr, plan.cut, not plan.cache_cut
        title = (
            f"Stage 2: fine-tuning the last {plan.unfreeze} of {plan.n_blocks} blocks "
            f"(lr {config.fine_tune_lr:g}, batch {config.fine_tune_batch_size})"
        )
        batches, validate, watch = fine_tune_inputs(run, model, plan, features, generators)
    optimizer = make_optimizer(params, config.optimizer, lr, config.weight_decay)
    penalty = l2sp_penalty(model, config.l2sp) if name == "fine-tune" and config.l2sp else None
    # after (un)freezing: DDP syncs the parameters that learn
    net = wrap_ddp(model, cut, below, device) if ddp.active else Top(model, cut, below)
    epochs = config.epochs if name == "frozen" else config.fine_tune_epochs
    probe = name == "frozen" and uses_probe(config.head_solver, config.head)
    if probe:
        title = (
            f"Stage 1: frozen {config.backbone}, the linear head solved exactly (L-BFGS on "
            f"{batches.views.shape[0]} view(s) of each image) from strong to weak L2, "  # type: ignore[union-attr]
            "picked on validation"
        )
    schedule = (
        StepSchedule(optimizer, config.schedule, len(batches), epochs, config.warmup)
        if config.schedule != "constant" and not probe
        else None
    )
    if schedule is not None:
        title += f", {config.schedule} schedule"
    return Stage(
        name, index, epochs, lr, title, optimizer, net, batches, validate, watch, penalty,
        schedule, probe,
    )  # fmt: skip


def uses_probe(solver: str, head: str) -> bool:
    """Whether stage 1 is the exact linear probe: only a linear head is a convex problem."""
    return solver == "probe" or (solver == "auto" and head == "linear")


def fine_tune_inputs(
    run: Run,
    model: GraftModel,
    plan: Plan,
    features: Features,
    generators: dict[str, torch.Generator],
) -> tuple[CachedBatches | ImageBatches, CachedEval | ImageEval, CachedEval | ImageEval | None]:
    """Stage 2's batches and validation: cached activations at the cut, or images."""
    config, ddp, weights = run.config, run.ddp, features.class_weights
    labels, unseen = features.labels, features.unseen
    if plan.cache_cut:
        rank, world = (ddp.rank, ddp.world) if ddp.active else (0, 1)
        batches = CachedBatches(
            features.train, labels["train"], config.fine_tune_batch_size,
            generators["generator"], weights, rank, world,
        )  # fmt: skip
        validate = CachedEval(features.val, labels["val"], plan.cut)
        watch = (
            CachedEval(features.unseen_maps, features.unseen_labels, plan.cut)
            if features.unseen_maps is not None
            else None
        )
        return batches, validate, watch
    info = model.info
    train_tf = transform_for(info.preprocessing, config.augment)
    eval_tf = transform_for(info.preprocessing)
    files = ImageFiles(features.paths["train"], labels["train"].tolist(), train_tf, config.img_size)
    batches_i = ImageBatches(
        files, config.fine_tune_batch_size, config.seed, run.workers,
        generators["loader"], run.reporter, ddp,
    )  # fmt: skip
    val_files = ImageFiles(features.paths["val"], labels["val"].tolist(), eval_tf, config.img_size)
    validate_i = ImageEval(val_files, config.seed, run.workers)
    watch_i = None
    if unseen is not None:
        files = ImageFiles(unseen.paths, unseen.labels, eval_tf, config.img_size)
        watch_i = ImageEval(files, config.seed, run.workers)
    return batches_i, validate_i, watch_i


def run_stage(
    run: Run,
    model: GraftModel,
    device: Device,
    stage: Stage,
    history: list[EpochRecord],
    best: Best,
    loss_fn: nn.CrossEntropyLoss,
    generators: dict[str, torch.Generator],
    state: dict[str, Any] | None,
) -> None:
    """The epochs of one stage, with early stopping and a checkpoint after each."""
    config, reporter, ddp = run.config, run.reporter, run.ddp
    eval_loss_fn = nn.CrossEntropyLoss()  # validation loss is unweighted: the honest number
    # Early stopping counts epochs since the validation loss last dropped by more than
    # --min-delta (model selection still takes any drop): on saturated data the loss
    # creeps from 4e-4 to 1e-4 for epochs without changing a single prediction.
    start, stale, progress_loss = 1, 0, best.loss
    if state is not None and state["stage"] == stage.name:
        if state["stage_done"]:
            return
        restore_checkpoint(state, model, stage.optimizer, generators, ddp.rank)
        start, stale = state["epoch"] + 1, state["stale"]
        progress_loss = state.get("progress_loss", best.loss)
    reporter.stage(stage.title)
    for epoch in range(start, stage.epochs + 1):
        t = time.perf_counter()
        if isinstance(stage.batches, ImageBatches):
            stage.batches.set_epoch(epoch)
        schedule = stage.schedule
        before_step = partial(schedule.at, epoch) if schedule is not None else None
        tr = train_one_epoch(
            stage.net, model, stage.batches, stage.optimizer, loss_fn, device, ddp, stage.penalty,
            before_step,
        )  # fmt: skip
        va = stage.validate(model, eval_loss_fn, device)
        un = stage.unseen(model, eval_loss_fn, device) if stage.unseen is not None else NO_EVAL
        lr = schedule.rate(stage.lr) if schedule is not None else stage.lr  # at the epoch's end
        rec = EpochRecord(
            stage.name, epoch, len(history) + 1, *tr, *va, lr, time.perf_counter() - t, *un
        )
        log_row(run, history, rec, best.update(rec), stage.lr)
        progress_loss, stale = progress(rec, progress_loss, stale, config.min_delta)
        stop = bool(config.patience and stale >= config.patience)
        checkpoint(run, model, stage, generators, history, best, epoch, stale, progress_loss, stop)
        if stop:
            reporter.info(
                f"Early stop: validation loss has not dropped by more than "
                f"{config.min_delta:g} for {stale} epochs."
            )
            break


def log_row(
    run: Run, history: list[EpochRecord], rec: EpochRecord, improved: bool, lr: float
) -> None:
    """A finished epoch (or probe point): into the history, on screen, to the trackers;
    a non-finite loss stops the run here."""
    history.append(rec)
    run.dir.write_history(history)
    run.reporter.epoch(rec, improved)
    run.tracker.epoch(rec)
    _stop_if_diverged(rec, lr)


def progress(
    rec: EpochRecord, progress_loss: float, stale: int, min_delta: float
) -> tuple[float, int]:
    """Early stopping's count: rows since the validation loss last dropped by more than
    ``min_delta`` (Keras' min_delta), and the loss that drop is measured from."""
    if rec.val_loss < progress_loss - min_delta:
        return rec.val_loss, 0
    return progress_loss, stale + 1


def _stop_if_diverged(rec: EpochRecord, lr: float) -> None:
    """A NaN or infinite loss never recovers and would be saved as a model that answers
    the same class for every image: stop here, before the epoch's checkpoint. What earlier
    epochs wrote stays for inspection."""
    if math.isfinite(rec.train_loss) and math.isfinite(rec.val_loss):
        return
    raise DivergedError(
        f"The {rec.stage} stage diverged at epoch {rec.epoch}: training loss {rec.train_loss}, "
        f"validation loss {rec.val_loss} (learning rate {lr:g}). The run stopped unfinished "
        "(no test evaluation, no summary); model.safetensors, if any, holds an earlier finite "
        "epoch. Lower the learning rate (--lr / --fine-tune-lr) or --l2sp, check the images, "
        "and train again with --force."
    )


def checkpoint(
    run: Run,
    model: GraftModel,
    stage: Stage,
    generators: dict[str, torch.Generator],
    history: list[EpochRecord],
    best: Best,
    epoch: int,
    stale: int,
    progress_loss: float,
    stop: bool,
) -> None:
    """What a resumed run needs to continue after this epoch (graft.checkpoint)."""
    ddp = run.ddp
    save_checkpoint(
        run.dir.checkpoint,
        model,
        stage.optimizer,
        generators,
        ddp.all_gather(torch.get_rng_state()) if ddp.active else [],
        {
            "stage": stage.name,
            "epoch": epoch,
            "stale": stale,
            "progress_loss": progress_loss,
            "stage_done": stop or epoch == stage.epochs,
            "best": best.to_dict(),
            "history": [asdict(r) for r in history],
        },
        best.state,
        run.anchor,
    )


def run_probe(
    run: Run,
    model: GraftModel,
    device: Device,
    stage: Stage,
    history: list[EpochRecord],
    best: Best,
    generators: dict[str, torch.Generator],
    state: dict[str, Any] | None,
) -> None:
    """Stage 1 as a linear probe (graft.probe): one history row per L2 strength, strong to
    weak; the validation loss picks the strength (Best), and the path stops early once
    weaker regularisation has not helped for --patience points. Deterministic, so a run
    interrupted here simply solves it again."""
    from .probe import choose_point, probe_path, set_linear

    config, reporter, ddp = run.config, run.reporter, run.ddp
    if state is not None and state["stage"] == stage.name and state["stage_done"]:
        return
    assert isinstance(stage.batches, CachedBatches) and isinstance(stage.validate, CachedEval)
    eval_loss_fn = nn.CrossEntropyLoss()
    reporter.stage(stage.title)
    stale, progress_loss, t = 0, math.inf, time.perf_counter()
    batches = stage.batches
    points = probe_path(batches.views, batches.labels, batches.weight, seed=config.seed)
    solved: list[tuple[EpochRecord, Any]] = []
    for epoch, point in enumerate(points, 1):
        set_linear(model.head, point)
        if ddp.active:  # every rank solved the same problem; rank 0's answer is the one
            model.head.load_state_dict(ddp.broadcast(model.head.state_dict()))
        va = stage.validate(model, eval_loss_fn, device)
        un = stage.unseen(model, eval_loss_fn, device) if stage.unseen is not None else NO_EVAL
        seconds, t = time.perf_counter() - t, time.perf_counter()
        rec = EpochRecord(
            stage.name, epoch, len(history) + 1, point.train_loss, point.train_acc, *va,
            0.0, seconds, *un, l2=point.l2,
        )  # fmt: skip
        solved.append((rec, point))
        log_row(run, history, rec, False, 0.0)  # the path's choice is made at its end
        progress_loss, stale = progress(rec, progress_loss, stale, config.min_delta)
        if config.patience and stale >= config.patience:
            reporter.info(
                f"The probe stops at L2 {point.l2:g}: weaker regularisation has not lowered "
                f"the validation loss for {stale} strengths."
            )
            break
    rec, point = solved[choose_point([r.val_loss for r, _ in solved], config.min_delta)]
    set_linear(model.head, point)
    if ddp.active:
        model.head.load_state_dict(ddp.broadcast(model.head.state_dict()))
    best.update(rec)
    reporter.info(
        f"Probe: kept L2 {point.l2:g} (validation loss {rec.val_loss:.4f}, accuracy "
        f"{rec.val_acc:.1%}): the strongest within {config.min_delta:g} of the lowest."
    )
    checkpoint(run, model, stage, generators, history, best, history[-1].epoch, 0, best.loss, True)
