"""Learning-rate schedules, per optimizer step, as a pure function of the step.

The rate of step ``s`` of a stage depends only on ``s``, the stage's planned steps and the
schedule, never on a scheduler object's history: a resumed run sets exactly the rates an
uninterrupted one would (graft.checkpoint restores the optimizer; the step count follows
from the epoch). Early stopping only cuts the schedule short.

- ``constant``: the base rate throughout (the seed's Keras default);
- ``cosine``: a linear warm-up over the first ``warmup`` share of the steps, then a cosine
  decay to zero (timm's and Ultralytics' default shape);
- ``onecycle``: fastai's ``fit_one_cycle``: cosine up from base/25 over the first 25% of
  the steps (or ``warmup`` when larger), then cosine down to base/1e5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import SCHEDULES

__all__ = ["SCHEDULES", "StepSchedule", "lr_factor"]


def lr_factor(kind: str, step: int, total: int, warmup: float = 0.05) -> float:
    """The multiple of the base rate at ``step`` (0-based) of ``total`` planned steps."""
    if kind == "constant" or total <= 1:
        return 1.0
    t = min(max(step, 0), total - 1) / (total - 1)  # 0 at the first step, 1 at the last
    if kind == "cosine":
        if warmup > 0 and t < warmup:
            # the first step already learns a little (not zero: it would be a wasted step)
            return (step + 1) / max(1.0, warmup * (total - 1) + 1)
        u = (t - warmup) / max(1e-12, 1 - warmup)
        return 0.5 * (1 + math.cos(math.pi * u))
    if kind == "onecycle":
        peak, start, end = max(0.25, warmup), 1 / 25, 1e-5
        if t < peak:
            return end_cos(start, 1.0, t / peak)
        return end_cos(1.0, end, (t - peak) / (1 - peak))
    raise ValueError(f"unknown schedule {kind!r} (choose from {', '.join(SCHEDULES)})")


def end_cos(a: float, b: float, u: float) -> float:
    """Cosine interpolation from ``a`` (u = 0) to ``b`` (u = 1)."""
    return b + (a - b) * 0.5 * (1 + math.cos(math.pi * u))


@dataclass
class StepSchedule:
    """Sets every parameter group's rate before each optimizer step of one stage."""

    optimizer: torch.optim.Optimizer
    kind: str
    steps_per_epoch: int
    epochs: int
    warmup: float = 0.05

    def __post_init__(self) -> None:
        # each group's own base rate (discriminative rates keep their ratio)
        groups = self.optimizer.param_groups
        self.base = [float(g.setdefault("initial_lr", g["lr"])) for g in groups]
        self.total = max(1, self.steps_per_epoch * self.epochs)
        self.last = 1.0

    def at(self, epoch: int, batch: int) -> None:
        """Before the optimizer step of batch ``batch`` (0-based) of ``epoch`` (1-based)."""
        step = (epoch - 1) * self.steps_per_epoch + batch
        self.last = lr_factor(self.kind, step, self.total, self.warmup)
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * self.last

    def rate(self, base: float) -> float:
        """``base`` scaled as at the last step set (the rate a history row reports)."""
        return base * self.last
