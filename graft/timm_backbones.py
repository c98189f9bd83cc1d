"""Any timm model as a graft backbone: its spec (from timm's pretrained config), its weights
(timm's own loading) and its blocks.

**Spec.** Mean, std and the pretrained input size come from the model's ``pretrained_cfg``
(``timm.data.resolve_data_config``). graft resizes every backbone's input one way (the whole
image, bilinear with antialiasing), not with the crop and interpolation timm's evaluation
uses: training, prediction and every export then agree, and fine-tuning adapts.

**Weights**, in this order: ``--weights FILE`` (safetensors or a plain state dict, read
without executing pickled code); the Hugging Face cache (or the torch hub cache for weights
timm fetches by URL), read without network; a download through timm
(``timm.create_model(name, pretrained=True)``, cache respected) unless downloads are off
(``--offline``). All three go through timm's loading, so its checkpoint filters apply (a
ViT's position embedding resampled to the input size). No weights: a
:class:`~graft.errors.WeightsError` that says what to do; never random weights unless asked
(``--no-pretrained``).

**Blocks.** ``forward_features`` is split into modules that run one after another: the
model's own children up to its head (ResNet: stem, ``layer1``..``layer4``; ConvNeXt: stem,
stages; EfficientNet/MobileNet: stem, block stages, ``conv_head``), or for a Vision
Transformer its embedding (patches, class/register tokens, position embedding), each
transformer block and the final norm. Consecutive pieces are merged along timm's own
parameter groups (``model.group_matcher(coarse=True)``, the grouping timm uses for
layer-wise learning-rate decay), so "the last N blocks" are the model's last N stages or
transformer blocks. A split is used only if it reproduces ``forward_features`` on a random
image at the run's input size; otherwise the backbone is one block (the whole
``forward_features``) and fine-tuning runs on images. Pooling is always the model's own
``forward_head(x, pre_logits=True)``: global average for CNNs, the norm after pooling for
ConvNeXt, the class token or the average of patch tokens (with ``fc_norm``) for ViTs.

The blocks are views: they hold the timm model's own modules and parameters (the same
objects), so the weights keep timm's names and (un)freezing a block reaches the model.
"""

from __future__ import annotations

import difflib
import functools
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from .backbone_spec import BackboneSpec, Parts, first_line, load_weights_file
from .errors import UsageError, WeightsError

__all__ = ["split_timm", "timm_name_problem", "timm_spec"]


#: children that belong to ``forward_head`` (pooling, classifier), not ``forward_features``;
#: a model's children are taken in order up to the first of these
HEAD_CHILDREN = frozenset(
    {"global_pool", "head", "fc", "classifier", "fc_norm", "head_drop", "head_dist", "attn_pool"}
)


class _Embed(nn.Module):
    """A Vision Transformer's first block: patch embedding, class/register tokens and
    position embedding (the model's own ``_pos_embed``), patch dropout, pre-norm."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.patch_embed, self.norm_pre = vit.patch_embed, vit.norm_pre
        # the model's own tensors (class, register and distillation tokens, position
        # embedding) all belong to the embedding
        for name, param in vit.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self._owner = [vit]  # a list, so that nn.Module does not register the whole model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self._owner[0]
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))


class _Whole(nn.Module):
    """The whole ``forward_features`` as one block (a model graft cannot split)."""

    def __init__(self, model: nn.Module, children: list[tuple[str, nn.Module]]):
        super().__init__()
        for name, child in children:
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self._owner = [model]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._owner[0].forward_features(x)  # type: ignore[no-any-return]


def _feature_children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in model.named_children():
        if name in HEAD_CHILDREN:
            break
        out.append((name, child))
    return out


def _pieces(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """forward_features as modules run in order, each with its parameters' names."""
    from timm.models.vision_transformer import VisionTransformer

    def names(prefix: str, module: nn.Module) -> list[str]:
        return [f"{prefix}.{n}" for n, _ in module.named_parameters()]

    if isinstance(model, VisionTransformer):
        embed = _Embed(model)
        pieces = [(embed, [n for n, p in model.named_parameters() if _owned(p, embed)])]
        pieces += [(b, names(f"blocks.{i}", b)) for i, b in enumerate(model.blocks)]
        return [*pieces, (model.norm, names("norm", model.norm))]
    pieces = []
    for name, child in _feature_children(model):
        if isinstance(child, nn.Sequential) and len(child):
            pieces += [(m, names(f"{name}.{n}", m)) for n, m in child.named_children()]
        else:
            pieces.append((child, names(name, child)))
    return pieces


def _owned(param: nn.Parameter, module: nn.Module) -> bool:
    return any(param is p for p in module.parameters())


