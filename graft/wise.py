"""WiSE-FT (Wortsman et al., CVPR 2022): a weight-space ensemble of the frozen-stage model
and the fine-tuned one.

Fine-tuning fits the training source better and tends to forget what made the pretrained
features work on images from elsewhere. Interpolating the weights,
``theta(alpha) = (1 - alpha) * theta_frozen + alpha * theta_finetuned``, keeps much of both:
the paper gains several points out of distribution at no cost in distribution, for no extra
inference cost (it is still one network). Both endpoints share the frozen lower blocks and
BatchNorm statistics, so only the head and the unfrozen blocks differ.

``--wise auto`` picks alpha from (0, 0.25, 0.5, 0.75, 1) by validation loss (0 is the
frozen-stage model, so it is also the guard against fine-tuning that does not help);
``--wise 0.5`` fixes it. ``mix(a, b, 0)`` is ``a`` and ``mix(a, b, 1)`` is ``b`` exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .checkpoint import Best
from .model import GraftModel
from .plan import Run

__all__ = ["ALPHAS", "mix", "mix_weights", "wise_anchor"]

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def mix(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * a + alpha * b`` per tensor (``torch.lerp``: exact at 0 and 1);
    integer tensors (BatchNorm's counters) come from ``b``."""
    return {
        k: torch.lerp(a[k], b[k], alpha) if b[k].is_floating_point() else b[k].clone() for k in b
    }


def learning_keys(model: GraftModel) -> list[str]:
    """The state entries that fine-tuning can change: the head and the unfrozen blocks."""
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    return [k for k in model.state_dict() if k in learning or k.startswith("head.")]


def wise_anchor(
    model: GraftModel, best: Best, state: dict[str, Any] | None, wanted: bool
) -> dict[str, torch.Tensor] | None:
    """The frozen-stage model's changeable tensors, taken as fine-tuning starts (call it
    after unfreezing). A resumed run takes them from its checkpoint."""
    if not wanted:
        return None
    keys = learning_keys(model)
    if state is not None and state["stage"] == "fine-tune":
        saved = {k[7:]: v for k, v in state["tensors"].items() if k.startswith("anchor.")}
        if set(keys) <= saved.keys():
            return {k: saved[k].clone() for k in keys}
        if best.stage != "frozen":  # a checkpoint from before --wise existed
            return None
        return {k: best.state[k].detach().clone() for k in keys}
    current = model.state_dict()
    return {k: current[k].detach().clone() for k in keys}


@torch.no_grad()
def mix_weights(
    run: Run,
    model: GraftModel,
    anchor: dict[str, torch.Tensor] | None,
    validate: Any,
    best: Best,
    device: Any,
    step: int,
) -> dict[str, Any] | None:
    """Choose (``--wise auto``) or take (``--wise ALPHA``) the mix of the frozen-stage model
    (``anchor``) and the fine-tuned weights now in ``model``; it becomes the kept model."""
    config, reporter = run.config, run.reporter
    if anchor is None:
        reporter.warn(
            "--wise: this run's checkpoint predates the frozen-stage weights it needs; the "
            "best epoch is kept instead."
        )
        return None
    current = model.state_dict()
    tuned = {k: current[k].detach().clone() for k in anchor}
    fixed = config.wise_alpha
    alphas = (fixed,) if fixed is not None else ALPHAS
    loss_fn = nn.CrossEntropyLoss()
    tried = []
    for alpha in alphas:
        model.load_state_dict(mix(anchor, tuned, alpha), strict=False)
        loss, acc = validate(model, loss_fn, device)
        tried.append({"alpha": alpha, "val_loss": loss, "val_acc": acc})
    chosen = min(tried, key=lambda t: t["val_loss"])
    how = "fixed by --wise" if fixed is not None else "the lowest validation loss"
    if fixed is None and best.loss < chosen["val_loss"] - 1e-6:
        # an earlier epoch (before fine-tuning overshot) beats every mix with the last one
        reporter.info(
            f"WiSE-FT: no mix beat epoch {best.step} ({best.stage} stage, validation loss "
            f"{best.loss:.4f}), which is kept."
        )
        return {"alpha": None, "chosen_by": "an epoch beat every mix", "tried": tried}
    model.load_state_dict(mix(anchor, tuned, chosen["alpha"]), strict=False)
    best.keep("wise", chosen["val_loss"], step)
    reporter.info(
        f"WiSE-FT: kept {chosen['alpha']:g} x fine-tuned + {1 - chosen['alpha']:g} x "
        f"frozen-stage weights ({how}; validation loss {chosen['val_loss']:.4f}, accuracy "
        f"{chosen['val_acc']:.1%})"
        + (
            "; tried " + ", ".join(f"{t['alpha']:g}: {t['val_loss']:.4f}" for t in tried)
            if len(tried) > 1
            else ""
        )
    )
    return {"alpha": chosen["alpha"], "chosen_by": how, "tried": tried}
