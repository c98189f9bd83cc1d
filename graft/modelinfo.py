"""What a saved model is, read without torch: :class:`ModelInfo` (the metadata of a
``model.safetensors``, every field checked) and where a run keeps its weights.

Kept apart from graft.model so that predicting from a run's current ONNX export
(graft.fast) never imports torch: reading these few hundred bytes of JSON must not cost the
two seconds torch takes to import.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RunFolderError, WeightsError
from .files import file_sha256

if TYPE_CHECKING:
    from .runtime import Preprocessing

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
    #: after the trim, larger pictures are first downscaled to this many pixels (their
    #: longest side): the training images' typical size when they are smaller than the
    #: input (graft.detail); 0 = never
    detail_size: int = 0
    #: neighbours of the familiarity score (graft.familiarity); 0 = the model has none
    familiarity_k: int = 0
    #: below this familiarity an image is answered "unknown" (-1: never)
    familiarity_threshold: float = -1.0

    @property
    def preprocessing(self) -> Preprocessing:
        """How an image becomes this model's input (graft.runtime.preprocess,
        graft.loading.transform_for)."""
        from .runtime import Preprocessing

        return Preprocessing(self.img_size, self.mean, self.std, self.trim, self.detail_size)

    def to_metadata(self) -> dict[str, str]:
        data = asdict(self)
        return {"graft_format": FORMAT_VERSION, **{k: json.dumps(v) for k, v in data.items()}}

    @classmethod
    def from_metadata(
        cls, meta: dict[str, str], source: str | Path = "the model file"
    ) -> ModelInfo:
        """Rebuild the description from a weights file's metadata, every field checked:
        a hand-edited value (temperature 0, a 5000 px input) would otherwise give NaN
        probabilities or exhaust memory instead of a clear refusal. ``source`` names the
        file in the error."""
        fmt = meta.get("graft_format", FORMAT_VERSION)
        if fmt != FORMAT_VERSION:
            raise WeightsError(
                f"{_where(source)} was written in graft model format {fmt!r}; this graft "
                f"reads format {FORMAT_VERSION}. Use the graft version that trained it."
            )
        data: dict[str, Any] = {}
        for name, (required, default, check) in _FIELDS.items():
            if name not in meta:
                if required:
                    raise WeightsError(
                        f"{_where(source)} lacks graft's metadata (no {name!r}): it is not a "
                        "model written by `graft train`; point graft at a run folder."
                    )
                data[name] = default
                continue
            try:
                value = json.loads(meta[name])
            except (json.JSONDecodeError, TypeError):
                value = meta[name]
            problem = check(value)
            if problem:
                shown = meta[name] if len(str(meta[name])) <= 60 else str(meta[name])[:57] + "..."
                raise WeightsError(
                    f"{_where(source)} has invalid metadata: {name}={shown} ({problem}). The "
                    "file was changed after training; retrain the run or restore the file."
                )
            data[name] = value
        data["mean"] = tuple(float(v) for v in data["mean"])
        data["std"] = tuple(float(v) for v in data["std"])
        data["classes"] = tuple(data["classes"])
        for name in ("dropout", "temperature", "unknown_threshold", "familiarity_threshold"):
            data[name] = float(data[name])
        return cls(**data)


def _where(source: str | Path) -> str:
    """``model.safetensors in RUN`` for a path, else the text given."""
    if isinstance(source, Path):
        return f"{source.name} in {source.parent}"
    return source


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _in_range(lo: float, hi: float, what: str, integer: bool = False) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        ok = _number(value) and lo <= value <= hi and (not integer or isinstance(value, int))
        return "" if ok else f"{what} expected"

    return check


def _triple(positive: bool) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        ok = isinstance(value, list) and len(value) == 3 and all(_number(v) for v in value)
        if ok and positive:
            ok = all(v > 0 for v in value)
        kind = "positive" if positive else "finite"
        return "" if ok else f"a list of 3 {kind} numbers expected"

    return check


def _check_classes(value: Any) -> str:
    if not isinstance(value, list) or not value:
        return "a non-empty list of class names expected"
    if not all(isinstance(c, str) and c for c in value):
        return "every class name must be a non-empty string"
    if len(set(value)) != len(value):
        return "class names must be unique"
    return ""


def _check_backbone(value: Any) -> str:
    # graft's own names, or anything shaped like a timm name: asking timm would import torch
    # on every predict; a name timm does not know fails clearly when the model is built.
    from .backbones import BACKBONES, TIMM_NAME

    if isinstance(value, str) and (value in BACKBONES or TIMM_NAME.fullmatch(value)):
        return ""
    return f"one of {', '.join(BACKBONES)} or a timm model name expected"


def _check_head(value: Any) -> str:
    ok = isinstance(value, str) and re.fullmatch(r"linear|dense:[1-9]\d{0,5}", value)
    return "" if ok else "'linear' or 'dense:N' expected"


def _check_bool(value: Any) -> str:
    return "" if isinstance(value, bool) else "true or false expected"


#: metadata field -> (required, default when absent, check returning a problem or "").
#: The bounds are those of graft train's options (graft.config) and of what calibration
#: can fit; anything outside them was not written by graft.
_FIELDS: dict[str, tuple[bool, Any, Callable[[Any], str]]] = {
    "backbone": (True, None, _check_backbone),
    "img_size": (True, None, _in_range(32, 1024, "a whole number of pixels in 32..1024", True)),
    "mean": (True, None, _triple(positive=False)),
    "std": (True, None, _triple(positive=True)),
    "classes": (True, None, _check_classes),
    "head": (True, None, _check_head),
    "dropout": (True, None, _in_range(0.0, 0.999999, "a number in [0, 1)")),
    "temperature": (False, 1.0, _in_range(1e-3, 1e3, "a number between 0.001 and 1000")),
    "unknown_threshold": (False, 0.0, _in_range(0.0, 1.0, "a number in [0, 1]")),
    "trim": (False, False, _check_bool),
    "detail_size": (False, 0, _in_range(0, 1024, "a whole number of pixels in 0..1024", True)),
    "familiarity_k": (False, 0, _in_range(0, 1000, "a whole number in 0..1000", True)),
    "familiarity_threshold": (False, -1.0, _in_range(-1.0, 1.0, "a number in [-1, 1]")),
}


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


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read with safetensors' numpy backend (no
    torch); a :class:`WeightsError` when the file is not readable safetensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:
        raise WeightsError(
            f"Could not read {path}: {exc}. The file is truncated or not a graft model; "
            "train again or restore it from a backup."
        ) from exc


def read_info(path: str | Path) -> tuple[Path, ModelInfo]:
    """A run folder (or its ``model.safetensors``) -> the weights file and its checked
    :class:`ModelInfo`, without loading a tensor."""
    weights = resolve_model_file(path)
    return weights, ModelInfo.from_metadata(read_metadata(weights), weights)


# --------------------------------------------------------------------------- the export


def fresh_onnx_path(weights: Path) -> Path | None:
    """Where the fast engines keep this model's ONNX graph (``model.onnx`` beside the
    weights), after removing one that is not known to be made from these weights; None when
    the folder cannot be written (the graph then goes to a temporary file).

    ``model.onnx.json`` ties the graph to the weights by the sha256 of both: a date check
    would trust a graph copied from another run, or weights restored with their old date,
    and the graph's own hash catches a ``model.onnx`` swapped in from another run with the
    same classes. :func:`stamp_onnx` records the graph's hash once it is written."""
    onnx_path = weights.with_suffix(".onnx")
    stamp = weights.with_suffix(".onnx.json")
    if not os.access(weights.parent, os.W_OK):
        return None
    digest = file_sha256(weights)
    if _stamp_matches(stamp, digest, onnx_path):
        return onnx_path
    try:
        if onnx_path.is_dir():
            return None  # not graft's: left alone
        onnx_path.unlink(missing_ok=True)  # made from other weights, or unknown ones
        from .io import atomic_write_json

        atomic_write_json(stamp, {"weights_sha256": digest})
    except OSError:  # e.g. a folder in the stamp's place: a temporary graph instead
        return None
    return onnx_path


def stamp_onnx(weights: Path) -> None:
    """Record the hash of the ``model.onnx`` just exported from ``weights``."""
    from .io import atomic_write_json

    onnx_path = weights.with_suffix(".onnx")
    if onnx_path.is_file():
        atomic_write_json(
            weights.with_suffix(".onnx.json"),
            {"weights_sha256": file_sha256(weights), "onnx_sha256": file_sha256(onnx_path)},
        )


def _stamp_matches(stamp: Path, weights_digest: str, onnx_path: Path) -> bool:
    """Whether ``stamp`` names these weights and the graph at ``onnx_path`` as it is now."""
    try:
        data = json.loads(stamp.read_text())
        return bool(
            data["weights_sha256"] == weights_digest
            and onnx_path.is_file()
            and data["onnx_sha256"] == file_sha256(onnx_path)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def current_onnx(weights: Path) -> Path | None:
    """The run's ``model.onnx`` when it was made from exactly these weights and is the graph
    that was written then, else None. Reads only: the PyTorch path replaces a stale one."""
    onnx_path = weights.with_suffix(".onnx")
    stamp = weights.with_suffix(".onnx.json")
    return onnx_path if _stamp_matches(stamp, file_sha256(weights), onnx_path) else None
