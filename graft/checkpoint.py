"""Model selection and resumable checkpoints.

:class:`Best` keeps the weights of the epoch with the lowest validation loss across both
stages (and writes them to ``model.safetensors`` as they improve). ``checkpoint.safetensors``
holds everything needed to continue after the last finished epoch: the weights that can
have changed, the optimizer, every random state (each rank's under torchrun) and the
history, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .errors import RunFolderError
from .io import atomic_save
from .model import GraftModel
from .rundir import EpochRecord

__all__ = ["Best", "load_checkpoint", "restore_checkpoint", "save_checkpoint"]


class Best:
    """Tracks the best validation loss across both stages and saves its weights."""

    def __init__(self, model: GraftModel, path: Path):
        self.model, self.path = model, path
        self.loss, self.step, self.stage = math.inf, 0, ""
        self.state: dict[str, torch.Tensor] = {}

    def update(self, record: EpochRecord) -> bool:
        # Lower by more than float noise (one part in a million), however small the loss:
        # on easy data the losses run to 1e-7, and the kept epoch is said to be the lowest.
        if record.val_loss < self.loss * (1 - 1e-6):
            self.loss, self.step, self.stage = record.val_loss, record.step, record.stage
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.save(self.path)
            return True
        return False

    def keep(self, stage: str, loss: float, step: int) -> None:
        """Keep the model's current weights, which no epoch produced (a WiSE-FT mix made
        after ``step``, the last epoch)."""
        self.loss, self.stage, self.step = loss, stage, step
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.save(self.path)

    def restore(self) -> None:
        if self.state:
            self.model.load_state_dict(self.state)

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "step": self.step, "stage": self.stage}

    def resume(self, saved: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """After a restart: the best weights are the (still pretrained) model with the
        checkpoint's ``best.*`` tensors on top. They are written back to disk, because the
        interrupted run may have saved a newer epoch's weights before its checkpoint."""
        self.loss, self.step, self.stage = saved["loss"], saved["step"], saved["stage"]
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.state.update({k[5:]: v for k, v in tensors.items() if k.startswith("best.")})
        self.model.save(self.path, self.state)


def save_checkpoint(
    path: Path,
    model: GraftModel,
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    rank_rng: list[torch.Tensor],
    meta: dict[str, Any],
    best_state: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor] | None = None,
) -> None:
    """Everything needed to continue after this epoch, in one atomically written file
    (``rank_rng``: under torchrun, each rank's random state, so dropout resumes exactly).

    Only tensors that can have changed are stored (those that are learning, and the head):
    the rest of the backbone is still exactly its pretrained weights.
    """
    from safetensors.torch import save_file

    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    tensors = {
        f"model.{k}": v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k in learning or k.startswith("head.")
    }
    # The best weights so far differ from the pretrained ones in the same tensors at most.
    for k, v in best_state.items():
        if k in learning or k.startswith("head."):
            tensors[f"best.{k}"] = v.detach().cpu().contiguous()
    for k, v in (anchor or {}).items():  # the frozen-stage weights WiSE-FT mixes with
        tensors[f"anchor.{k}"] = v.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    for rank, rng in enumerate(rank_rng):
        tensors[f"rng.torch.rank{rank}"] = rng
    for name, generator in generators.items():
        tensors[f"rng.{name}"] = generator.get_state()
    meta = {**meta, "param_groups": opt["param_groups"]}
    atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(meta)}))


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint's metadata with its tensors under ``"tensors"``; None when absent.

    Its state and tensors are checked before anything is restored from them: a resume must
    refuse a damaged checkpoint before it writes anything into the run folder."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .model import nonfinite_problem

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as fh:
            meta = json.loads((fh.metadata() or {})["state"])
        tensors = load_file(str(path))
    except Exception as exc:
        raise RunFolderError(f"The checkpoint {path} is unreadable ({exc}). {_RESTART}") from exc
    problem = state_problem(meta) or nonfinite_problem(
        {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    )
    missing = [k for k in ("rng.torch", "rng.generator", "rng.loader") if k not in tensors]
    if not problem and missing:
        problem = f"it lacks the random states {', '.join(missing)}"
    if problem:
        raise RunFolderError(
            f"The checkpoint {path} is damaged: {problem}; it was changed after it was "
            f"written. {_RESTART}"
        )
    meta["tensors"] = tensors
    return meta  # type: ignore[no-any-return]


_RESTART = "Delete it to restart the stages from the beginning, or start a new run."

#: stages a checkpoint can be in (graft.plan's names)
STAGES = ("frozen", "fine-tune")


def state_problem(meta: Any) -> str:
    """What is wrong with a checkpoint's ``state`` metadata, or '' when it has the shape
    :func:`save_checkpoint` writes (so a resume never fails half-way on a KeyError)."""
    if not isinstance(meta, dict):
        return "its state is not a JSON object"
    want: dict[str, tuple[type, ...]] = {
        "stage": (str,),
        "epoch": (int,),
        "stale": (int,),
        "stage_done": (bool,),
        "best": (dict,),
        "history": (list,),
        "param_groups": (list,),
    }
    for key, types in want.items():
        value = meta.get(key)
        if not isinstance(value, types) or (types == (int,) and isinstance(value, bool)):
            return f"its state has {key}={value!r}"
    if meta["stage"] not in STAGES or meta["epoch"] < 1 or meta["stale"] < 0:
        return f"its state has stage {meta['stage']!r}, epoch {meta['epoch']}"
    best = meta["best"]
    if not (
        _number(best.get("loss"), allow_inf=True)
        and isinstance(best.get("step"), int)
        and isinstance(best.get("stage"), str)
    ):
        return f"its best epoch is {best!r}"
    if "progress_loss" in meta and not _number(meta["progress_loss"], allow_inf=True):
        return f"its state has progress_loss={meta['progress_loss']!r}"
    fields, required = set(EpochRecord.FIELDS), set(EpochRecord.FIELDS[:9])
    for i, record in enumerate(meta["history"]):
        if not (isinstance(record, dict) and required <= record.keys() <= fields):
            return f"its history's record {i + 1} is not an epoch record"
    if not all(isinstance(g, dict) and "params" in g for g in meta["param_groups"]):
        return "its optimizer's parameter groups are malformed"
    return ""


def _number(value: Any, allow_inf: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return not math.isnan(value) and (allow_inf or math.isfinite(value))


def restore_checkpoint(
    state: dict[str, Any],
    model: GraftModel,
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    rank: int = 0,
) -> None:
    tensors = state["tensors"]
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_state, strict=False)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    # The moments were saved contiguous; a channels_last parameter needs them in its own
    # layout (the fused optimizers walk the memory of both in step).
    for param, entry in optimizer.state.items():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                if value.stride() != param.stride():
                    entry[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
    torch.set_rng_state(tensors.get(f"rng.torch.rank{rank}", tensors["rng.torch"]))
    for name, generator in generators.items():
        generator.set_state(tensors[f"rng.{name}"])
