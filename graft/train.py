"""Training: the seed's two stages, done right.

    1. scan the folder, split it (stratified, seeded) and write the split to the run folder;
    2. stage 1 ("frozen"): the backbone never changes, so its outputs are computed once per
       image (and per augmented view) and only the new head trains, on those cached features;
    3. stage 2 ("fine-tune"): unfreeze the last N blocks (or all), new optimizer with a much
       lower learning rate and a smaller batch. When only the top blocks learn, the frozen
       bottom's activations are cached too, so an epoch runs just the top;
    4. after every epoch: history row, best-so-far checkpoint (by validation loss);
    5. keep the best epoch of either stage, evaluate it once on the held-out test split,
       plot the curves and write the diagnosis.

BatchNorm layers of the backbone stay in inference mode throughout (see ``GraftModel.train``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .audit import audit, check_split, draw_examples, explain, grouping_ladder
from .backbones import get_spec
from .cache import item_seed, open_cache
from .config import TrainConfig
from .data import (
    ImageFiles,
    build_transform,
    check_split_sizes,
    default_workers,
    find_classes,
    make_group_split,
    make_loader,
    make_split,
    scan,
    write_split,
)
from .distributed import Dist
from .distributed import backend as dist_backend
from .engines import FrozenPart, Runner, make_runner
from .errors import DataError, RunExistsError, RunFolderError, SplitError
from .evaluate import choose_unknown_threshold, fit_temperature
from .io import atomic_save, atomic_write_json, atomic_write_text, read_json
from .model import GraftModel, ModelInfo, build_model
from .progress import Reporter

# Run-folder files graft owns; --force removes exactly these, never anything else.
RUN_FILES = (
    "config.json",
    "split.csv",
    "history.csv",
    "model.safetensors",
    "summary.json",
    "skipped.csv",
    "learning_curves.png",
    "class_counts.png",
    "confusion_matrix.png",
    "evaluation.json",
    "model.onnx",
    "checkpoint.safetensors",
    "audit.json",
    "leakage_pairs.png",
    "reliability.png",
    "top_losses.png",
    "report.html",
)
#: Cache activations at the fine-tuning cut only while they fit in this many bytes.
CUT_CACHE_BUDGET = int(os.environ.get("GRAFT_CUT_CACHE_MB", "2048")) * 2**20


# --------------------------------------------------------------------------- engine choice


@dataclass
class Engine:
    """Where and how tensors are computed; chosen once, printed for the user."""

    device: torch.device
    autocast: torch.dtype | None
    channels_last: bool
    reason: str

    def context(self) -> Any:
        if self.autocast is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def choose_engine() -> Engine:
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Engine(
            torch.device("cuda"),
            dtype,
            True,
            f"CUDA ({torch.cuda.get_device_name()}), {str(dtype).split('.')[1]} autocast",
        )
    if _cpu_has_bf16():
        return Engine(
            torch.device("cpu"),
            torch.bfloat16,
            True,
            "CPU with native bf16: bf16 autocast + channels_last",
        )
    # Without native bf16 (e.g. AVX2-only CPUs) bf16 autocast is ~25x slower, not faster.
    return Engine(torch.device("cpu"), None, True, "CPU without native bf16: fp32 + channels_last")


# --------------------------------------------------------------------------- results


@dataclass
class EpochRecord:
    stage: str
    epoch: int  # within its stage, from 1
    step: int  # across both stages, from 1: the curves' time axis
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float
    # on the --unseen folder (images from elsewhere); never used to choose anything
    unseen_loss: float = math.nan
    unseen_acc: float = math.nan

    FIELDS = (
        "stage",
        "epoch",
        "step",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "lr",
        "seconds",
        "unseen_loss",
        "unseen_acc",
    )


@dataclass
class TrainResult:
    run_dir: Path
    classes: list[str]
    history: list[EpochRecord]
    summary: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- run folder


def prepare_run_dir(out: Path, force: bool) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunExistsError(f"{out} exists and is a file. Choose another --out.")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise RunExistsError(
                f"Run folder {out} already exists and is not empty. Choose another --out, or "
                "pass --force to replace the run in it."
            )
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "predictions", ignore_errors=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def write_history(path: Path, history: list[EpochRecord]) -> None:
    fields = EpochRecord.FIELDS
    if not any(math.isfinite(r.unseen_acc) for r in history):
        fields = tuple(f for f in fields if not f.startswith("unseen_"))
    lines = [",".join(fields)]
    for r in history:
        values = [getattr(r, f) for f in fields]
        lines.append(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values))
    atomic_write_text(path, "\n".join(lines) + "\n")


def class_weights_for(counts: list[int], mode: str) -> tuple[torch.Tensor | None, str]:
    """Inverse-frequency weights (mean 1) when asked, or when ``auto`` sees >2x imbalance."""
    ratio = max(counts) / max(1, min(counts))
    if mode == "none" or (mode == "auto" and ratio <= 2.0):
        why = "off" if mode == "none" else f"off (classes within {ratio:.1f}x of each other)"
        return None, why
    c = torch.tensor(counts, dtype=torch.float32)
    w = c.sum() / (len(counts) * c)
    return w, f"inverse frequency (largest/smallest = {ratio:.1f}x)"


# --------------------------------------------------------------------------- caching


@torch.no_grad()
def extract(
    runner: Runner,
    dataset: ImageFiles,
    batch_size: int,
    workers: int,
    seed: int,
    reporter: Reporter,
    label: str,
) -> torch.Tensor:
    """Run the frozen part of the backbone once over ``dataset``; returns its outputs in
    dataset order (activations at the cut, or pooled feature vectors)."""
    loader = make_loader(dataset, batch_size, shuffle=False, seed=seed, workers=workers)
    out: torch.Tensor | None = None
    with reporter.bar(label, len(dataset)) as advance:
        for batch in loader:
            if batch["failed"]:
                # Files were checked by scan; one that breaks now (changed on disk) is fatal
                # for a cache that must hold every image, so say which one.
                index, reason = batch["failed"][0]
                raise DataError(f"{dataset.paths[index]} could not be read any more: {reason}")
            maps = runner(batch["images"])
            if out is None:
                out = torch.empty((len(dataset), *maps.shape[1:]), dtype=torch.float32)
            out[batch["index"]] = maps
            advance(len(batch["index"]))
    assert out is not None
    return out


def _top_forward(model: GraftModel, maps: torch.Tensor, cut: int) -> torch.Tensor:
    """Logits from activations cached at block ``cut``."""
    blocks = model.backbone.blocks
    if cut == len(blocks):
        return model.head(maps)
    return model.head(model.backbone.forward_maps(maps, start=cut).mean(dim=(2, 3)))


# --------------------------------------------------------------------------- epochs


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


class Top(nn.Module):
    """The learning part of the model as one module (what DDP wraps): blocks from ``cut`` up
    and the head. ``below=True`` also runs the frozen blocks under it, without gradients."""

    def __init__(self, model: GraftModel, cut: int, below: bool = False):
        super().__init__()
        self.model, self.cut, self.below = model, cut, below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.below and self.cut > 0:
            with torch.no_grad():
                x = _run_blocks(self.model, x, 0, self.cut)
        if self.below and self.cut == 0:
            return self.model(x)
        return _top_forward(self.model, x, self.cut)


def wrap_ddp(model: GraftModel, cut: int, below: bool, ddp: Dist, engine: Engine) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [engine.device.index or 0] if engine.device.type == "cuda" else None
    # BatchNorm statistics are frozen (identical on every rank): nothing to broadcast.
    return DistributedDataParallel(
        Top(model, cut, below), device_ids=ids, forward_sync_buffers=False
    )


def train_epoch_cached(
    model: GraftModel,
    views: torch.Tensor,
    labels: torch.Tensor,
    cut: int,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    batch_size: int,
    generator: torch.Generator,
    engine: Engine,
    ddp: Dist | None = None,
    net: nn.Module | None = None,
    penalty: Any = None,
) -> tuple[float, float]:
    """One epoch on cached activations ``views[K, N, ...]``: each image appears once, as one of
    its K cached augmented views picked at random.

    Under torchrun every rank draws the same batches and trains on its share of each (``net``
    is the DDP-wrapped :class:`Top`); the loss is normalised by the whole batch, so DDP's
    gradient average is the single-process gradient."""
    model.train()
    n = views.shape[1]
    pick = torch.randint(0, views.shape[0], (n,), generator=generator)
    total_loss, correct = 0.0, 0
    distributed = ddp is not None and ddp.active and net is not None
    rank, world = (ddp.rank, ddp.world) if distributed and ddp is not None else (0, 1)
    weight = loss_fn.weight
    for idx in _batches(n, batch_size, generator):
        local = idx[rank::world]
        x = engine.prepare(views[pick[local], local])
        y = labels[local].to(engine.device)
        # The (class-weighted) mean over the whole batch, whichever rank holds which part:
        # each rank sums its share and divides by the whole batch's weight, times the world
        # size that DDP's gradient average divides by again.
        whole = float(weight[labels[idx]].sum()) if weight is not None else float(len(idx))
        with engine.context():
            logits = net(x) if distributed and net is not None else _top_forward(model, x, cut)
        loss = nn.functional.cross_entropy(logits.float(), y, weight=weight, reduction="sum")
        loss = loss / (whole / world)
        optimizer.zero_grad(set_to_none=True)
        # the penalty is the same on every rank: DDP's average keeps it once
        (loss + penalty() if penalty is not None else loss).backward()
        optimizer.step()
        total_loss += loss.item() / world * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
    if distributed and ddp is not None:
        correct = ddp.sum([float(correct)])[0]
        total_loss = ddp.sum([total_loss])[0]
    return total_loss / n, correct / n


def train_epoch_images(
    model: GraftModel,
    loader: Any,
    cut: int,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    engine: Engine,
    reporter: Reporter,
    label: str,
    ddp: Dist | None = None,
    net: nn.Module | None = None,
    penalty: Any = None,
) -> tuple[float, float]:
    """One epoch on decoded, augmented images; blocks below ``cut`` run without gradients.
    Under torchrun the loader's sampler gives each rank its share and ``net`` is DDP."""
    model.train()
    total_loss, correct, n = 0.0, 0, 0
    with reporter.bar(label, len(loader.dataset)) as advance:
        for batch in loader:
            if len(batch["index"]) == 0:
                continue
            x, y = engine.prepare(batch["images"]), batch["labels"].to(engine.device)
            with engine.context():
                if net is not None:
                    logits = net(x)
                elif cut > 0:
                    with torch.no_grad():
                        x = _run_blocks(model, x, 0, cut)
                    logits = _top_forward(model, x, cut)
                else:
                    logits = model(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            (loss + penalty() if penalty is not None else loss).backward()
            optimizer.step()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
            advance(len(batch["index"]))
    if ddp is not None and ddp.active:
        total_loss, correct, n = ddp.sum([total_loss, float(correct), float(n)])
    return total_loss / max(1, n), correct / max(1, n)


def _run_blocks(model: GraftModel, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    for block in model.backbone.blocks[start:stop]:
        x = block(x)
    return x


@torch.no_grad()
def evaluate_cached(
    model: GraftModel,
    maps: torch.Tensor,
    labels: torch.Tensor,
    cut: int,
    loss_fn: nn.Module,
    engine: Engine,
) -> tuple[float, float]:
    model.eval()
    logits = _logits_cached(model, maps, cut, engine)
    return loss_fn(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


@torch.no_grad()
def evaluate_images(
    model: GraftModel, loader: Any, loss_fn: nn.Module, engine: Engine
) -> tuple[float, float]:
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    for batch in loader:
        if len(batch["index"]) == 0:
            continue
        x, y = engine.prepare(batch["images"]), batch["labels"].to(engine.device)
        with engine.context():
            logits = model(x).float()
        total_loss += loss_fn(logits, y).item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    return total_loss / max(1, n), correct / max(1, n)


def l2sp_penalty(model: GraftModel, alpha: float) -> Any:
    """L2-SP (Li et al., 2018): ``alpha/2 * ||w - w_pretrained||^2`` over the backbone weights
    that learn, pulling fine-tuning back toward what the backbone knew. Call it after
    unfreezing, while the weights are still the pretrained ones."""
    pairs = [(p, p.detach().clone()) for p in model.backbone.parameters() if p.requires_grad]

    def penalty() -> torch.Tensor:
        return 0.5 * alpha * sum(((p - p0) ** 2).sum() for p, p0 in pairs)  # type: ignore[return-value]

    return penalty


def make_optimizer(params: Any, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = list(params)
    if params and isinstance(params[0], dict):  # parameter groups (own learning rates)
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay or 1e-2)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


# --------------------------------------------------------------------------- the run


class _Best:
    """Tracks the best validation loss across both stages and checkpoints it."""

    def __init__(self, model: GraftModel, path: Path):
        self.model, self.path = model, path
        self.loss, self.step, self.stage = math.inf, 0, ""
        self.state: dict[str, torch.Tensor] = {}

    def update(self, record: EpochRecord) -> bool:
        if record.val_loss < self.loss - 1e-6:
            self.loss, self.step, self.stage = record.val_loss, record.step, record.stage
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.save(self.path)
            return True
        return False

    def restore(self) -> None:
        if self.state:
            self.model.load_state_dict(self.state)

    def resume(self, tensors: dict[str, torch.Tensor]) -> None:
        """After a restart: the best weights are the (still pretrained) model with the
        checkpoint's ``best.*`` tensors on top. They are written back to disk, because the
        interrupted run may have saved a newer epoch's weights before its checkpoint."""
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.state.update({k[5:]: v for k, v in tensors.items() if k.startswith("best.")})
        self.model.save(self.path, self.state)


def fit(
    config: TrainConfig,
    data_root: str | Path,
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

    ddp = setup()  # a no-op unless started by torchrun
    out, reporter = Path(out), reporter or Reporter()
    scratch: Path | None = None
    if not ddp.main:
        # Only rank 0 writes the run folder; the others write into a scratch copy.
        scratch = Path(tempfile.mkdtemp(prefix=f"graft-rank{ddp.rank}-"))
        if resume:
            for name in ("config.json", "split.csv", "audit.json", CHECKPOINT):
                if (out / name).is_file():
                    shutil.copy2(out / name, scratch / name)
        out, reporter, force = scratch, Reporter(verbose=False), True
    # MLflow's experiment: the data folder's name (on --resume it comes from the run folder)
    saved = out / "config.json"
    root = data_root or (read_json(saved).get("data_root") if saved.is_file() else None) or out
    names = parse_track(config.track) if ddp.main else ()
    tracker = Tracker(names, out, Path(root).resolve().name)
    try:
        return _fit(config, data_root, out, force, reporter, resume, tracker, ddp)
    except BaseException:
        tracker.abort()
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        teardown(ddp)


def _fit(
    config: TrainConfig,
    data_root: str | Path,
    out: Path,
    force: bool,
    reporter: Reporter,
    resume: bool,
    tracker: Any,
    ddp: Dist,
) -> TrainResult:
    started = time.perf_counter()
    if not resume:
        find_classes(data_root)  # a wrong data path fails before any run folder is made
        prepare_run_dir(out, force)
    else:
        for leftover in out.glob(".*.tmp"):  # half-written files of the interrupted run
            leftover.unlink(missing_ok=True)
    tracker.start()
    tracker.params(config.to_dict())
    for where in tracker.where:
        reporter.info(f"Tracking: {where}")
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    workers = default_workers() if config.workers < 0 else config.workers

    # 1. data ------------------------------------------------------------------------
    if resume:
        data, subsets, groups = _data_from_split(out, data_root)
        reporter.info(f"Resuming {out}: {len(data.paths)} images from its split.csv")
    else:
        data = scan(data_root, progress=reporter.iter)
        _write_skipped(out / "skipped.csv", data)
        for warning in data.warnings:
            reporter.warn(warning)
        from .plots import plot_class_counts

        plot_class_counts(data.counts, out / "class_counts.png")
    everything = list(range(len(data.paths)))

    def split_from(report: Any) -> tuple[list[str], list[str] | None, str]:
        if _groups_by_clusters(config, report):
            return _cluster_split(config, data, report, reporter)
        groups, group_note = _resolve_groups(config, data)
        if groups is not None:
            subsets = make_group_split(
                data.labels, groups, data.classes, config.test_size, config.val_size, config.seed
            )
            return subsets, groups, group_note
        subsets = make_split(
            data.labels, data.classes, config.test_size, config.val_size, config.seed
        )
        return subsets, None, ""

    choice = None
    if config.backbone == "auto" and not resume:
        from .choose import choose_backbone

        def probe_features(model: GraftModel, name: str, source: str) -> torch.Tensor:
            n = len(model.backbone.blocks)
            spec = get_spec(name)
            probe_cache = open_cache(
                config.cache_dir, name, source, config.img_size, n, n, config.trim
            )
            probe_runner = make_runner(
                FrozenPart(model.backbone, n), config.img_size, choose_engine()
            )
            files = ImageFiles(
                data.paths,
                data.labels,
                build_transform(config.img_size, spec.mean, spec.std, "none", config.trim),
                config.img_size,
            )
            return probe_cache.get_or_compute(
                "clean",
                data.sha256,
                lambda missing: extract(
                    probe_runner,
                    files.subset(missing),
                    64,
                    workers,
                    config.seed,
                    reporter,
                    f"Linear probe: {name} features",
                ),
                ddp,
            )

        def probe_split(embeddings: Any) -> tuple[list[str], list[str] | None, str]:
            return split_from(_audit(config, data, embeddings))

        choice = choose_backbone(config, data, probe_features, probe_split, reporter)
        config = replace(config, backbone=choice.backbone)
        reporter.info(choice.describe())

    # 2. model and plan ---------------------------------------------------------------
    spec = get_spec(config.backbone)
    info = ModelInfo(
        config.backbone,
        config.img_size,
        spec.mean,
        spec.std,
        tuple(data.classes),
        config.head,
        config.dropout,
        trim=config.trim,
    )
    model, weights_source = build_model(
        info, config.pretrained, config.weights, config.allow_download
    )
    engine = choose_engine()
    model.to(engine.device)
    if engine.channels_last:
        model.to(memory_format=torch.channels_last)
    n_blocks = len(model.backbone.blocks)
    unfreeze = n_blocks if config.unfreeze == "all" else min(int(config.unfreeze), n_blocks)
    cut = n_blocks - unfreeze if config.fine_tune_epochs else n_blocks
    eval_tf = build_transform(config.img_size, spec.mean, spec.std, "none", config.trim)
    train_tf = build_transform(config.img_size, spec.mean, spec.std, config.augment, config.trim)
    n_views = 1 if config.augment == "none" else config.views
    n_train = len(everything) * (1 - config.test_size - config.val_size)
    cut_bytes = _activation_bytes(model, cut, config.img_size) * (
        (n_views - 1) * n_train + len(everything)
    )
    cache_cut = 0 < cut < n_blocks and cut_bytes <= CUT_CACHE_BUDGET
    if not cache_cut and 0 < cut < n_blocks:
        reporter.info(
            f"Activations at the cut would take {cut_bytes / 2**20:.0f} MB: fine-tuning "
            "runs on images, with the frozen blocks under no_grad."
        )
    extract_at = cut if cache_cut else n_blocks
    plan = _describe_plan(config, n_blocks, unfreeze, n_views, cache_cut, workers)
    if ddp.active:
        plan += (
            f" Distributed: {ddp.world} processes ({dist_backend()}); the backbone passes and "
            "each batch are split across them."
        )
    reporter.info(f"Backbone {config.backbone} ({weights_source}); engine: {engine.reason}")
    reporter.info("Plan: " + plan)

    # 3. run the frozen part once per image (and view), through the on-disk cache -------
    t0 = time.perf_counter()
    model.eval()
    cache = open_cache(
        config.cache_dir,
        config.backbone,
        weights_source,
        config.img_size,
        extract_at,
        n_blocks,
        config.trim,
    )
    notes: list[str] = []
    runner = make_runner(
        FrozenPart(model.backbone, extract_at), config.img_size, engine, notes=notes
    )
    for note in notes:
        reporter.warn(note)
    reporter.info(f"Frozen forward passes: {runner.name}")

    def cached(
        indices: list[int], view: int, transform: Any, label: str, source: Any = None
    ) -> torch.Tensor:
        source = source or data
        shas = [source.sha256[i] for i in indices]
        name = "clean" if view == 0 else f"{config.augment}-seed{config.seed}-view{view}"
        seeds = [item_seed(h, view, config.seed) for h in shas] if view else None
        files = ImageFiles(
            [source.paths[i] for i in indices],
            [source.labels[i] for i in indices],
            transform,
            config.img_size,
            seeds,
        )
        return cache.get_or_compute(
            name,
            shas,
            lambda missing: extract(
                runner, files.subset(missing), 64, workers, config.seed, reporter, label
            ),
            ddp,
        )

    # Every image once, unaugmented: the validation/test inputs, view 0 of the training
    # images, and the embeddings the duplicate audit compares.
    clean = cached(everything, 0, eval_tf, "Computing backbone features")

    # 4. audit for duplicates and leakage, then split -----------------------------------
    if not resume:
        embeddings = (
            clean if extract_at == n_blocks else _pool_top(model, clean, extract_at, engine)
        )
        report = _audit(config, data, embeddings.numpy())
        del embeddings  # (it may be `clean` itself, which step 5 lets go)
        if choice is not None:  # --backbone auto made the split before choosing
            subsets, groups, group_note = choice.subsets, choice.groups, choice.group_note
        else:
            subsets, groups, group_note = split_from(report)
        write_split(out / "split.csv", data, subsets, groups)
        check_split(report, subsets)
        findings = explain(report, data.classes, data.labels, data.paths)
        for finding in findings:
            reporter.warn(finding)
        if group_note:
            reporter.info(group_note)
        draw_examples(
            report, data.paths, data.labels, subsets, out / "leakage_pairs.png", data.root
        )
        atomic_write_json(
            out / "audit.json",
            {
                **report.to_dict(data.paths, data.root),
                "findings": findings,
                "grouping": group_note or "none: images split one by one",
            },
        )
        atomic_write_json(
            out / "config.json",
            {
                **config.to_dict(),
                "data_root": str(data.root),
                "classes": data.classes,
                "weights_source": weights_source,
                "engine": engine.reason,
                "plan": plan,
                "world_size": ddp.world,
                "versions": _versions(),
            },
        )
    idx = {s: [i for i, sub in enumerate(subsets) if sub == s] for s in ("train", "val", "test")}
    paths = {s: [data.paths[i] for i in ix] for s, ix in idx.items()}
    labels = {
        s: torch.tensor([data.labels[i] for i in ix], dtype=torch.long) for s, ix in idx.items()
    }
    train_counts = [int((labels["train"] == c).sum()) for c in range(len(data.classes))]
    weights, weights_note = class_weights_for(train_counts, config.class_weights)
    how = "grouped" if any(groups or []) else "stratified"
    reporter.info(
        f"{len(data.paths)} images in {len(data.classes)} classes -> "
        f"train {len(idx['train'])} / validation {len(idx['val'])} / test {len(idx['test'])} "
        f"({how}, seed {config.seed}); class weights: {weights_note}"
    )

    # 5. augmented views of the training images ----------------------------------------
    if cache.folder is not None:
        # The audit is done: read the subsets back from the memory-mapped cache instead of
        # copying them out of `clean`, so memory never holds the cache twice.
        del clean
        counted = cache.hits  # re-reading what this run just stored is not a reuse
        train_clean = cached(idx["train"], 0, eval_tf, "Computing backbone features")
        val_maps = cached(idx["val"], 0, eval_tf, "Computing backbone features")
        cache.hits = counted
    else:
        train_clean, val_maps = clean[idx["train"]], clean[idx["val"]]
        del clean
    train_views = (
        train_clean[None]
        if n_views == 1
        else torch.stack(
            [train_clean]
            + [
                cached(idx["train"], v, train_tf, f"Caching augmented views ({v + 1}/{n_views})")
                for v in range(1, n_views)
            ]
        )
    )
    del train_clean
    unseen_data, unseen_maps, unseen_labels = None, None, None
    if config.unseen:
        # Images from elsewhere: watched after every epoch, never used to choose anything.
        unseen_data = scan(config.unseen, classes=data.classes)
        for path, reason in unseen_data.skipped:
            reporter.warn(f"--unseen: skipped {path}: {reason}")
        if not unseen_data.paths:
            raise DataError(f"--unseen {config.unseen} holds no usable images.")
        unseen_maps = cached(
            list(range(len(unseen_data.paths))),
            0,
            eval_tf,
            "Computing features of the --unseen images",
            unseen_data,
        )
        unseen_labels = torch.tensor(unseen_data.labels, dtype=torch.long)
        reporter.info(
            f"--unseen: {len(unseen_data.paths)} images from {config.unseen}, evaluated after "
            "every epoch (reported, never used for choices)."
        )
    if engine.channels_last:
        model.to(memory_format=torch.channels_last)
    reporter.info(
        f"Feature cache: {cache.hits} reused, {cache.misses} computed "
        f"({cache.folder or 'in memory only'})"
    )
    timings: dict[str, float] = {
        "cache_seconds": time.perf_counter() - t0,
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
    }

    loss_fn = nn.CrossEntropyLoss(weight=weights.to(engine.device) if weights is not None else None)
    eval_loss_fn = nn.CrossEntropyLoss()  # validation loss is unweighted: the honest number
    history: list[EpochRecord] = []
    best = _Best(model, out / "model.safetensors")
    generator = torch.Generator().manual_seed(config.seed)

    def record(
        stage: str,
        epoch: int,
        tr: tuple[float, float],
        va: tuple[float, float],
        lr: float,
        seconds: float,
        un: tuple[float, float] = (math.nan, math.nan),
    ) -> None:
        rec = EpochRecord(
            stage, epoch, len(history) + 1, tr[0], tr[1], va[0], va[1], lr, seconds, *un
        )
        history.append(rec)
        improved = best.update(rec)
        write_history(out / "history.csv", history)
        reporter.epoch(rec, improved)
        tracker.epoch(rec)

    # 6-7. the two stages: frozen (only the head learns), then fine-tuning -------------
    checkpoint = out / CHECKPOINT
    state = _load_checkpoint(checkpoint) if resume else None
    if state is not None:
        history.extend(EpochRecord(**r) for r in state["history"])
        best.loss, best.step, best.stage = (
            state["best"]["loss"],
            state["best"]["step"],
            state["best"]["stage"],
        )
        best.resume(state["tensors"])
        reporter.info(
            f"Continuing after {state['stage']} epoch {state['epoch']} "
            f"({len(history)} epochs done)."
        )
    elif resume:
        reporter.info("No finished epoch to continue from: starting the stages afresh.")
    stages = [
        s for s, n in (("frozen", config.epochs), ("fine-tune", config.fine_tune_epochs)) if n
    ]
    loader_generator = torch.Generator()
    for stage_index, stage in enumerate(stages):
        if state is not None and stages.index(state["stage"]) > stage_index:
            continue  # finished before the interruption
        # Each stage's randomness (dropout, batch order, augmentation) starts from the seed,
        # so a resumed run enters a stage exactly as an uninterrupted one does.
        # (Dropout draws differ per rank, so the shards of a batch get independent masks.)
        torch.manual_seed(config.seed + stage_index + 7919 * ddp.rank)
        generator.manual_seed(config.seed + stage_index)
        loader_generator.manual_seed(config.seed + stage_index)
        if stage == "frozen":
            model.freeze_backbone()
            if extract_at == n_blocks:
                feats, val_feats, unseen_feats = train_views, val_maps, unseen_maps
            else:  # pool the cut activations through the frozen top once
                feats = torch.stack([_pool_top(model, v, extract_at, engine) for v in train_views])
                val_feats = _pool_top(model, val_maps, extract_at, engine)
                unseen_feats = (
                    _pool_top(model, unseen_maps, extract_at, engine)
                    if unseen_maps is not None
                    else None
                )
            params, lr, batch, epochs = (
                model.head.parameters(),
                config.lr,
                config.batch_size,
                config.epochs,
            )
            title = (
                f"Stage 1: frozen {config.backbone}, training the head "
                f"(lr {config.lr:g}, batch {config.batch_size})"
            )

        else:
            model.unfreeze(unfreeze)
            # Discriminative learning rates: the head moves faster than the pretrained
            # blocks under it, which change only a little (they know more than this data).
            head_lr = config.fine_tune_head_lr or 10 * config.fine_tune_lr
            params = [
                {"params": [p for p in model.backbone.parameters() if p.requires_grad]},
                {"params": list(model.head.parameters()), "lr": head_lr},
            ]
            lr, batch = config.fine_tune_lr, config.fine_tune_batch_size
            epochs = config.fine_tune_epochs
            title = (
                f"Stage 2: fine-tuning the last {unfreeze} of {n_blocks} blocks "
                f"(lr {config.fine_tune_lr:g}, batch {config.fine_tune_batch_size})"
            )
            if not cache_cut:
                train_files = ImageFiles(
                    paths["train"], labels["train"].tolist(), train_tf, config.img_size
                )
                sampler = None
                if ddp.active:
                    from torch.utils.data import DistributedSampler

                    sampler = DistributedSampler(
                        train_files, ddp.world, ddp.rank, shuffle=True, seed=config.seed
                    )
                train_loader = make_loader(
                    train_files,
                    batch,
                    shuffle=sampler is None,
                    seed=config.seed,
                    workers=workers,
                    generator=loader_generator,
                    sampler=sampler,
                )
                val_loader = make_loader(
                    ImageFiles(paths["val"], labels["val"].tolist(), eval_tf, config.img_size),
                    64,
                    shuffle=False,
                    seed=config.seed,
                    workers=workers,
                )
                if unseen_data is not None:
                    unseen_loader = make_loader(
                        ImageFiles(unseen_data.paths, unseen_data.labels, eval_tf, config.img_size),
                        64,
                        shuffle=False,
                        seed=config.seed,
                        workers=workers,
                    )

        optimizer = make_optimizer(params, config.optimizer, lr, config.weight_decay)
        penalty = l2sp_penalty(model, config.l2sp) if stage == "fine-tune" and config.l2sp else None
        net = None
        if ddp.active:  # after (un)freezing: DDP syncs the parameters that learn
            stage_cut = n_blocks if stage == "frozen" else cut
            net = wrap_ddp(model, stage_cut, stage != "frozen" and not cache_cut, ddp, engine)
        # Early stopping counts epochs since the validation loss last dropped by more than
        # --min-delta (model selection still takes any drop): on saturated data the loss
        # creeps from 4e-4 to 1e-4 for epochs without changing a single prediction.
        start, stale, progress_loss = 1, 0, best.loss
        if state is not None and state["stage"] == stage:
            if state["stage_done"]:
                best.restore()
                continue
            _restore_checkpoint(state, model, optimizer, generator, loader_generator, ddp.rank)
            start, stale = state["epoch"] + 1, state["stale"]
            progress_loss = state.get("progress_loss", best.loss)
        reporter.stage(title)
        t_stage = time.perf_counter()
        for epoch in range(start, epochs + 1):
            t = time.perf_counter()
            if stage == "frozen":
                tr = train_epoch_cached(
                    model,
                    feats,
                    labels["train"],
                    n_blocks,
                    optimizer,
                    loss_fn,
                    config.batch_size,
                    generator,
                    engine,
                    ddp,
                    net,
                )
                va = evaluate_cached(
                    model, val_feats, labels["val"], n_blocks, eval_loss_fn, engine
                )
                un = (
                    evaluate_cached(
                        model, unseen_feats, unseen_labels, n_blocks, eval_loss_fn, engine
                    )
                    if unseen_feats is not None
                    else (math.nan, math.nan)
                )
            elif cache_cut:
                tr = train_epoch_cached(
                    model,
                    train_views,
                    labels["train"],
                    cut,
                    optimizer,
                    loss_fn,
                    config.fine_tune_batch_size,
                    generator,
                    engine,
                    ddp,
                    net,
                    penalty,
                )
                va = evaluate_cached(model, val_maps, labels["val"], cut, eval_loss_fn, engine)
                un = (
                    evaluate_cached(model, unseen_maps, unseen_labels, cut, eval_loss_fn, engine)
                    if unseen_maps is not None
                    else (math.nan, math.nan)
                )
            else:
                if ddp.active:
                    train_loader.sampler.set_epoch(epoch)
                tr = train_epoch_images(
                    model,
                    train_loader,
                    cut,
                    optimizer,
                    loss_fn,
                    engine,
                    reporter,
                    f"Fine-tune epoch {epoch}",
                    ddp,
                    net,
                    penalty,
                )
                va = evaluate_images(model, val_loader, eval_loss_fn, engine)
                un = (
                    evaluate_images(model, unseen_loader, eval_loss_fn, engine)
                    if unseen_data is not None
                    else (math.nan, math.nan)
                )
            record(stage, epoch, tr, va, lr, time.perf_counter() - t, un)
            if history[-1].val_loss < progress_loss - config.min_delta:
                progress_loss, stale = history[-1].val_loss, 0
            else:
                stale += 1
            stop = bool(config.patience and stale >= config.patience)
            _save_checkpoint(
                checkpoint,
                model,
                optimizer,
                generator,
                loader_generator,
                ddp.all_gather(torch.get_rng_state()) if ddp.active else [],
                {
                    "stage": stage,
                    "epoch": epoch,
                    "stale": stale,
                    "progress_loss": progress_loss,
                    "stage_done": stop or epoch == epochs,
                    "best": {"loss": best.loss, "step": best.step, "stage": best.stage},
                    "history": [asdict(r) for r in history],
                },
                best.state,
            )
            if stop:
                reporter.info(
                    f"Early stop: validation loss has not dropped by more than "
                    f"{config.min_delta:g} for {stale} epochs."
                )
                break
        timings[f"{stage}_seconds"] = time.perf_counter() - t_stage
        best.restore()

    if not ddp.main:
        return TrainResult(out, data.classes, history, {})  # rank 0 finishes the run
    kept = f"epoch {best.step} ({best.stage} stage), the lowest validation loss"
    if "fine-tune" in stages and best.stage == "frozen":
        # The guard: fine-tuning that does not help on honest validation only narrows the
        # model to this dataset, so the frozen-stage model is the one kept.
        kept = (
            f"the frozen-stage model (epoch {best.step}): fine-tuning did not improve the "
            "validation loss, so its weights were not kept"
        )
        reporter.info(f"Kept {kept}.")

    # 8. calibrate the kept model on validation data (temperature scaling) ----------------
    model.eval()
    stale_cache = config.fine_tune_epochs > 0 and not cache_cut  # backbone changed below
    val_logits = (
        _logits_from_images(model, paths["val"], eval_tf, config.img_size, engine, workers)
        if stale_cache
        else _logits_cached(model, val_maps, extract_at, engine)
    )
    val_right = bool((val_logits.argmax(1) == labels["val"]).all())
    if val_right:
        # With no validation errors the log-loss keeps falling as the temperature goes to 0:
        # fitting would make every prediction look certain. Leave the model as it is.
        temperature = 1.0
        reporter.info("Calibration: not fitted (no validation errors to calibrate against).")
    else:
        temperature = fit_temperature(val_logits.numpy(), labels["val"].tolist())
        reporter.info(f"Calibration: temperature {temperature:.3f} fitted on the validation split.")
    val_probs = (val_logits / temperature).softmax(1).numpy()
    unknown = choose_unknown_threshold(val_probs, labels["val"].tolist(), config.unknown_precision)
    if unknown > 0:
        reporter.info(
            f"Open set: predictions below {unknown:.1%} confidence will answer 'unknown' "
            f"(keeps validation precision >= {config.unknown_precision:.0%})."
        )
    model.info = replace(model.info, temperature=temperature, unknown_threshold=unknown)
    model.save(out / "model.safetensors")

    # 9. keep the best, evaluate once on the held-out test split ------------------------
    model.eval()
    from .diagnose import diagnose
    from .evaluate import evaluate_files
    from .plots import plot_learning_curves

    diagnosis = diagnose(history, grouped=any(groups or []))
    plot_learning_curves(
        history,
        out / "learning_curves.png",
        best_step=best.step,
        title=f"{config.backbone} @ {config.img_size}px: {diagnosis.verdict}"
        + (
            "\n(but validation was perfect at once: suspect near-duplicates across the split)"
            if diagnosis.notes and not any(groups or [])
            else ""
        ),
    )
    test_metrics = evaluate_files(
        model,
        paths["test"],
        labels["test"].tolist(),
        data.classes,
        out_dir=out,
        engine=engine,
        workers=workers,
        title="held-out test split",
        onnx_path=out / "model.onnx",
    )
    unseen_summary = None
    if unseen_data is not None:
        from .evaluate import evaluate_run

        ev = evaluate_run(out, config.unseen)  # also writes eval-<folder>/ for the report
        unseen_summary = {
            "folder": str(config.unseen),
            "n": ev["n"],
            "accuracy": ev["accuracy"],
            "accuracy_ci95": ev["accuracy_ci95"],
            "by_stage": _unseen_by_stage(history, stages),
        }
        lo, hi = ev["accuracy_ci95"]
        tlo, thi = test_metrics["accuracy_ci95"]
        reporter.info(
            f"Images from elsewhere ({config.unseen}): accuracy {ev['accuracy']:.1%} "
            f"(95% CI {lo:.1%}-{hi:.1%}, {ev['n']} images) against {test_metrics['accuracy']:.1%} "
            f"(95% CI {tlo:.1%}-{thi:.1%}) on the held-out split of the training source."
        )
    timings["total_seconds"] = time.perf_counter() - started
    summary = {
        "classes": data.classes,
        "counts": data.counts,
        "split": {s: len(ix) for s, ix in idx.items()},
        "skipped_files": len(data.skipped),
        "class_weights": weights_note,
        "engine": engine.reason,
        "plan": plan,
        "best": {"stage": best.stage, "step": best.step, "val_loss": best.loss},
        "kept": kept,
        "backbone_choice": choice.to_dict() if choice is not None else None,
        "unseen": unseen_summary,
        "diagnosis": diagnosis.to_dict(),
        "audit": read_json(out / "audit.json") if (out / "audit.json").is_file() else None,
        "test": {k: test_metrics[k] for k in ("accuracy", "accuracy_ci95", "loss", "n")},
        "open_set": test_metrics["open_set"],
        "calibration": {
            "temperature": temperature,
            "fitted": not val_right,
            "test_ece": test_metrics["calibration"]["ece"],
        },
        "timings": timings,
        "epoch_seconds": _epoch_seconds(history),
    }
    atomic_write_json(out / "summary.json", summary)
    from .report import write_report

    write_report(out)
    tracker.finish(summary)
    reporter.diagnosis(diagnosis)
    lo, hi = test_metrics["accuracy_ci95"]
    reporter.info(
        f"Held-out test accuracy {test_metrics['accuracy']:.1%} (95% CI {lo:.1%}-{hi:.1%}) on "
        f"{test_metrics['n']} images, loss {test_metrics['loss']:.3f}, calibration error "
        f"{test_metrics['calibration']['ece']:.3f}."
    )
    return TrainResult(out, data.classes, history, summary)


CHECKPOINT = "checkpoint.safetensors"


def _save_checkpoint(
    path: Path,
    model: GraftModel,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    loader_generator: torch.Generator,
    rank_rng: list[torch.Tensor],
    meta: dict[str, Any],
    best_state: dict[str, torch.Tensor],
) -> None:
    """Everything needed to continue after this epoch, in one atomically written file
    (``rank_rng``: under torchrun, each rank's random state, so dropout resumes exactly).

    Only tensors that can have changed are stored (those that are learning, and the head):
    the rest of the backbone is still exactly its pretrained weights.
    """
    from safetensors.torch import save_file

    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    tensors = {
        f"model.{k}": v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k in learning or k.startswith("head.")
    }
    # The best weights so far differ from the pretrained ones in the same tensors at most.
    for k, v in best_state.items():
        if k in learning or k.startswith("head."):
            tensors[f"best.{k}"] = v.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    for rank, rng in enumerate(rank_rng):
        tensors[f"rng.torch.rank{rank}"] = rng
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.loader"] = loader_generator.get_state()
    meta = {**meta, "param_groups": opt["param_groups"]}
    atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(meta)}))


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as fh:
            meta = json.loads((fh.metadata() or {})["state"])
        meta["tensors"] = load_file(str(path))
    except Exception as exc:
        raise RunFolderError(
            f"The checkpoint {path} is unreadable ({exc}). Delete it to restart the stages "
            "from the beginning, or start a new run."
        ) from exc
    return meta


def _restore_checkpoint(
    state: dict[str, Any],
    model: GraftModel,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    loader_generator: torch.Generator,
    rank: int = 0,
) -> None:
    tensors = state["tensors"]
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_state, strict=False)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    torch.set_rng_state(tensors.get(f"rng.torch.rank{rank}", tensors["rng.torch"]))
    generator.set_state(tensors["rng.generator"])
    loader_generator.set_state(tensors["rng.loader"])


