"""Inference on files and folders with a trained run's own preprocessing.

A :class:`Predictor` is built from a run folder (or a ``model.safetensors``) alone: the input
size, normalisation and class names come from the checkpoint, so prediction can never
preprocess differently from training. Files that cannot be read get a per-file error; the
rest are still predicted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import IMAGE_EXTENSIONS, ImageFiles, _iter_files, build_transform, make_loader
from .errors import DataError
from .model import GraftModel, load_model


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class, probability), best first
    error: str | None = None
    unknown: bool = False  # the top probability is below the run's "unknown" threshold

    @property
    def label(self) -> str | None:
        if not self.top:
            return None
        return "unknown" if self.unknown else self.top[0][0]

    def to_dict(self) -> dict:
        out: dict = {"path": self.path}
        if self.error:
            out["error"] = self.error
        else:
            out["label"] = self.label
            out["top"] = [{"class": c, "probability": round(p, 6)} for c, p in self.top]
        return out


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """Test-time augmentation: the image, its mirror, and a central 85% crop (resized back)
    and its mirror. Their probabilities are averaged."""
    size = x.shape[-1]
    m = max(1, round(size * 0.075))
    crop = torch.nn.functional.interpolate(
        x[..., m:-m, m:-m], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return [x, x.flip(3), crop, crop.flip(3)]


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders expanded (recursively) to the images inside them."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(f for f in _iter_files(p) if f.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            out.append(p)  # missing or unreadable files become per-file errors
    return out


class Predictor:
    """Batched inference with the fastest correct engine (ONNX Runtime on CPU when installed,
    else PyTorch). ``onnx_path`` keeps the exported graph for reuse (a run's ``model.onnx``)."""

    def __init__(
        self,
        model: GraftModel,
        engine: Any = None,
        workers: int = 0,
        onnx_path: Path | None = None,
        backend: str = "auto",
        tta: bool = False,
    ):
        from .engines import Probabilities, TorchRunner, make_runner
        from .train import choose_engine

        self.model = model.eval()
        self.engine = engine or choose_engine()
        self.model.to(self.engine.device)
        if self.engine.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.info = model.info
        self.classes = list(model.info.classes)
        self.workers = workers
        self.tta = tta
        self.transform = build_transform(self.info.img_size, self.info.mean, self.info.std, "none")
        self.notes: list[str] = []
        graph = Probabilities(self.model)
        if backend == "torch":
            self.runner = TorchRunner(graph, self.engine)
        else:
            self.runner = make_runner(
                graph, self.info.img_size, self.engine, onnx_path, notes=self.notes
            )

    @classmethod
    def from_run(
        cls, run: str | Path, workers: int = 0, backend: str = "auto", tta: bool = False
    ) -> Predictor:
        from .model import resolve_model_file

        weights = resolve_model_file(run)
        onnx_path = weights.with_suffix(".onnx")
        if onnx_path.is_file() and onnx_path.stat().st_mtime < weights.stat().st_mtime:
            onnx_path.unlink(missing_ok=True)  # stale: the weights changed since the export
        if not os.access(weights.parent, os.W_OK):
            onnx_path = None  # export to a temporary file instead
        return cls(
            load_model(weights), workers=workers, onnx_path=onnx_path, backend=backend, tta=tta
        )

    @torch.no_grad()
    def predict_proba(
        self, paths: Sequence[str | Path], batch_size: int = 32
    ) -> tuple[np.ndarray, dict[int, str]]:
        """Probabilities ``[len(paths), n_classes]`` (NaN rows for failures) and
        ``{index: reason}`` for files that could not be read."""
        dataset = ImageFiles([Path(p) for p in paths], None, self.transform, self.info.img_size)
        probs = np.full((len(paths), len(self.classes)), np.nan, dtype=np.float32)
        failed: dict[int, str] = {}
        if not len(paths):
            return probs, failed
        for batch in make_loader(dataset, batch_size, shuffle=False, seed=0, workers=self.workers):
            failed.update(dict(batch["failed"]))
            if len(batch["index"]) == 0:
                continue
            x = batch["images"]
            if self.tta:
                views = tta_views(x)
                p = self.runner(torch.cat(views)).reshape(len(views), len(x), -1).mean(0)
            else:
                p = self.runner(x)
            probs[batch["index"].numpy()] = p.numpy()
        return probs, failed

    @torch.no_grad()
    def predict_proba_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Probabilities for images already decoded (by :func:`graft.data.load_image`)."""
        if not images:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        x = torch.stack([self.transform(im) for im in images])
        if self.tta:
            views = tta_views(x)
            return self.runner(torch.cat(views)).reshape(len(views), len(x), -1).mean(0).numpy()
        return self.runner(x).numpy()

    def predict(
        self, paths: Sequence[str | Path], top_k: int = 3, batch_size: int = 32
    ) -> list[Prediction]:
        probs, failed = self.predict_proba(paths, batch_size)
        k = max(1, min(top_k, len(self.classes)))
        out = []
        for i, p in enumerate(paths):
            if i in failed:
                out.append(Prediction(str(p), [], failed[i]))
                continue
            order = np.argsort(-probs[i])[:k]
            top = [(self.classes[j], float(probs[i, j])) for j in order]
            out.append(Prediction(str(p), top, unknown=top[0][1] < self.info.unknown_threshold))
        return out


def predict_paths(
    run: str | Path, inputs: Iterable[str | Path], top_k: int = 3
) -> list[Prediction]:
    paths = expand_inputs(inputs)
    if not paths:
        raise DataError("No images to predict: the folders given hold no image files.")
    return Predictor.from_run(run).predict(paths, top_k)
