"""Learning-rate finder for the new head (Smith's range test), on cached features.

The head is trained for a few dozen mini-batches while the learning rate grows exponentially
from ``start`` to ``end``; the smoothed training loss against the rate shows where learning
is fast but stable. The suggestion is where the loss falls fastest, capped at a tenth of
the rate at the loss minimum (fastai's rule of thumb). Everything is seeded, and
the backbone features come from the same cache as training, so the same seed gives the same
curve.

    graft lr-find ROOT [--backbone ...] [--img-size 128] [--out lr_find.png]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import TrainConfig


def lr_find(
    root: str | Path,
    config: TrainConfig,
    out_png: str | Path | None = None,
    start: float = 1e-6,
    end: float = 10.0,
    steps: int = 100,
    reporter: Any = None,
) -> dict[str, Any]:
    from .data import scan
    from .features import FrozenFeatures
    from .loop import class_weights_for
    from .model import make_head
    from .progress import Reporter
    from .split import split_new_run

    reporter = reporter or Reporter()
    data = scan(root, progress=reporter.iter)
    features = FrozenFeatures.pretrained(config, data, reporter)
    with torch.no_grad():
        pooled = features.views(data, range(len(data.paths)))
    # The split `graft train` would make with this config (its audit's near-copy groups, the
    # folder's own split), so the finder never learns from a validation or test image.
    split, _ = split_new_run(config, data, pooled.numpy(), reporter)
    train = [i for i, s in enumerate(split.subsets) if s == "train"]
    feats = pooled[train]
    y = torch.tensor([data.labels[i] for i in train])
    counts = [int((y == c).sum()) for c in range(len(data.classes))]
    weights, _ = class_weights_for(counts, config.class_weights)

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    head = make_head(feats.shape[1], len(data.classes), config.head, config.dropout)
    head.train()
    optimizer = torch.optim.Adam(head.parameters(), lr=start)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    lrs, losses = [], []
    smooth, best = 0.0, math.inf
    order = torch.randperm(len(y), generator=generator)
    pos = 0
    for step in range(steps):
        lr = start * (end / start) ** (step / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        if pos + config.batch_size > len(order):
            order, pos = torch.randperm(len(y), generator=generator), 0
        idx = order[pos : pos + config.batch_size]
        pos += config.batch_size
        loss = loss_fn(head(feats[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        smooth = 0.9 * smooth + 0.1 * loss.item()
        value = smooth / (1 - 0.9 ** (step + 1))  # bias-corrected running mean
        lrs.append(lr)
        losses.append(value)
        best = min(best, value)
        if step > 10 and (value > 4 * best or not math.isfinite(value)):
            break  # diverged: the rest of the range says nothing
    i_min = int(np.argmin(losses))
    # Steepest descent of the smoothed loss against log(lr), never above (minimum / 10):
    # on easy data the loss keeps falling to the end of the range, and "minimum / 10" alone
    # would then suggest a rate far too high.
    slope = np.gradient(np.asarray(losses), np.log10(np.asarray(lrs)))
    skip = max(1, len(lrs) // 10)
    i_steep = skip + int(np.argmin(slope[skip : i_min + 1])) if i_min > skip else i_min
    suggested = min(lrs[i_steep], lrs[i_min] / 10)
    result = {
        "suggested_lr": suggested,
        "min_loss_lr": lrs[i_min],
        "lrs": lrs,
        "losses": losses,
        "backbone": config.backbone,
        "seed": config.seed,
        # the images it learned from, as split.csv of a run with this config would list them
        "train_images": [data.relpath(data.paths[i]) for i in train],
    }
    if out_png is not None:
        _plot(lrs, losses, suggested, Path(out_png))
        result["plot"] = str(out_png)
    return result


def _plot(lrs: list[float], losses: list[float], suggested: float, path: Path) -> None:
    from .plots import save_figure, subplots

    fig, ax = subplots(figsize=(6.4, 4.0))
    ax.plot(lrs, losses, color="#4c72b0")
    ax.set_xscale("log")
    ax.axvline(suggested, color="#2a9d4b", ls="--", label=f"suggested lr {suggested:.1e}")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (smoothed)")
    top = np.percentile(losses, 95)
    ax.set_ylim(min(losses) * 0.9, max(top, losses[0]) * 1.1)
    ax.set_title("Learning-rate finder (head on frozen features)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    save_figure(fig, path)
