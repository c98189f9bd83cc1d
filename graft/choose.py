"""``--backbone auto``: pick the backbone by a linear probe on honest validation.

Every backbone whose weights are on this machine (EfficientNet-Lite0/1/2 always; VGG16 when
its weights are in the torch cache; every timm model in the Hugging Face cache: nothing is
downloaded) embeds every image once through the feature cache, so a second run on the same
data costs seconds. The split is made first, from the duplicate audits of all of them
(near-duplicate clusters, as any backbone sees them, kept on one side, as in any run),
and the probe (a logistic regression on pooled features) trains on the training part and is
scored on the validation part only: the test part plays no role in the choice, and the run
goes on with exactly this split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .backbones import available_backbones
from .data import ScanResult
from .errors import UsageError, WeightsError
from .split import Split


@dataclass
class Choice:
    backbone: str
    split: Split
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        ranked = sorted(self.scores.items(), key=lambda kv: -kv[1]["val_acc"])
        table = ", ".join(
            f"{name} {s['val_acc']:.1%} (loss {s['val_loss']:.3f}, {s['seconds']:.0f} s)"
            for name, s in ranked
        )
        return f"Backbone auto: {self.backbone} (linear probe on validation: {table})"

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.backbone, "scores": self.scores, "skipped": self.skipped}


def _probe(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    clf.fit(x[train], y[train])
    proba = clf.predict_proba(x[val])
    acc = float((clf.classes_[proba.argmax(1)] == y[val]).mean())
    return acc, float(log_loss(y[val], proba, labels=clf.classes_))


def choose_backbone(
    config: Any, data: ScanResult, reporter: Any, workers: int = 0, ddp: Any = None
) -> Choice:
    """Embed every image with each backbone whose weights are here (through the feature
    cache), split on their duplicate audits joined, and keep the backbone whose linear
    probe scores best on validation."""
    from .audit import audit_for_split, joined_audits
    from .detail import new_model_info
    from .features import FrozenFeatures
    from .model import build_model
    from .split import choose_split

    embedded: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name in available_backbones():
        t0 = time.perf_counter()
        info = new_model_info(config, data, name)
        try:
            model, source = build_model(info, True, None, allow_download=False)
        except (WeightsError, UsageError) as exc:  # no weights here, or not at this size
            skipped[name] = str(exc).split(".")[0]
            continue
        model.eval()
        features = FrozenFeatures(
            model,
            source,
            cache_dir=config.cache_dir,
            seed=config.seed,
            workers=workers,
            reporter=reporter,
            ddp=ddp,
        )
        with torch.no_grad():
            everything = range(len(data.paths))
            label = f"Linear probe: {name} features"
            embedded[name] = features.views(data, everything, label=label).numpy()
        seconds[name] = time.perf_counter() - t0
        del model
    # Split on every backbone's near-copies at once: whichever the probe keeps, its own
    # audit in the run then finds no pair of near-copies on two sides.
    # (the clusters' count is then not the kept backbone's audit's: the note says whose)
    whose = f"that any of the {len(embedded)} probed backbones finds" if len(embedded) > 1 else ""
    report = joined_audits([audit_for_split(config, data, x) for x in embedded.values()], whose)
    split = choose_split(config, data, report, reporter, next(iter(embedded.values())))
    side = np.asarray(split.subsets)
    train, val = np.nonzero(side == "train")[0], np.nonzero(side == "val")[0]
    y = np.asarray(data.labels)
    scores = {}
    for name, x in embedded.items():
        acc, loss = _probe(x, y, train, val)
        scores[name] = {"val_acc": acc, "val_loss": loss, "seconds": seconds[name]}
    # best validation accuracy; ties go to the lower validation loss
    best = max(scores, key=lambda n: (round(scores[n]["val_acc"], 4), -scores[n]["val_loss"]))
    return Choice(best, split, scores, skipped)


__all__ = ["Choice", "choose_backbone"]
