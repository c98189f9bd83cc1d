"""Refit: the kept linear probe solved once more on the training and validation images.

Validation images make every choice of a run: the probe's L2 strength, whether fine-tuning
is kept, the temperature and the "unknown" thresholds. Once those are made, they are also
labelled examples the model never learnt from (10-15% of a folder). When the model kept is
the frozen-stage linear probe (a convex problem: one answer for a given L2), graft solves
it again on both, at the chosen strength, starting from the first solution, as
scikit-learn's ``LogisticRegressionCV`` refits on all the data it cross-validated on.

What validation chose stays: the temperature and the thresholds were fitted on images the
first solution had not seen; fitted again on images the refit learnt from, they would make
it overconfident. The held-out test split takes no part, so its accuracy stays honest.
Validation images have no cached augmented views: their clean view stands in for each.

Also done when WiSE-FT keeps 0 x the fine-tuned weights (the frozen-stage model). Not
done when fine-tuning is kept (its epochs were chosen on validation, and training
again on it would need as many epochs without a way to stop), nor for a dense head.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch

from .probe import ProbePoint, choose_point, head_linear, probe_path, set_linear
from .stages import uses_probe

if TYPE_CHECKING:
    from .checkpoint import Best
    from .device import Device
    from .model import GraftModel
    from .plan import Features, Plan, Run
    from .rundir import EpochRecord

__all__ = ["refit_probe"]


def refit_probe(
    run: Run,
    model: GraftModel,
    device: Device,
    plan: Plan,
    features: Features,
    history: list[EpochRecord],
    best: Best,
) -> dict[str, Any] | None:
    """Solve the kept frozen-stage probe again on training + validation images at its L2
    and save the model; None (nothing changed) when the model kept is not such a probe or
    ``--no-refit``. Returns what the summary records."""
    config = run.config
    # WiSE-FT at 0 keeps the frozen-stage weights too (0 x the fine-tuned ones)
    frozen_mix = best.stage == "wise" and (run.wise or {}).get("alpha") == 0
    if not config.refit or not (best.stage == "frozen" or frozen_mix):
        return None
    if not uses_probe(config.head_solver, config.head):
        return None
    frozen = [r for r in history if r.stage == "frozen"]
    if not frozen:
        return None
    if frozen_mix:  # the probe's own choice (graft.stages.run_probe)
        chosen = frozen[choose_point([r.val_loss for r in frozen], config.min_delta)]
    else:
        chosen = next((r for r in frozen if r.step == best.step), frozen[-1])
    if math.isnan(chosen.l2):
        return None
    t0 = time.perf_counter()
    train, val = features.train, features.val
    if plan.cache_cut:  # activations at the cut -> pooled, through the (frozen) top
        from .features import pool_cached

        train = torch.stack([pool_cached(model, v, plan.extract_at, device) for v in train])
        val = pool_cached(model, val, plan.extract_at, device)
    views = torch.cat([train.float(), val.float()[None].expand(train.shape[0], *val.shape)], 1)
    labels = torch.cat([features.labels["train"], features.labels["val"]])
    linear = head_linear(model.head)
    first = ProbePoint(
        chosen.l2, linear.weight.detach().float().cpu(), linear.bias.detach().float().cpu(),
        chosen.train_loss, chosen.train_acc, 0,
    )  # fmt: skip
    point = next(
        probe_path(
            views, labels, features.class_weights, (chosen.l2,), seed=config.seed, start=first
        )
    )
    set_linear(model.head, point)
    model.save(run.dir.model)
    n_train, n_val = len(features.labels["train"]), len(features.labels["val"])
    run.reporter.info(
        f"Refit: the kept linear head solved again on training + validation images "
        f"({n_train} + {n_val}) at L2 {chosen.l2:g}; the temperature and thresholds stay "
        "those validation chose (--no-refit to skip)."
    )
    return {
        "l2": chosen.l2,
        "train_images": n_train,
        "validation_images": n_val,
        "iterations": point.iterations,
        "seconds": round(time.perf_counter() - t0, 3),
    }
