"""Familiarity: how much an image looks like the training images, so that a picture of none
of the classes can be answered "unknown" instead of with a confident wrong label.

A softmax classifier spreads all its probability over the classes it knows, so a photo of
anything gets one of them, often at 90% (the seed tutorial's "Mewtwo 58.9%"). The score here
is the nearest-neighbour one of Sun et al. (2022): the cosine similarity between the image's
pooled backbone features and those of its ``k``-th most similar training image. An image far
from every training image is unfamiliar whatever the head says. Measured in BENCHMARKS.md
("Open set") on four models (5 and 100 Pokémon, Fashion-MNIST, digits) against maximum
softmax probability, energy and (relative) Mahalanobis distance, it separated images of
other classes best or within 0.02 AUROC of the best on each; k=1 beat k=10 by 0.05-0.11 AUROC
where classes have few training images (many100, digits) and was within 0.013 elsewhere.

The training features are the "bank", capped at :data:`BANK_CAP` rows (a class-balanced
sample): they travel inside the model file and every exported graph (1280 features x 2048
rows = 10 MB). The threshold needs no outside images; it keeps ``keep`` (95%) of a reference
set answered:

- the ``--unseen`` images when the run has them: the real change of source;
- otherwise validation images under strong augmentation (:data:`SHIFT_AUGMENT`,
  :data:`SHIFT_VIEWS` views each), a stand-in for pictures of the classes from elsewhere
  (artwork for a model trained on sprites, a phone photo for one trained on product shots),
  which plain validation images would all reject; it costs 0-1% of in-class images;
- or, with ``--unknown-reference validation``, the plain validation images: when new images
  come from the same source as the training ones, this rejects far more images of new
  classes (digits 6-9 for a 0-5 model: 78% against 0%) at 4-6% of in-class images.

The leave-one-class-out share says what to expect for a new class from the training source:
validation images scored against the bank without their own class, as if it were new.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "BANK_CAP",
    "KNN_K",
    "SHIFT_AUGMENT",
    "SHIFT_VIEWS",
    "Familiarity",
    "FamiliarityFit",
    "balanced_sample",
    "fit_familiarity",
]

#: neighbours: the k-th most similar training image sets the score (Sun et al. use k=50 of
#: all ImageNet; with tens of images per class the 10th neighbour is of another class)
KNN_K = 1
#: rows of the bank at most: a class-balanced sample of the training features beyond it
#: (with k=1, 1024 rows cost at most 0.004 AUROC against all 1657 on the 100-class case)
BANK_CAP = 2048
#: the augmentation that simulates pictures of the classes from another source
SHIFT_AUGMENT = "strong"
SHIFT_VIEWS = 4
#: the threshold sits this far below the reference score it keeps: an image's familiarity
#: differs between engines by up to 8e-3 (measured: PyTorch under bf16 autocast against the
#: fp32 export, 64 px; 3e-3 at 128 px), and the images that set the threshold must not fall
#: on the other side of it in another engine
THRESHOLD_SLACK = 0.01
#: validation images used for the threshold at most (a class-stratified sample beyond it)
SHIFT_MAX_IMAGES = 1000


class Familiarity(nn.Module):
    """Pooled features -> familiarity, the cosine similarity to the ``k``-th nearest row of
    ``bank`` (L2-normalised training features), in [-1, 1]; higher is more familiar.

    Computed in fp32 even under autocast: the threshold is compared to it in every engine.
    """

    def __init__(self, bank: torch.Tensor, k: int = KNN_K):
        super().__init__()
        if bank.ndim != 2 or not len(bank):
            raise ValueError("the familiarity bank must be a non-empty [rows, features] matrix")
        self.register_buffer("bank", bank.float().contiguous())
        self.k = max(1, min(int(k), len(bank)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=features.device.type, enabled=False):
            f = F.normalize(features.float(), dim=1)
            similarity = f @ self.bank.t()
            # a cosine: rounding can take an image's match with itself to 1.0000001
            return similarity.topk(self.k, dim=1).values[:, -1].clamp(-1.0, 1.0)


def balanced_sample(labels: Sequence[int], cap: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``cap`` items, as even across the classes as their sizes allow
    (each class its share, small classes whole, the rest spread over the larger ones), in
    increasing order. All indices when there are no more than ``cap``."""
    y = np.asarray(labels)
    if len(y) <= cap:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)]
    quota = {i: 0 for i in range(len(groups))}
    left = cap
    open_ = sorted(range(len(groups)), key=lambda i: len(groups[i]))
    while open_ and left > 0:
        share = left // len(open_)
        i = open_[0]
        if len(groups[i]) - quota[i] <= share:  # the smallest fits whole: take it all
            left -= len(groups[i]) - quota[i]
            quota[i] = len(groups[i])
            open_.pop(0)
            continue
        for j in open_:  # the rest take an equal share; the remainder goes to the first ones
            quota[j] += share
        left -= share * len(open_)
        for j in open_[:left]:
            quota[j] += 1
        break
    chosen = [rng.choice(g, quota[i], replace=False) for i, g in enumerate(groups)]
    return np.sort(np.concatenate(chosen))


