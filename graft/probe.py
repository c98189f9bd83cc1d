"""Stage 1 for a linear head: an exact, well-regularised linear probe on the cached features.

A linear head on frozen features is a multinomial logistic regression. Trained with Adam for
ten epochs on augmented views it stops short of the optimum (on the sprite benchmark a plain
scikit-learn regression beat it in domain, BENCHMARKS.md). Here it is solved to convergence
with L-BFGS, on every cached view of every training image (the clean one and the augmented
ones: augmentation as data), for a path of L2 strengths from strong to weak. Each point of
the path is one row of the stage's history: the validation loss picks the strength (graft's
model selection, as for epochs), and early stopping ends the path once weaker
regularisation stops helping. Each solve starts from the previous one (warm start), so the
whole path costs a few full-batch passes per point.

Features are standardised for the solver (L-BFGS converges in far fewer steps) and the
scaling is folded back into the head's weights, so the head still takes raw pooled
features. This is LP (linear probe) of LP-FT (Kumar et al., ICLR 2022): fine-tuning starts
from a head that already fits, so the pretrained features are not distorted by the large
early gradients of a random head.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["L2_PATH", "ProbePoint", "choose_point", "head_linear", "probe_path", "set_linear"]

#: L2 strengths (per-image mean loss + l2/2 * ||W||^2 on standardised features), strong to
#: weak; scikit-learn's C = 1 / (l2 * n_images)
L2_PATH = (1.0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)


@dataclass
class ProbePoint:
    l2: float
    weight: torch.Tensor  # [classes, features], for raw (unstandardised) features
    bias: torch.Tensor  # [classes]
    train_loss: float
    train_acc: float
    iterations: int


def probe_path(
    views: torch.Tensor,
    labels: torch.Tensor,
    class_weight: torch.Tensor | None = None,
    path: tuple[float, ...] = L2_PATH,
    max_iter: int = 100,
    max_rows: int = 32768,
    seed: int = 0,
    start: ProbePoint | None = None,
) -> Iterator[ProbePoint]:
    """Solve the multinomial logistic regression on ``views[K, N, D]`` (every view is a
    training row with its image's label) for each L2 strength in ``path``, strong to weak.

    Deterministic: full-batch L-BFGS from zeros (or from ``start``'s solution: a refit on
    more rows), warm-started along the path. At most ``max_rows`` rows take part (every
    full pass costs rows x features x classes): every image's clean view (view 0) first,
    then augmented views drawn at random (seeded)."""
    k, n, d = views.shape
    x = views.reshape(k * n, d)
    y = labels.repeat(k)
    if k * n > max_rows:
        g = torch.Generator().manual_seed(seed)
        if n >= max_rows:
            keep = torch.randperm(n, generator=g)[:max_rows]
        else:
            extra = n + torch.randperm(k * n - n, generator=g)[: max_rows - n]
            keep = torch.cat([torch.arange(n), extra])
        keep = keep.sort().values  # in row order: the same rows give the same sums, bit for bit
        x, y = x[keep], y[keep]
    x = x.float()
    # Features that barely vary (units that rarely fire) are scaled as if they varied a
    # hundredth as much as a typical one: standardised to full scale they would let the
    # solution swing on a handful of images, and on float noise between engines.
    mean, std = x.mean(0), x.std(0)
    std = std.clamp_min(max(0.01 * float(std.mean()), 1e-6))
    z = (x - mean) / std
    classes = int(labels.max()) + 1 if class_weight is None else len(class_weight)
    w = torch.zeros(classes, d, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    if start is not None:  # raw -> standardised: W x + b = (W s) z + (b + W m)
        with torch.no_grad():
            w.copy_(start.weight * std)
            b.copy_(start.bias + start.weight @ mean)
    for l2 in path:
        optimizer = torch.optim.LBFGS(
            [w, b],
            lr=1,
            max_iter=max_iter,
            history_size=20,
            tolerance_grad=1e-6,
            tolerance_change=1e-9,
            line_search_fn="strong_wolfe",
        )
        objective = _Objective(optimizer, z, y, w, b, l2, class_weight)
        optimizer.step(objective)
        iterations = int(optimizer.state[w].get("n_iter", 0))
        with torch.no_grad():
            logits = z @ w.T + b
            loss = nn.functional.cross_entropy(logits, y, weight=class_weight).item()
            acc = (logits.argmax(1) == y).float().mean().item()
            # fold the standardisation into the weights: W z + b = (W / s) x + (b - W m / s)
            raw_w = w / std
            raw_b = b - raw_w @ mean
        yield ProbePoint(l2, raw_w.detach().clone(), raw_b.detach().clone(), loss, acc, iterations)


@dataclass
class _Objective:
    """L-BFGS's closure: the mean (class-weighted) cross-entropy plus the L2 term."""

    optimizer: torch.optim.Optimizer
    z: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    l2: float
    class_weight: torch.Tensor | None

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad()
        logits = self.z @ self.w.T + self.b
        loss = nn.functional.cross_entropy(logits, self.y, weight=self.class_weight)
        loss = loss + 0.5 * self.l2 * (self.w * self.w).sum()
        loss.backward()
        return loss


def choose_point(val_losses: list[float], min_delta: float) -> int:
    """Index of the strongest L2 (the first of the path) whose validation loss is within
    ``min_delta`` of the lowest: where the head separates the data, weaker L2 only inflates
    the weights, and the confidence on images from elsewhere, for a loss already ~0."""
    lowest = min(val_losses)
    return next(i for i, loss in enumerate(val_losses) if loss <= lowest + min_delta)


def head_linear(head: nn.Module) -> nn.Linear:
    """The head's (last) linear layer: the one a probe solves."""
    return [m for m in head.modules() if isinstance(m, nn.Linear)][-1]


def set_linear(head: nn.Module, point: ProbePoint) -> None:
    """Load a probe's solution into the head's (last) linear layer."""
    linear = head_linear(head)
    with torch.no_grad():
        linear.weight.copy_(point.weight.to(linear.weight))
        linear.bias.copy_(point.bias.to(linear.bias))