def _group_ids(model: nn.Module) -> dict[str, int]:
    """parameter name -> timm's coarse group (stem 0, then stages or blocks); {} when the
    model has no group_matcher."""
    from timm.models import group_parameters

    try:
        groups = group_parameters(model, model.group_matcher(coarse=True))
    except (AttributeError, NotImplementedError, TypeError):
        return {}
    return {name: int(gid) for gid, names in groups.items() for name in names}


def _merge(pieces: list[tuple[nn.Module, list[str]]], groups: dict[str, int]) -> list[nn.Module]:
    """Consecutive pieces of one timm group become one block; pieces without parameters
    (activations, pooling, identity norms) join their neighbour."""
    keys: list[int | None] = [
        min((groups[n] for n in names if n in groups), default=None) if groups else i
        for i, (_, names) in enumerate(pieces)
    ]
    known = [k for k in keys if k is not None]
    previous = known[0] if known else 0
    runs: list[tuple[int, list[nn.Module]]] = []
    for (module, _), key in zip(pieces, keys, strict=True):
        key = previous if key is None else key
        if runs and runs[-1][0] == key:
            runs[-1][1].append(module)
        else:
            runs.append((key, [module]))
        previous = key
    return [mods[0] if len(mods) == 1 else nn.Sequential(*mods) for _, mods in runs]


#: (model name, input size) -> (whether its split reproduced forward_features, pooled
#: features): the check runs once per process, not at every load of a saved model
_CHECKED: dict[tuple[str, int], tuple[bool, int]] = {}


@torch.no_grad()
def split_timm(model: nn.Module, name: str, img_size: int) -> Parts:
    """``model``'s blocks (checked against ``forward_features`` at ``img_size``) and the
    length of its pooled features."""
    if (name, img_size) not in _CHECKED:
        _CHECKED[(name, img_size)] = _check_split(model, name, img_size)
    sequential, num_features = _CHECKED[(name, img_size)]
    if sequential:
        return Parts(_merge(_pieces(model), _group_ids(model)), num_features, model, True)
    return Parts([_Whole(model, _feature_children(model))], num_features, model, False)


def _check_split(model: nn.Module, name: str, img_size: int) -> tuple[bool, int]:
    """Whether the blocks reproduce ``forward_features`` on a random image, and the length
    of the pooled features; a model that cannot run at ``img_size`` is a UsageError."""
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
        try:
            want = model.forward_features(x)
            pooled = model.forward_head(want, pre_logits=True)
        except Exception as exc:
            raise _size_error(name, img_size, exc) from exc
        if pooled.ndim != 2:
            raise UsageError(
                f"Backbone {name}'s pooled features have shape {tuple(pooled.shape)}, not "
                "[batch, features]: graft cannot put a head on it."
            )
        blocks = _merge(_pieces(model), _group_ids(model))
        return _reproduces(blocks, x, want), int(pooled.shape[1])
    finally:
        model.train(was_training)


def _reproduces(blocks: list[nn.Module], x: torch.Tensor, want: torch.Tensor) -> bool:
    try:
        for block in blocks:
            x = block(x)
    except Exception:  # a piece that needs more than the previous one's output
        return False
    return x.shape == want.shape and bool(torch.allclose(x, want, rtol=1e-4, atol=1e-5))


def _size_error(name: str, img_size: int, exc: BaseException) -> UsageError:
    native = _data_config(name)["input_size"][-1]
    return UsageError(
        f"Backbone {name} cannot run on {img_size}x{img_size} images ({first_line(exc)}). "
        f"Use --img-size {native} (the size its weights were trained at) or another size "
        "it accepts, or another backbone."
    )


# --------------------------------------------------------------------------- names and specs


def timm_name_problem(name: str) -> str:
    """Why timm does not know ``name`` ('' when it does), with the closest names it knows."""
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; the closest it knows: {', '.join(close)}" if close else ""
        return f"timm {timm.__version__} has no model {arch!r}{hint}"
    if tag:
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError:
            tags = timm.list_pretrained(f"{arch}.*")
            more = f" and {len(tags) - 8} more" if len(tags) > 8 else ""
            known = f"{', '.join(tags[:8])}{more}" if tags else "none"
            return f"timm's {arch} has no pretrained weights tagged {tag!r}; its tags: {known}"
    return ""


def _data_config(name: str) -> dict[str, Any]:
    """timm's preprocessing for ``name``'s pretrained weights (input size, interpolation,
    mean, std, crop), from its pretrained config; ImageNet defaults when it has none."""
    from timm.data import resolve_data_config

    cfg = timm.models.get_pretrained_cfg(name)
    return dict(
        resolve_data_config({}, pretrained_cfg=cfg.to_dict() if cfg else {"num_classes": 0})
    )


