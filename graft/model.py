"""The grafted classifier (pretrained backbone + new head) and its self-describing checkpoint.

A checkpoint is one ``model.safetensors`` file whose metadata holds everything needed to
rebuild the model and its preprocessing (backbone name, input size, normalisation, class
names, head shape), so predict, evaluate and serve need nothing else. No pickle anywhere.

Partial forward passes belong to the model (in the spirit of timm's ``forward_features`` /
``forward_head``): a backbone is a stack of blocks, and training caches activations at a
"cut" between them. :meth:`GraftModel.frozen_part` runs the blocks below a cut (what the
cache stores), :meth:`GraftModel.pooled_from` and :meth:`GraftModel.forward_from` go on from
activations at a cut to pooled features or logits, and :class:`Top` is the part that learns
as one module (what DistributedDataParallel wraps).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .backbones import BackboneSpec, create_imagenet_model, get_spec
from .errors import UsageError, WeightsError
from .modelinfo import ModelInfo, resolve_model_file

if TYPE_CHECKING:
    from .familiarity import Familiarity


class Backbone(nn.Module):
    """A pretrained network without its classifier: images in, pooled feature vectors out.

    ``blocks`` run in order (what the cache and "unfreeze the last N blocks" count), then
    :meth:`pool`. graft's own backbones own their weights as ``blocks`` and pool by the global
    average; a timm model is kept whole as ``model`` (its weights keep timm's names), its
    blocks are views onto it (graft.timm_backbones) and it pools with its own
    ``forward_head(x, pre_logits=True)``.
    """

    blocks: Sequence[nn.Module]

    def __init__(self, spec: BackboneSpec, model: nn.Module, img_size: int | None = None):
        super().__init__()
        self.name = spec.name
        parts = spec.split(model, img_size or spec.native_img_size)
        self.num_features = parts.num_features
        #: False when the model is one block (it could not be split): no cache at a cut
        self.sequential = parts.sequential
        self.model: nn.Module | None = parts.owner
        if parts.owner is None:
            self.blocks = nn.ModuleList(parts.blocks)
        else:
            self.blocks = list(parts.blocks)  # views: not registered a second time

    def forward_maps(
        self, x: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Activations after blocks ``start`` to ``stop`` (default: the last), from ``x``,
        the activations before block ``start`` (the images when ``start`` is 0)."""
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """Pooled feature vectors from the last block's activations."""
        if self.model is None:
            return maps.mean(dim=(2, 3))
        return self.model.forward_head(maps, pre_logits=True)  # type: ignore[no-any-return]

    def pool_parameters(self) -> list[nn.Parameter]:
        """Parameters above the blocks (a timm model's norm after pooling, ``fc_norm``):
        they learn whenever any block does."""
        if self.model is None:
            return []
        inside = {id(p) for block in self.blocks for p in block.parameters()}
        return [p for p in self.model.parameters() if id(p) not in inside]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_maps(x))


def create_backbone(
    spec: BackboneSpec | str,
    pretrained: bool = True,
    weights: str | Path | None = None,
    allow_download: bool = True,
    img_size: int | None = None,
) -> tuple[Backbone, str]:
    """Build a backbone for ``img_size`` inputs (default: the size its weights were trained
    at); returns it and a short description of its weights' source.

    With ``pretrained=False`` the weights are random, which is only useful when a full
    state dict is loaded afterwards (a saved run) or when training from scratch on purpose.
    """
    spec = get_spec(spec) if isinstance(spec, str) else spec
    size = img_size or spec.native_img_size
    if pretrained:
        model, source = create_imagenet_model(spec, weights, allow_download, size)
    else:
        model, source = spec.build(size), "random"
    return Backbone(spec, model, size), source