def _unseen_by_stage(history: list[EpochRecord], stages: list[str]) -> dict[str, Any]:
    """Per stage, at its best validation epoch: in-domain validation vs --unseen accuracy."""
    out = {}
    for stage in stages:
        recs = [r for r in history if r.stage == stage]
        if recs:
            r = min(recs, key=lambda r: r.val_loss)
            out[stage] = {"epoch": r.epoch, "val_acc": r.val_acc, "unseen_acc": r.unseen_acc}
    return out


def _audit(config: TrainConfig, data: Any, embeddings: Any) -> Any:
    """The duplicate audit at --dup-threshold, with the looser clusterings the default split
    may try."""
    rungs = grouping_ladder(config.group_threshold, config.dup_threshold)
    return audit(data.sha256, data.labels, embeddings, config.dup_threshold, looser=rungs)


def _groups_by_clusters(config: TrainConfig, report: Any) -> bool:
    """Whether the split keeps near-duplicate clusters apart: asked for with --group-by auto,
    or by default when the audit found near-copies (and no other grouping was named)."""
    if config.groups_csv:
        return False
    return config.group_by == "auto" or (config.group_by is None and report.n_clusters_multi > 0)


def _cluster_split(
    config: TrainConfig, data: Any, report: Any, reporter: Reporter
) -> tuple[list[str], list[str] | None, str]:
    """Keep clusters of similar images on one side, at the loosest rung of the grouping
    ladder whose clusters split soundly; by default, fall back to an image-by-image split
    (with a warning) when none does."""
    how = "--group-by auto" if config.group_by else "the default; --group-by none turns it off"
    tried = []
    for t in grouping_ladder(config.group_threshold, config.dup_threshold):
        clusters = report.clusters_at(t)
        groups = [f"cluster-{c}" for c in clusters]
        try:
            subsets = make_group_split(
                data.labels, groups, data.classes, config.test_size, config.val_size, config.seed
            )
            check_split_sizes(subsets, data.labels, data.classes, config.test_size, config.val_size)
        except SplitError as exc:
            tried.append(f"at {t:g}: {str(exc).rstrip('.')}")
            continue
        ids, counts = np.unique(clusters, return_counts=True)
        note = (
            f"Split by group: the {int((counts > 1).sum())} clusters of similar images "
            f"(cosine >= {t:g}) are each kept on one side ({how}); {len(ids)} groups."
        )
        if tried:
            note += " Looser similarity was tried first: " + "; ".join(tried) + "."
        return subsets, groups, note
    reason = "; ".join(tried)
    if config.group_by == "auto":  # asked for by name: its failure is the user's to see
        raise SplitError(f"Could not keep near-duplicate clusters apart ({reason}).")
    reporter.warn(
        f"Near-duplicate clusters could not be kept on one side ({reason}); splitting image by "
        "image instead, so validation and test will overstate accuracy."
    )
    subsets = make_split(data.labels, data.classes, config.test_size, config.val_size, config.seed)
    return subsets, None, ""


