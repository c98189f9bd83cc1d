"""What a backbone is to graft (:class:`BackboneSpec`, :class:`Parts`) and how a weights
file is read, shared by graft's own registry (graft.backbones) and the specs generated for
timm models (graft.timm_backbones). Importing it imports neither torch nor timm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import WeightsError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["BackboneSpec", "Parts", "first_line", "load_weights_file"]


@dataclass
class Parts:
    """A built model as graft uses it: blocks that run in order, then pooling."""

    blocks: list[nn.Module]
    num_features: int
    #: None: the blocks own the weights and pooling is the global average (graft's own
    #: backbones); else the timm model whose weights the blocks share and whose
    #: ``forward_head(x, pre_logits=True)`` pools
    owner: nn.Module | None = None
    #: False when the model could not be split into blocks (one block: the whole
    #: ``forward_features``), so fine-tuning cannot start from cached activations
    sequential: bool = True


@dataclass(frozen=True)
class BackboneSpec:
    """Everything graft needs to know about one pretrained backbone."""

    name: str
    #: builds the architecture for square inputs of the given size, random init
    build: Callable[[int], nn.Module] = field(repr=False)
    #: splits a built model (for inputs of the given size) into blocks and pooling
    split: Callable[[nn.Module, int], Parts] = field(repr=False)
    #: builds it with pretrained weights: (a weights file or None, downloads allowed, input
    #: size) -> (the model, where its weights came from)
    create: Callable[[Path | None, bool, int], tuple[nn.Module, str]] = field(repr=False)
    #: per-channel normalisation the pretrained weights were trained with (on 0..1 pixels)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: the resolution the weights were trained at (graft's default input is 128, as in the seed)
    native_img_size: int
    #: how to tell the user where the weights come from
    weights_help: str
    description: str
    #: the resize the weights' own preprocessing uses (timm's pretrained config). graft
    #: resizes every backbone's input one way (the whole image, bilinear with
    #: antialiasing), in training, prediction and every export alike; fine-tuning adapts.
    interpolation: str = "bilinear"
    #: the timm model behind it ('' for VGG16, which is torchvision's)
    timm_name: str = ""


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or .pth, never executing pickled code."""
    import torch

    if not path.is_file():
        raise WeightsError(f"Weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"Could not read weights file {path}: {first_line(exc)}. It may be truncated or not a "
            "PyTorch/safetensors state dict; download it again."
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict (found {type(state).__name__}).")
    return state


def first_line(exc: BaseException, width: int = 160) -> str:
    """The gist of a library's error (torch.load's runs to many lines of advice)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= width else text[: width - 3] + "..."
