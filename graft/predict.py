"""Inference on files and folders with a trained run's own preprocessing.

A :class:`Predictor` is built from a run folder (or a ``model.safetensors``) alone: the input
size, normalisation and class names come from the checkpoint, so prediction can never
preprocess differently from training. Files that cannot be read get a per-file error; the
rest are still predicted.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ._malloc import tune_malloc
from .data import IMAGE_EXTENSIONS, ImageFiles, build_transform, iter_files, make_loader
from .errors import UsageError
from .model import GraftModel, load_model
from .runtime import rank_classes

if TYPE_CHECKING:
    from .device import Device


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
            out.extend(f for f in iter_files(p) if f.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            out.append(p)  # missing or unreadable files become per-file errors
    return out


class Predictor:
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
    ):
        from .device import choose_device
        from .engines import Probabilities, TorchRunner, make_runner

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
        self.transform = build_transform(
            self.info.img_size, self.info.mean, self.info.std, "none", self.info.trim
        )
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
    def iter_proba(
        self, paths: Sequence[str | Path], batch_size: int = 32
    ) -> Iterator[tuple[np.ndarray, np.ndarray, dict[int, str]]]:
        """Batch by batch, in order: (indices into ``paths``, their probabilities,
        ``{index: reason}`` for files of the batch that could not be read). Memory stays
        that of one batch, however many paths there are."""
        dataset = ImageFiles([Path(p) for p in paths], None, self.transform, self.info.img_size)
        if not len(paths):
            return
        for batch in make_loader(dataset, batch_size, shuffle=False, seed=0, workers=self.workers):
            failed = dict(batch["failed"])
            if len(batch["index"]) == 0:
                yield np.zeros(0, dtype=np.int64), np.zeros((0, len(self.classes))), failed
                continue
            x = batch["images"]
            if self.tta:
                views = tta_views(x)
                p = self.runner(torch.cat(views)).reshape(len(views), len(x), -1).mean(0)
            else:
                p = self.runner(x)
            yield batch["index"].numpy(), p.numpy(), failed

    def predict_proba(
        self, paths: Sequence[str | Path], batch_size: int = 32
    ) -> tuple[np.ndarray, dict[int, str]]:
        """Probabilities ``[len(paths), n_classes]`` (NaN rows for failures) and
        ``{index: reason}`` for files that could not be read."""
        probs = np.full((len(paths), len(self.classes)), np.nan, dtype=np.float32)
        failed: dict[int, str] = {}
        for index, p, bad in self.iter_proba(paths, batch_size):
            probs[index] = p
            failed.update(bad)
        return probs, failed

    def _prediction(self, path: str | Path, p: np.ndarray, top_k: int) -> Prediction:
        top, unknown = rank_classes(p, self.classes, top_k, self.info.unknown_threshold)
        return Prediction(str(path), top, unknown=unknown)

    def iter_predict(
        self, paths: Sequence[str | Path], top_k: int = 3, batch_size: int = 32
    ) -> Iterator[list[Prediction]]:
        """Predictions batch by batch, each batch in the order of ``paths``."""
        for index, p, failed in self.iter_proba(paths, batch_size):
            rows = {int(i): self._prediction(paths[i], p[r], top_k) for r, i in enumerate(index)}
            rows.update({i: Prediction(str(paths[i]), [], why) for i, why in failed.items()})
            yield [rows[i] for i in sorted(rows)]

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
        return [p for batch in self.iter_predict(paths, top_k, batch_size) for p in batch]


# --------------------------------------------------------------------------- streaming


@dataclass
class StreamStats:
    written: int  # predictions written by this call
    skipped: int  # already in the file from an earlier, interrupted call
    failed: int  # files that could not be read (written with their reason)
    seconds: float

    @property
    def per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def csv_header(k: int) -> list[str]:
    """The columns of predictions as CSV (``graft predict --csv`` and ``--out FILE.csv``)."""
    header = ["path", "label", "error"]
    for i in range(1, k + 1):
        header += [f"class_{i}", f"probability_{i}"]
    return header


def csv_row(prediction: Prediction, k: int) -> list[str]:
    """One prediction under :func:`csv_header` ``(k)``: ``label`` is the answer or
    ``unknown`` (empty when the file could not be read); rows with fewer than ``k``
    classes are padded with empty cells."""
    p = prediction
    row = [p.path, p.label or "", p.error or ""]
    for c, prob in p.top[:k]:
        row += [c, f"{prob:.6f}"]
    return row + [""] * (len(csv_header(k)) - len(row))


def _done_paths(out: Path, fmt: str, header: list[str]) -> set[str]:
    """Paths already written to ``out``; a torn last line (a crash mid-write) is cut off."""
    if not out.is_file() or out.stat().st_size == 0:
        return set()
    raw = out.read_bytes()
    if not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1
        with open(out, "r+b") as fh:
            fh.truncate(keep)
        raw = raw[:keep]
    text = raw.decode("utf-8", errors="surrogateescape")
    if fmt == "jsonl":
        return {json.loads(line)["path"] for line in text.splitlines() if line.strip()}
    rows = list(csv.reader(io.StringIO(text)))
    if rows and rows[0] != header:
        raise UsageError(
            f"{out} was written with other columns ({len(rows[0])}): use the same --top-k, "
            "or another output file."
        )
    return {r[0] for r in rows[1:] if r}


def stream_predictions(
    predictor: Predictor,
    paths: Sequence[Path],
    out: Path,
    top_k: int = 3,
    batch_size: int = 64,
    progress: Any = None,
) -> StreamStats:
    """Predict ``paths`` into ``out`` (``.jsonl`` or ``.csv``) as they are computed.

    Results are flushed batch by batch, so memory stays flat and an interrupted call loses
    at most one batch; calling again with the same file continues where it stopped (paths
    already in the file are skipped). ``progress(n)`` is called after each batch.
    """
    fmt = "csv" if out.suffix.lower() == ".csv" else "jsonl"
    k = max(1, min(top_k, len(predictor.classes)))
    header = csv_header(k)
    done = _done_paths(out, fmt, header)
    todo = [p for p in paths if str(p) not in done]
    started = time.perf_counter()
    written = failed = 0
    new_file = not out.is_file() or out.stat().st_size == 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        writer = csv.writer(fh, lineterminator="\n") if fmt == "csv" else None
        if writer is not None and new_file:
            writer.writerow(header)
        for batch in predictor.iter_predict(todo, top_k, batch_size):
            for p in batch:
                failed += bool(p.error)
                if writer is None:
                    fh.write(json.dumps(p.to_dict()) + "\n")
                else:
                    writer.writerow(csv_row(p, k))
            fh.flush()
            written += len(batch)
            if progress is not None:
                progress(len(batch))
    return StreamStats(written, len(paths) - len(todo), failed, time.perf_counter() - started)
