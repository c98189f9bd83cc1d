"""The grafted classifier (pretrained backbone + new head) and its self-describing checkpoint.

A checkpoint is one ``model.safetensors`` file whose metadata holds everything needed to
rebuild the model and its preprocessing (backbone name, input size, normalisation, class
names, head shape), so predict, evaluate and serve need nothing else. No pickle anywhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .backbones import Backbone, create_backbone, get_spec
from .errors import RunFolderError, WeightsError

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class ModelInfo:
    """What a saved model is: enough to rebuild it and preprocess its inputs."""

    backbone: str
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: tuple[str, ...]
    head: str = "linear"
    dropout: float = 0.2
    #: logits are divided by this before the softmax; fitted on validation data after
    #: training so that a predicted 80% is right about 80% of the time (1.0 = uncalibrated)
    temperature: float = 1.0
    #: below this top probability, predict answers "unknown" (chosen on validation data)
    unknown_threshold: float = 0.0
    #: crop a uniform background around the object before resizing (graft.runtime)
    trim: bool = False

    def to_metadata(self) -> dict[str, str]:
        data = asdict(self)
        return {"graft_format": FORMAT_VERSION, **{k: json.dumps(v) for k, v in data.items()}}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> ModelInfo:
        try:
            data = {
                k: json.loads(meta[k])
                for k in ("backbone", "img_size", "mean", "std", "classes", "head", "dropout")
            }
        except (KeyError, json.JSONDecodeError) as exc:
            raise WeightsError(f"The model file lacks graft's metadata ({exc}).") from exc
        data["temperature"] = float(json.loads(meta.get("temperature", "1.0")))
        data["unknown_threshold"] = float(json.loads(meta.get("unknown_threshold", "0.0")))
        data["trim"] = bool(json.loads(meta.get("trim", "false")))
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        data["classes"] = tuple(data["classes"])
        return cls(**data)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    # ------------------------------------------------------------------ freezing
    def freeze_backbone(self) -> None:
        self.backbone.requires_grad_(False)

    def unfreeze(self, last_blocks: int | None) -> int:
        """Let the last ``last_blocks`` backbone blocks learn (None = all); returns how many."""
        blocks = self.backbone.blocks
        n = len(blocks) if last_blocks is None else min(last_blocks, len(blocks))
        self.backbone.requires_grad_(False)
        for block in blocks[len(blocks) - n :]:
            block.requires_grad_(True)
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
    backbone, source = create_backbone(spec, pretrained, weights, allow_download)
    head = make_head(backbone.num_features, len(info.classes), info.head, info.dropout)
    return GraftModel(backbone, head, info), source


def resolve_model_file(path: str | Path) -> Path:
    """``RUN_DIR`` or ``RUN_DIR/model.safetensors`` -> the weights file, or a clear error."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise RunFolderError(
            f"No trained model at {path}. Point graft at a run folder made by `graft train`."
        )
    return path


def load_model(path: str | Path) -> GraftModel:
    """Rebuild a model from a ``model.safetensors`` written by :meth:`GraftModel.save`."""
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
    info = ModelInfo.from_metadata(meta)
    model, _ = build_model(info, pretrained=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not match its own description: {exc}") from exc
    return model.eval()
