"""The shape of a training run, shared by its steps (graft.train, graft.stages,
graft.finish): :class:`Run` (options, run folder, reporting), :class:`Plan` (where the
backbone is cut and what is cached) and :class:`Features` (the cached inputs of both stages).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .data import ScanResult
from .distributed import Dist
from .errors import UsageError
from .model import GraftModel
from .progress import Reporter
from .rundir import RunDir
from .stopping import raise_if_stopping

__all__ = ["Features", "Plan", "Run", "describe_plan", "make_plan"]


def cut_cache_budget() -> int:
    """Bytes the activations cached at the cut may take (``GRAFT_CUT_CACHE_MB``, 2048)."""
    text = os.environ.get("GRAFT_CUT_CACHE_MB", "2048").strip()
    try:
        mb = float(text)
    except ValueError:
        mb = math.nan
    if not (math.isfinite(mb) and mb >= 0):
        raise UsageError(
            f"GRAFT_CUT_CACHE_MB={text!r} is not valid: use a number of megabytes such as "
            "2048 (0 turns the cache at the cut off), or unset it."
        )
    return int(mb * 2**20)


@dataclass
class Run:
    """What every step of a run reads: the options, the run folder, where to report."""

    config: TrainConfig
    dir: RunDir
    reporter: Reporter
    tracker: Any
    ddp: Dist
    resume: bool
    workers: int
    timings: dict[str, float] = field(default_factory=dict)
    # entries of the run folder that were there before this run (the user's: kept), and
    # whether this run created the folder; None until the folder is prepared
    user_files: list[str] | None = None
    created: bool = False
    # --wise: the frozen-stage weights fine-tuning started from (checkpointed with each
    # epoch), and what the mix chose (summary.json)
    anchor: dict[str, Any] | None = None
    wise: dict[str, Any] | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[name + "_seconds"]`` (summary.json:
        the phases of a run add up to its total, and the end of the run prints them). A
        stop asked for by a signal is acted on here too (graft.stopping)."""
        raise_if_stopping()
        started = time.perf_counter()
        try:
            yield
        finally:
            key = f"{name}_seconds"
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - started


@dataclass
class Plan:
    """Where the backbone is cut and what is cached (chosen once, printed, saved)."""

    n_blocks: int
    unfreeze: int  # blocks that learn in stage 2
    cut: int  # the first block that learns in stage 2 (n_blocks: only the head)
    extract_at: int  # where the cache stores outputs (cut when they fit, else the end)
    views: int  # cached views per training image (view 0 is the clean one)
    stages: list[str]
    text: str = ""
    #: False when the backbone is one block (a timm model whose forward_features graft
    #: could not split): stage 2 fine-tunes all of it, on images
    sequential: bool = True

    @property
    def cache_cut(self) -> bool:
        return self.extract_at < self.n_blocks


@dataclass
class Features:
    """The cached inputs of both stages, at ``plan.extract_at``, and the split's labels."""

    paths: dict[str, list[Path]]
    labels: dict[str, torch.Tensor]
    train: torch.Tensor  # [views, N, ...]
    val: torch.Tensor
    #: the held-out split's clean inputs at the cut, for the end-of-run evaluation
    test: torch.Tensor | None = None
    class_weights: torch.Tensor | None = None
    class_weights_note: str = ""
    unseen: ScanResult | None = None
    unseen_maps: torch.Tensor | None = None
    unseen_labels: torch.Tensor | None = None
    #: the frozen part's runner and cache, for later passes over images (calibration)
    frozen: Any = None
    #: pooled features of the clean training and validation images under the pretrained
    #: top, where the duplicate audit already computed them (stage 1 starts from these)
    pooled_clean: dict[str, torch.Tensor] | None = None


def make_plan(run: Run, model: GraftModel, n_images: int) -> Plan:
    """Where to cut the backbone, and whether the activations at the cut fit the cache."""
    config, n_blocks = run.config, model.n_blocks
    unfreeze = n_blocks if config.unfreeze == "all" else min(int(config.unfreeze), n_blocks)
    sequential = model.backbone.sequential
    if not sequential and config.fine_tune_epochs:
        run.reporter.info(
            f"{config.backbone} does not run its blocks one after another in a way graft can "
            "split (its forward_features is taken whole): stage 2 fine-tunes the whole "
            "backbone, on images."
        )
    elif config.unfreeze != "all" and int(config.unfreeze) > n_blocks and config.fine_tune_epochs:
        run.reporter.warn(
            f"--unfreeze {config.unfreeze}: {config.backbone} has {n_blocks} blocks, so all "
            f"{n_blocks} learn in stage 2 (the same as --unfreeze all)."
        )
    cut = n_blocks - unfreeze if config.fine_tune_epochs else n_blocks
    views = 1 if config.augment == "none" else config.views
    n_train = n_images * (1 - config.test_size - config.val_size)
    cut_bytes = model.activation_bytes(cut, config.img_size) * ((views - 1) * n_train + n_images)
    cache_cut = 0 < cut < n_blocks and cut_bytes <= cut_cache_budget()
    if not cache_cut and 0 < cut < n_blocks:
        run.reporter.info(
            f"Activations at the cut would take {cut_bytes / 2**20:.0f} MB: fine-tuning "
            "runs on images, with the frozen blocks under no_grad."
        )
    stages = [
        s for s, n in (("frozen", config.epochs), ("fine-tune", config.fine_tune_epochs)) if n
    ]
    extract_at = cut if cache_cut else n_blocks
    plan = Plan(n_blocks, unfreeze, cut, extract_at, views, stages, sequential=sequential)
    plan.text = describe_plan(config, plan, run.workers)
    if run.ddp.active:
        from .distributed import backend

        plan.text += (
            f" Distributed: {run.ddp.world} processes ({backend()}); the backbone passes and "
            "each batch are split across them."
        )
    return plan


def describe_plan(config: TrainConfig, plan: Plan, workers: int) -> str:
    parts = []
    if config.epochs and config.head == "linear" and config.head_solver != "adam":
        parts.append(
            "stage 1 solves the linear head exactly (L-BFGS along an L2 path, picked on "
            f"validation) on cached backbone features ({plan.views} view"
            f"{'s' if plan.views > 1 else ''} per training image, augment={config.augment})"
        )
    elif config.epochs:
        parts.append(
            f"stage 1 trains the head for up to {config.epochs} epochs on cached backbone "
            f"features ({plan.views} view{'s' if plan.views > 1 else ''} per training image, "
            f"augment={config.augment}): the backbone runs once per view, not once per epoch"
        )
    if config.fine_tune_epochs:
        where = (
            "on cached activations at the cut, so an epoch runs only the unfrozen top"
            if plan.cache_cut
            else "on freshly decoded, augmented images"
        )
        what = (
            f"the last {plan.unfreeze}/{plan.n_blocks} blocks"
            if plan.sequential
            else f"the whole {config.backbone} (one block: graft cannot split it)"
        )
        parts.append(
            f"stage 2 fine-tunes {what} for up to {config.fine_tune_epochs} epochs {where}"
        )
    parts.append(
        f"early stopping after {config.patience} epochs without the validation loss "
        f"dropping by more than {config.min_delta:g}"
        if config.patience
        else "no early stopping"
    )
    parts.append(f"{workers} decoding worker(s)")
    return "; ".join(parts) + "."