def make_head(
    num_features: int, num_classes: int, head: str = "linear", dropout: float = 0.2
) -> nn.Sequential:
    """``linear``: dropout -> linear. ``dense:N``: linear(N) -> ReLU -> dropout -> linear,
    like the seed's Dense(256) + softmax head. Pooling happens in the backbone."""
    if head == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))
    hidden = int(head.split(":")[1])
    return nn.Sequential(
        nn.Linear(num_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


class GraftModel(nn.Module):
    """Backbone (images -> pooled features) followed by the new head (features -> logits)."""

    def __init__(self, backbone: Backbone, head: nn.Module, info: ModelInfo):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.info = info
        # fitted after training (graft.familiarity); saved as ``familiarity.bank``
        self.familiarity: Familiarity | None
        self.register_module("familiarity", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def forward_with_familiarity(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and the images' familiarity (None when the model has no score)."""
        features = self.backbone(x)
        logits = self.head(features)
        if self.familiarity is None:
            return logits, None
        return logits, self.familiarity(features)

    # ------------------------------------------------------------------ partial passes
    @property
    def n_blocks(self) -> int:
        return len(self.backbone.blocks)

    def frozen_part(self, cut: int) -> FrozenPart:
        """The blocks below ``cut`` as a module (pooled when ``cut`` is the end)."""
        return FrozenPart(self.backbone, cut)

    def pooled_from(self, maps: torch.Tensor, cut: int) -> torch.Tensor:
        """Pooled features from activations at block ``cut`` (already pooled at the end)."""
        if cut == self.n_blocks:
            return maps
        return self.backbone.pool(self.backbone.forward_maps(maps, start=cut))

    def forward_from(self, maps: torch.Tensor, cut: int) -> torch.Tensor:
        """Logits from activations at block ``cut`` (pooled features when ``cut`` is the
        end)."""
        if cut == self.n_blocks:
            return self.head(maps)
        return self.head(self.pooled_from(maps, cut))

    def activation_bytes(self, cut: int, img_size: int) -> int:
        """Bytes of one image's activations at ``cut`` (fp32), by running a blank image."""
        if cut >= self.n_blocks:
            return self.backbone.num_features * 4
        with torch.no_grad():
            device = next(self.parameters()).device
            x = torch.zeros(1, 3, img_size, img_size, device=device)
            x = self.eval().backbone.forward_maps(x, 0, cut)
        return x.numel() * 4

    # ------------------------------------------------------------------ freezing
    def freeze_backbone(self) -> None:
        self.backbone.requires_grad_(False)

    def unfreeze(self, last_blocks: int | None) -> int:
        """Let the last ``last_blocks`` backbone blocks learn (None = all), and with them
        anything above the blocks (:meth:`Backbone.pool_parameters`); returns how many."""
        blocks = self.backbone.blocks
        n = len(blocks) if last_blocks is None else min(last_blocks, len(blocks))
        self.backbone.requires_grad_(False)
        for block in blocks[len(blocks) - n :]:
            block.requires_grad_(True)
        for param in self.backbone.pool_parameters() if n else []:
            param.requires_grad_(True)
        return n

    def train(self, mode: bool = True) -> GraftModel:
        """Like ``nn.Module.train`` but BatchNorm layers always stay in inference mode.

        With small batches of a new dataset, updating BatchNorm statistics wrecks the
        pretrained features (Keras' transfer-learning guide makes the same choice). Their
        scale and shift still learn when their block is unfrozen.
        """
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    # ------------------------------------------------------------------ saving
    def save(self, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write the weights (or ``state``, a state dict of this model) with their metadata."""
        from safetensors.torch import save_file

        from .io import atomic_save

        state = {k: v.detach().contiguous().cpu() for k, v in (state or self.state_dict()).items()}
        atomic_save(Path(path), lambda tmp: save_file(state, tmp, metadata=self.info.to_metadata()))


def build_model(
    info: ModelInfo,
    pretrained: bool = True,
    weights: str | Path | None = None,
    allow_download: bool = True,
) -> tuple[GraftModel, str]:
    spec = get_spec(info.backbone)
    backbone, source = create_backbone(spec, pretrained, weights, allow_download, info.img_size)
    head = make_head(backbone.num_features, len(info.classes), info.head, info.dropout)
    return GraftModel(backbone, head, info), source


def load_model(path: str | Path) -> GraftModel:
    """Rebuild a model from a ``model.safetensors`` written by :meth:`GraftModel.save`;
    its metadata, the head's shape and every weight (finite) are checked first."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = resolve_model_file(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:
        raise WeightsError(
            f"Could not read {path}: {exc}. The file is truncated or not a graft model; "
            "train again or restore it from a backup."
        ) from exc
    info = ModelInfo.from_metadata(meta, path)
    problem = head_problem(info, state) or nonfinite_problem(state)
    if problem:
        raise WeightsError(
            f"{path.name} in {path.parent} is damaged: {problem}. The file was changed after "
            "training; retrain the run or restore the file."
        )
    try:
        get_spec(info.backbone)  # a name timm does not know: the metadata was edited
    except UsageError as exc:
        raise WeightsError(
            f"{path.name} in {path.parent} has invalid metadata: backbone={info.backbone} "
            f"({exc}). The file was changed after training; retrain the run or restore the file."
        ) from exc
    model, _ = build_model(info, pretrained=False)
    problem = familiarity_problem(info, state, model.backbone.num_features, meta)
    if problem:
        raise WeightsError(
            f"{path.name} in {path.parent} is damaged: {problem}. The file was changed after "
            "training; retrain the run or restore the file."
        )
    if "familiarity.bank" in state:
        from .familiarity import Familiarity

        model.familiarity = Familiarity(state["familiarity.bank"], info.familiarity_k)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not match its own description: {exc}") from exc
    return model.eval()


def head_problem(info: ModelInfo, state: dict[str, torch.Tensor]) -> str:
    """Whether the stored head matches the metadata (classes, hidden size), checked before
    the model is built, so a tampered ``dense:N`` cannot allocate a huge layer first."""
    last = "head.1.weight" if info.head == "linear" else "head.3.weight"
    if last not in state or state[last].ndim != 2:
        return f"it has no {last} tensor for its head {info.head!r}"
    if state[last].shape[0] != len(info.classes):
        return (
            f"its head has {state[last].shape[0]} outputs but the metadata lists "
            f"{len(info.classes)} classes"
        )
    if info.head != "linear":
        hidden = int(info.head.split(":")[1])
        first = state.get("head.0.weight")
        if first is None or first.ndim != 2 or first.shape[0] != hidden:
            return f"its head's hidden layer does not have the {hidden} units {info.head!r} says"
    return ""


def familiarity_problem(
    info: ModelInfo, state: dict[str, torch.Tensor], features: int, meta: dict[str, str]
) -> str:
    """Whether the stored familiarity bank agrees with the metadata (``meta``, as stored)
    and the backbone."""
    bank = state.get("familiarity.bank")
    if bank is None:
        return "its metadata has a familiarity score but no bank" if info.familiarity_k else ""
    if not info.familiarity_k:
        return "it holds a familiarity bank but its metadata has no familiarity_k"
    if bank.ndim != 2 or not len(bank) or bank.shape[1] != features:
        return (
            f"its familiarity bank has shape {tuple(bank.shape)}, not [rows, {features}] for "
            "its backbone"
        )
    if not bank.is_floating_point():
        return f"its familiarity bank holds {bank.dtype} values, not floating-point features"
    norms = bank.float().norm(dim=1)
    if not bool(torch.isfinite(norms).all()) or float((norms - 1).abs().max()) > 1e-2:
        return "its familiarity bank's rows are not unit vectors (graft stores them normalised)"
    if info.familiarity_k > len(bank):
        return f"familiarity_k={info.familiarity_k} but its bank holds only {len(bank)} rows"
    if "familiarity_threshold" not in meta:
        return "its metadata has a familiarity bank but no familiarity_threshold"
    return ""


def nonfinite_problem(tensors: dict[str, torch.Tensor]) -> str:
    """A sentence naming the first tensors holding NaN or infinite values, or ''."""
    bad = [
        name
        for name, t in tensors.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if not bad:
        return ""
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"NaN or infinite values in {', '.join(bad[:3])}{more}"


class FrozenPart(nn.Module):
    """The backbone up to block ``cut`` (pooled to vectors when ``cut`` is the end): what a
    frozen pass computes and the feature cache stores. It holds the whole backbone, so that
    the views of a timm model's blocks find their weights registered (an ONNX export keeps
    only the weights the graph uses)."""

    def __init__(self, backbone: Backbone, cut: int):
        super().__init__()
        self.backbone, self.cut = backbone, cut
        self.pooled = cut == len(backbone.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone.forward_maps(x, 0, self.cut)
        return self.backbone.pool(x) if self.pooled else x


class Top(nn.Module):
    """The learning part of the model as one module: the blocks from ``cut`` up and the
    head, from activations at the cut. ``below=True`` takes images and also runs the frozen
    blocks under the cut, without gradients (fine-tuning on images)."""

    def __init__(self, model: GraftModel, cut: int, below: bool = False):
        super().__init__()
        self.model, self.cut, self.below = model, cut, below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.below and self.cut > 0:
            with torch.no_grad():
                x = self.model.backbone.forward_maps(x, 0, self.cut)
        if self.below and self.cut == 0:
            return self.model(x)
        return self.model.forward_from(x, self.cut)