@dataclass
class FamiliarityFit:
    """What fitting decided, for the log and ``summary.json``."""

    module: Familiarity
    threshold: float
    bank_rows: int
    reference: str  # what the threshold keeps ``keep`` of, in words
    reference_kept: float  # share of the reference answered (about ``keep``)
    val_kept: float  # share of the plain validation images answered
    new_class_rejected: float | None  # leave-one-class-out: a new class from the source
    unseen_kept: float | None = None  # share of --unseen images answered, when given

    def to_dict(self) -> dict[str, float | int | str | None]:
        return {
            "score": f"cosine similarity to the nearest training image (k={self.module.k})",
            "k": self.module.k,
            "threshold": self.threshold,
            "bank_rows": self.bank_rows,
            "reference": self.reference,
            "reference_kept": self.reference_kept,
            "validation_kept": self.val_kept,
            "new_class_rejected": self.new_class_rejected,
            "unseen_kept": self.unseen_kept,
        }


def fit_familiarity(
    train_features: torch.Tensor,
    train_labels: Sequence[int],
    reference_features: torch.Tensor,
    keep: float,
    val_features: torch.Tensor,
    val_labels: Sequence[int],
    reference: str = "validation images",
    unseen_features: torch.Tensor | None = None,
    seed: int = 0,
    cap: int = BANK_CAP,
    k: int = KNN_K,
) -> FamiliarityFit:
    """The bank from the training features, and the threshold that keeps ``keep`` of the
    ``reference_features`` answered."""
    rows = balanced_sample(list(train_labels), cap, seed)
    bank = F.normalize(train_features[torch.as_tensor(rows)].float(), dim=1)
    module = Familiarity(bank, k).eval()
    bank_labels = torch.as_tensor(np.asarray(train_labels)[rows])
    with torch.no_grad():
        scores = module(reference_features).numpy()
        # the lower quantile (an observed score: ``keep`` or a little more stay), minus slack
        threshold = float(np.quantile(scores, 1.0 - keep, method="lower")) - THRESHOLD_SLACK
        threshold = max(-1.0, threshold)

        def kept(features: torch.Tensor | None) -> float | None:
            if features is None or not len(features):
                return None
            return float((module(features).numpy() >= threshold).mean())

        val_kept = kept(val_features)
        new_class = _left_out_scores(module, bank_labels, val_features, val_labels)
    return FamiliarityFit(
        module,
        threshold,
        len(rows),
        reference,
        float((scores >= threshold).mean()),
        0.0 if val_kept is None else val_kept,
        None if new_class is None else float((new_class < threshold).mean()),
        kept(unseen_features),
    )


def _left_out_scores(
    module: Familiarity,
    bank_labels: torch.Tensor,
    features: torch.Tensor,
    labels: Sequence[int],
) -> np.ndarray | None:
    """Each image's familiarity against the bank without its own class: how an image of a
    class the model never saw, from the same source, would score. None with one class."""
    if len(torch.unique(bank_labels)) < 2 or not len(features):
        return None
    f = F.normalize(features.float(), dim=1)
    similarity = f @ module.bank.t()
    own = torch.as_tensor(list(labels))[:, None] == bank_labels[None, :]
    similarity = similarity.masked_fill(own, -2.0)  # below any cosine similarity
    k = min(module.k, int((~own).sum(1).min()))
    return similarity.topk(max(1, k), dim=1).values[:, -1].numpy()
