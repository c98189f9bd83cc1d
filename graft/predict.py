"""Inference on files and folders with a trained run's own preprocessing.

A :class:`Predictor` is built from a run folder (or a ``model.safetensors``) alone: the input
size, normalisation and class names come from the checkpoint, so prediction can never
preprocess differently from training. Files that cannot be read get a per-file error; the
rest are still predicted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ._malloc import tune_malloc
from .errors import WeightsError
from .loading import ImageFiles, make_loader, transform_for
from .model import GraftModel, load_model
from .modelinfo import fresh_onnx_path, stamp_onnx
from .predictions import (  # re-exported: graft.predict is where users look for them
    NON_FINITE,
    OUT_FORMATS,
    Prediction,
    ScorePredictor,
    StreamStats,
    check_count,
    csv_header,
    csv_row,
    stream_predictions,
)
from .runtime import split_output

if TYPE_CHECKING:
    from .device import Device

__all__ = [
    "NON_FINITE",
    "OUT_FORMATS",
    "Prediction",
    "Predictor",
    "StreamStats",
    "csv_header",
    "csv_row",
    "fresh_onnx_path",
    "stream_predictions",
    "tta_views",
]


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """Test-time augmentation: the image, its mirror, and a central 85% crop (resized back)
    and its mirror. Their probabilities are averaged."""
    size = x.shape[-1]
    m = max(1, round(size * 0.075))
    crop = torch.nn.functional.interpolate(
        x[..., m:-m, m:-m], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return [x, x.flip(3), crop, crop.flip(3)]


def check_finite_weights(model: torch.nn.Module, source: str | Path) -> None:
    """Refuse a model whose weights hold NaN or infinity (a diverged training): it would
    answer every image with NaN probabilities. One pass over the tensors at load."""
    bad = [
        name
        for name, t in model.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise WeightsError(
            f"{source} holds non-finite weights (NaN or infinity) in {len(bad)} tensor(s), "
            f"e.g. {bad[0]}: the training diverged and this model cannot predict; "
            "retrain the run (graft train ... --force)."
        )


class Predictor(ScorePredictor):
    """Batched inference with the fastest correct engine (OpenVINO or ONNX Runtime on CPU when
    installed, else PyTorch; graft.engines). ``onnx_path`` keeps the exported graph for
    reuse (a run's ``model.onnx``)."""

    def __init__(
        self,
        model: GraftModel,
        device: Device | None = None,
        workers: int = 0,
        onnx_path: Path | None = None,
        backend: str = "auto",
        tta: bool = False,
        source: str | Path = "The model",
        unknown: bool = True,
    ):
        from .device import choose_device
        from .engines import Probabilities, TorchRunner, make_runner

        check_finite_weights(model, source)
        tune_malloc()
        self.model = model.eval()
        self.device = device or choose_device()
        self.model.to(self.device.device)
        if self.device.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.info = model.info
        self.classes = list(model.info.classes)
        self.workers = workers
        self.tta = tta
        # --unknown off: every image gets its top class
        self.unknown_threshold = self.info.unknown_threshold if unknown else 0.0
        self.familiarity_threshold = self.info.familiarity_threshold if unknown else -1.0
        self.has_familiarity = model.familiarity is not None
        self.transform = transform_for(self.info.preprocessing)
        self.notes: list[str] = []
        graph = Probabilities(self.model)
        if backend == "torch":
            self.runner = TorchRunner(graph, self.device)
        else:
            self.runner = make_runner(
                graph, self.info.img_size, self.device, onnx_path, notes=self.notes
            )

    @classmethod
    def from_run(
        cls,
        run: str | Path,
        workers: int = 0,
        backend: str = "auto",
        tta: bool = False,
        unknown: bool = True,
    ) -> Predictor:
        from .model import resolve_model_file

        weights = resolve_model_file(run)
        onnx_path = fresh_onnx_path(weights)
        predictor = cls(
            load_model(weights),
            workers=workers,
            onnx_path=onnx_path,
            backend=backend,
            tta=tta,
            source=weights,
            unknown=unknown,
        )
        if onnx_path is not None:  # the graph is there now: the next predict needs no torch
            with contextlib.suppress(OSError):
                stamp_onnx(weights)
        return predictor

    def _forward(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and familiarity of a batch. TTA averages the probabilities over the
        views; the familiarity stays that of the image itself (view 0): the threshold was set
        on single images, and flipped or cropped views are always a little less familiar."""
        if not self.tta:
            return split_output(self.runner(x).numpy(), len(self.classes), self.has_familiarity)
        views = tta_views(x)
        out = self.runner(torch.cat(views)).reshape(len(views), len(x), -1)
        probs, _ = split_output(out.mean(0).numpy(), len(self.classes), self.has_familiarity)
        _, familiarity = split_output(out[0].numpy(), len(self.classes), self.has_familiarity)
        return probs, familiarity

    @torch.no_grad()
    def iter_scores(
        self, paths: Sequence[str | Path], batch_size: int = 32
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[int, str]]]:
        """Batch by batch, in order: (indices into ``paths``, their probabilities, their
        familiarity or None, ``{index: reason}`` for files of the batch that could not be
        read or got non-finite scores). Memory stays that of one batch, however many paths
        there are."""
        batch_size = check_count("batch_size", batch_size)
        dataset = ImageFiles([Path(p) for p in paths], None, self.transform, self.info.img_size)
        if not len(paths):
            return
        for batch in make_loader(dataset, batch_size, shuffle=False, seed=0, workers=self.workers):
            failed = dict(batch["failed"])
            if len(batch["index"]) == 0:
                yield self._empty(failed)
                continue
            index = batch["index"].numpy()
            probs, familiarity = self._forward(batch["images"])
            yield self._finite(index, probs, familiarity, failed)

    @torch.no_grad()
    def predict_scores_images(
        self, images: Sequence[Image.Image]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and familiarity (or None) for images already decoded (by
        :func:`graft.data.load_image`)."""
        if not images:
            empty = np.zeros(0, dtype=np.float32) if self.has_familiarity else None
            return np.zeros((0, len(self.classes)), dtype=np.float32), empty
        return self._forward(torch.stack([self.transform(im) for im in images]))

    def predict_proba_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Probabilities for images already decoded (by :func:`graft.data.load_image`)."""
        return self.predict_scores_images(images)[0]
