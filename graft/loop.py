"""One training epoch and one evaluation, over whatever the batches come from.

A stage trains on one of three batch sources:

- :class:`CachedBatches` over cached pooled features (stage 1: only the head learns) or over
  activations cached at the fine-tuning cut (stage 2: only the top blocks run): each image
  appears once per epoch, as one of its K cached views picked at random;
- :class:`ImageBatches` over decoded, augmented images (stage 2 when the activations at the
  cut would not fit the cache budget, or ``--unfreeze all``).

:func:`train_one_epoch` runs any of them through the learning part of the model
(:class:`graft.model.Top`, wrapped in DistributedDataParallel under torchrun).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .device import Device
from .features import logits_cached
from .loading import ImageFiles, make_loader
from .model import GraftModel, Top

__all__ = [
    "Batch",
    "CachedBatches",
    "CachedEval",
    "ImageBatches",
    "ImageEval",
    "class_weights_for",
    "l2sp_penalty",
    "make_optimizer",
    "train_one_epoch",
    "wrap_ddp",
]


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    #: the loss is summed and divided by this (the class-weighted size of the whole global
    #: batch, of which this rank holds a share); None: the mean over this batch
    whole: float | None
    #: how many images this batch's loss stands for in the epoch's mean
    share: float


class CachedBatches:
    """Batches of cached outputs ``views[K, N, ...]``, one random view of each image.

    Under torchrun every rank draws the same batches and takes its share of each; the loss
    is normalised by the whole batch, so DDP's gradient average is the single-process
    gradient."""

    def __init__(
        self,
        views: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        generator: torch.Generator,
        weight: torch.Tensor | None = None,
        rank: int = 0,
        world: int = 1,
    ):
        self.views, self.labels, self.batch_size = views, labels, batch_size
        self.generator, self.weight, self.rank, self.world = generator, weight, rank, world
        self.size = views.shape[1]

    def __len__(self) -> int:  # batches per epoch
        return math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = self.size
        pick = torch.randint(0, self.views.shape[0], (n,), generator=self.generator)
        order = torch.randperm(n, generator=self.generator)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            local = idx[self.rank :: self.world]
            # The (class-weighted) size of the whole batch, whichever rank holds which part.
            whole = (
                float(self.weight[self.labels[idx]].sum())
                if self.weight is not None
                else float(len(idx))
            )
            yield Batch(self.views[pick[local], local], self.labels[local], whole, len(idx))


class ImageBatches:
    """Batches of decoded, augmented training images (a DistributedSampler under torchrun)."""

    def __init__(
        self,
        files: ImageFiles,
        batch_size: int,
        seed: int,
        workers: int,
        generator: torch.Generator,
        reporter: Any,
        ddp: Any = None,
    ):
        sampler = None
        if ddp is not None and ddp.active:
            from torch.utils.data import DistributedSampler

            sampler = DistributedSampler(files, ddp.world, ddp.rank, shuffle=True, seed=seed)
        self.loader = make_loader(
            files,
            batch_size,
            shuffle=sampler is None,
            seed=seed,
            workers=workers,
            generator=generator,
            sampler=sampler,
        )
        self.reporter, self.label = reporter, "Fine-tune epoch"
        self.size = len(files)

    def __len__(self) -> int:  # batches per epoch
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.label = f"Fine-tune epoch {epoch}"
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        with self.reporter.bar(self.label, self.size) as advance:
            for batch in self.loader:
                if len(batch["index"]) == 0:
                    continue
                yield Batch(batch["images"], batch["labels"], None, len(batch["labels"]))
                advance(len(batch["index"]))


def train_one_epoch(
    net: nn.Module,
    model: GraftModel,
    batches: CachedBatches | ImageBatches,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.CrossEntropyLoss,
    device: Device,
    ddp: Any = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    before_step: Callable[[int], None] | None = None,
) -> tuple[float, float]:
    """One pass over ``batches`` through ``net`` (the learning part of ``model``); returns
    the training loss and accuracy over the epoch (all ranks together under torchrun).
    ``before_step(i)`` runs before the optimizer step of batch ``i`` (the schedule)."""
    model.train()
    world = ddp.world if ddp is not None and ddp.active else 1
    total_loss, correct, n = 0.0, 0, 0
    for i, batch in enumerate(batches):
        if before_step is not None:
            before_step(i)
        x, y = device.prepare(batch.x), batch.y.to(device.device)
        with device.context():
            logits = net(x)
        if batch.whole is None:
            loss = loss_fn(logits.float(), y)
        else:
            loss = nn.functional.cross_entropy(
                logits.float(), y, weight=loss_fn.weight, reduction="sum"
            )
            # ... times the world size, which DDP's gradient average divides by again
            loss = loss / (batch.whole / world)
        optimizer.zero_grad(set_to_none=True)
        # the penalty is the same on every rank: DDP's average keeps it once
        (loss + penalty() if penalty is not None else loss).backward()
        optimizer.step()
        if batch.whole is None:
            total_loss += loss.item() * len(y)
            n += len(y)
        else:
            total_loss += loss.item() / world * batch.share
            n += len(y)
        correct += (logits.argmax(1) == y).sum().item()
    if world > 1:
        total_loss, correct, n = ddp.sum([total_loss, float(correct), float(n)])
    return total_loss / max(1, n), correct / max(1, n)


class CachedEval:
    """Validation on cached outputs at block ``cut``."""

    def __init__(self, maps: torch.Tensor, labels: torch.Tensor, cut: int):
        self.maps, self.labels, self.cut = maps, labels, cut

    @torch.no_grad()
    def __call__(
        self, model: GraftModel, loss_fn: nn.Module, device: Device
    ) -> tuple[float, float]:
        model.eval()
        logits = logits_cached(model, self.maps, self.cut, device)
        loss = loss_fn(logits, self.labels).item()
        return loss, (logits.argmax(1) == self.labels).float().mean().item()


class ImageEval:
    """Validation on decoded images (after the backbone changed under the cache)."""

    def __init__(self, files: ImageFiles, seed: int, workers: int):
        self.loader = make_loader(files, 64, shuffle=False, seed=seed, workers=workers)

    @torch.no_grad()
    def __call__(
        self, model: GraftModel, loss_fn: nn.Module, device: Device
    ) -> tuple[float, float]:
        model.eval()
        total_loss, correct, n = 0.0, 0, 0
        for batch in self.loader:
            if len(batch["index"]) == 0:
                continue
            x, y = device.prepare(batch["images"]), batch["labels"].to(device.device)
            with device.context():
                logits = model(x).float()
            total_loss += loss_fn(logits, y).item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
        return total_loss / max(1, n), correct / max(1, n)


NO_EVAL = (math.nan, math.nan)


def wrap_ddp(model: GraftModel, cut: int, below: bool, device: Device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.device.index or 0] if device.device.type == "cuda" else None
    # BatchNorm statistics are frozen (identical on every rank): nothing to broadcast.
    return DistributedDataParallel(
        Top(model, cut, below), device_ids=ids, forward_sync_buffers=False
    )


def class_weights_for(counts: list[int], mode: str) -> tuple[torch.Tensor | None, str]:
    """Inverse-frequency weights (mean 1) when asked, or when ``auto`` sees >2x imbalance."""
    ratio = max(counts) / max(1, min(counts))
    if mode == "none" or (mode == "auto" and ratio <= 2.0):
        why = "off" if mode == "none" else f"off (classes within {ratio:.1f}x of each other)"
        return None, why
    c = torch.tensor(counts, dtype=torch.float32)
    w = c.sum() / (len(counts) * c)
    return w, f"inverse frequency (largest/smallest = {ratio:.1f}x)"


def l2sp_penalty(model: GraftModel, alpha: float) -> Callable[[], torch.Tensor]:
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
    # The fused kernel updates every tensor in one pass: 1.4 of 17.7 ms per fine-tuning step
    # of lite0's top blocks on this CPU (BENCHMARKS.md), the same numbers within float
    # rounding. Only where PyTorch has it for certain (CPU, CUDA).
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = True if devices and devices <= {"cpu", "cuda"} else None
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused)
