"""Learning-rate schedules, per optimizer step, as a pure function of the step.

The rate of step ``s`` of a stage depends only on ``s``, the stage's planned steps and the
schedule, never on a scheduler object's history: a resumed run sets exactly the rates an
uninterrupted one would (graft.checkpoint restores the optimizer; the step count follows
from the epoch). Early stopping only cuts the schedule short.

- ``constant``: the base rate throughout (the seed's Keras default);
- ``cosine``: a linear warm-up over the first ``warmup`` share of the steps, then a cosine
  decay toward zero (timm's and Ultralytics' default shape; the last step keeps a sliver);
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
    step = min(max(step, 0), total - 1)
    if kind == "cosine":
        # the first step already learns a little, and so does the last (a step at rate 0
        # would be a wasted pass over its batch)
        ramp = math.ceil(warmup * total)
        if step < ramp:
            return (step + 1) / (ramp + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - ramp) / (total - ramp)))
    if kind == "onecycle":
        peak = max(1, round(max(0.25, warmup) * total))
        if step < peak:
            return end_cos(1 / 25, 1.0, step / peak)
        return end_cos(1.0, 1e-5, (step - peak) / max(1, total - peak - 1))
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