@functools.lru_cache(maxsize=32)
def timm_spec(name: str) -> BackboneSpec:
    """The spec of timm model ``name`` (with or without a pretrained tag); the name must be
    one timm knows (:func:`timm_name_problem`)."""
    cfg = timm.models.get_pretrained_cfg(name)
    data = _data_config(name)
    tag = f" ({cfg.tag} weights)" if cfg is not None and cfg.tag else ""
    where = _weights_location(cfg) or "no published weights: use --weights FILE"
    mean, std = (tuple(float(v) for v in data[k]) for k in ("mean", "std"))
    return BackboneSpec(
        name=name,
        build=functools.partial(_random, name),
        split=functools.partial(_split, name),
        create=functools.partial(_create, name),
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        native_img_size=int(data["input_size"][-1]),
        weights_help=(
            f"timm weights: --weights FILE, the Hugging Face cache, or a download ({where})"
        ),
        description=f"timm {name}{tag}",
        interpolation=str(data["interpolation"]),
        timm_name=name,
    )


def _split(name: str, model: nn.Module, img_size: int) -> Parts:
    return split_timm(model, name, img_size)


def _build(name: str, img_size: int, **kwargs: Any) -> nn.Module:
    """``name`` without a classifier (graft adds its own head); a model made for one input
    size (a ViT's position embedding) is made for ``img_size``."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = img_size
    return timm.create_model(name, num_classes=0, **kwargs)


def _random(name: str, img_size: int) -> nn.Module:
    try:
        return _build(name, img_size)
    except (AssertionError, ValueError, TypeError, RuntimeError) as exc:
        raise _size_error(name, img_size, exc) from exc


# --------------------------------------------------------------------------- weights


def _weights_location(cfg: Any) -> str:
    if cfg is None:
        return ""
    if cfg.hf_hub_id:
        return f"hf-hub:{cfg.hf_hub_id}"
    return str(cfg.url or cfg.file or "")


def _cached_weights(cfg: Any) -> Path | None:
    """The weights file of ``cfg`` when timm has fetched it before (Hugging Face cache, or
    the torch hub cache for weights fetched by URL); no network."""
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        repo, _, revision = cfg.hf_hub_id.partition("@")
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
        for filename in files or ["model.safetensors", "pytorch_model.bin"]:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    if cfg.url and not cfg.custom_load:
        cached = (
            Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        )
        if cached.is_file():
            return cached
    return None


def _create(
    name: str, path: Path | None, allow_download: bool, img_size: int
) -> tuple[nn.Module, str]:
    """``name`` with pretrained weights: from ``path``, the local caches, or timm's download
    (when ``allow_download``), always through timm's loading; returns the source too."""
    cfg = timm.models.get_pretrained_cfg(name)
    location = _weights_location(cfg)
    fetch = (
        f"`hf download {location[len('hf-hub:') :]}` or a graft run without --offline"
        if location.startswith("hf-hub:")
        else "a graft run without --offline"
    )
    how = (
        f"Pass --weights FILE (a safetensors or PyTorch state dict of {name}); or fetch them on "
        f"a machine with internet ({fetch}) and copy its Hugging Face cache here; or train "
        "from random weights on purpose with --no-pretrained."
    )
    overlay: dict[str, Any] = {}
    if path is not None:
        overlay["state_dict"] = load_weights_file(path)  # never runs pickled code
        source = str(path)
    elif not location:
        raise WeightsError(f"timm has no pretrained weights for {name}. {how}")
    else:
        source = location
        cached = _cached_weights(cfg)
        if cached is not None:
            overlay["file"] = str(cached)
        elif not allow_download:
            raise WeightsError(
                f"No weights for {name} on this machine and downloads are off (--offline). {how}"
            )
    try:
        model = _build(name, img_size, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:
        fetched = type(exc).__module__.startswith("huggingface") or isinstance(exc, OSError)
        if path is None and "file" not in overlay and fetched:
            # the hub's network and HTTP errors
            raise WeightsError(
                f"Could not get the weights of {name} from {source} ({first_line(exc)}). {how}"
            ) from exc
        # load_state_dict's report, or a checkpoint filter that found other keys
        detail = _mismatch(exc) if isinstance(exc, RuntimeError) else first_line(exc)
        raise WeightsError(
            f"Weights from {source} do not fit {name} at {img_size} px "
            f"({type(exc).__name__}: {detail}). Is it a state dict of {name}?"
        ) from exc
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg.pop("state_dict", None)  # a second copy of every weight otherwise
    return model.eval(), source


def _mismatch(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else lines[0] if lines else "state dict mismatch"
    return detail if len(detail) <= 240 else detail[:237] + "..."