def _resolve_groups(config: TrainConfig, data: Any) -> tuple[list[str] | None, str]:
    """The group of each image, from --group-by REGEX / --groups-csv, and a sentence saying
    so (clusters of the audit are :func:`_cluster_split`'s)."""
    from .data import groups_from_csv, groups_from_pattern

    rel = [data.relpath(p) for p in data.paths]
    if config.groups_csv:
        groups, unmatched = groups_from_csv(Path(config.groups_csv), rel)
        source = f"groups from {config.groups_csv}"
    elif config.group_by and config.group_by not in ("auto", "none"):
        groups, unmatched = groups_from_pattern(rel, config.group_by)
        source = f"groups from --group-by {config.group_by!r}"
    else:
        return None, ""
    n = len(set(groups))
    note = f"Split by group: {source}; {n} groups"
    if unmatched:
        note += f" ({unmatched} files matched no group and form groups of their own)"
    return groups, note + "."


def _data_from_split(out: Path, data_root: str | Path | None) -> tuple[Any, list[str], list[str]]:
    """The images of an existing run, exactly as its split.csv lists them."""
    from .data import ScanResult

    config, split = out / "config.json", out / "split.csv"
    if not config.is_file() or not split.is_file():
        raise RunFolderError(
            f"Nothing to resume in {out}: it has no config.json/split.csv. "
            "Start a new run with `graft train ROOT --out DIR`."
        )
    saved = read_json(config)
    root = Path(data_root or saved["data_root"]).resolve()
    classes = list(saved["classes"])
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, subsets, hashes, groups = [], [], [], [], []
    with open(split, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        for row in csv.DictReader(fh):
            paths.append(root / row["path"])
            labels.append(index[row["class"]])
            subsets.append(row["subset"])
            hashes.append(row["sha256"])
            groups.append(row.get("group", ""))
    return ScanResult(root, classes, paths, labels, hashes), subsets, groups


@torch.no_grad()
def _batched(fn: Any, maps: torch.Tensor, engine: Engine, batch: int = 256) -> torch.Tensor:
    """``fn`` over cached activations in batches, on the engine's device, results on CPU."""
    out = []
    for i in range(0, len(maps), batch):
        with engine.context():
            out.append(fn(engine.prepare(maps[i : i + batch])).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def _logits_cached(
    model: GraftModel, maps: torch.Tensor, start: int, engine: Engine
) -> torch.Tensor:
    return _batched(lambda x: _top_forward(model, x, start), maps, engine)


@torch.no_grad()
def _logits_from_images(
    model: GraftModel,
    paths: list[Path],
    transform: Any,
    img_size: int,
    engine: Engine,
    workers: int,
) -> torch.Tensor:
    files = ImageFiles(paths, None, transform, img_size)
    out = torch.empty(len(paths), len(model.info.classes))
    for batch in make_loader(files, 64, shuffle=False, seed=0, workers=workers):
        with engine.context():
            out[batch["index"]] = model(engine.prepare(batch["images"])).float().cpu()
    return out


def _pool_top(model: GraftModel, maps: torch.Tensor, start: int, engine: Engine) -> torch.Tensor:
    """Pooled features from activations cached at block ``start`` (frozen top, no grad)."""
    return _batched(
        lambda x: model.backbone.forward_maps(x, start=start).mean(dim=(2, 3)), maps, engine
    )


def _activation_bytes(model: GraftModel, cut: int, img_size: int) -> int:
    if cut >= len(model.backbone.blocks):
        return model.backbone.num_features * 4
    with torch.no_grad():
        device = next(model.parameters()).device
        x = _run_blocks(model.eval(), torch.zeros(1, 3, img_size, img_size, device=device), 0, cut)
    return x.numel() * 4


def _describe_plan(
    config: TrainConfig, n_blocks: int, unfreeze: int, views: int, cache_cut: bool, workers: int
) -> str:
    parts = []
    if config.epochs:
        parts.append(
            f"stage 1 trains the head for up to {config.epochs} epochs on cached backbone "
            f"features ({views} view{'s' if views > 1 else ''} per training image, "
            f"augment={config.augment}): the backbone runs once per view, not once per epoch"
        )
    if config.fine_tune_epochs:
        where = (
            "on cached activations at the cut, so an epoch runs only the unfrozen top"
            if cache_cut
            else "on freshly decoded, augmented images"
        )
        parts.append(
            f"stage 2 fine-tunes the last {unfreeze}/{n_blocks} blocks for up to "
            f"{config.fine_tune_epochs} epochs {where}"
        )
    parts.append(
        f"early stopping after {config.patience} epochs without the validation loss "
        f"dropping by more than {config.min_delta:g}"
        if config.patience
        else "no early stopping"
    )
    parts.append(f"{workers} decoding worker(s)")
    return "; ".join(parts) + "."


def _epoch_seconds(history: list[EpochRecord]) -> dict[str, float]:
    out = {}
    for stage in ("frozen", "fine-tune"):
        secs = [r.seconds for r in history if r.stage == stage]
        if secs:
            out[stage] = float(np.mean(secs))
    return out


def _write_skipped(path: Path, data: Any) -> None:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "reason"])
    for p, reason in data.skipped:
        writer.writerow([str(p), reason])
    atomic_write_text(path, buf.getvalue())


def _versions() -> dict[str, str]:
    import sklearn
    import timm
    import torchvision

    return {
        "graft": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


__all__ = ["EpochRecord", "TrainResult", "choose_engine", "fit"]
