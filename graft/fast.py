"""Predicting from a run without torch: its current ONNX export on OpenVINO or ONNX Runtime.

``graft train`` leaves ``model.onnx`` beside ``model.safetensors``, tied to those weights by
their sha256 in ``model.onnx.json``. When that stamp matches, the export *is* the model
(made from these very weights, after they were checked), so ``graft predict``, ``graft
serve``, ``graft evaluate`` and :func:`open_predictor` run it directly: no torch, timm or
torchvision import, which is most of a cold start (measured here: 7 s -> about 1 s for one
image; BENCHMARKS.md).
When the export is missing or stale, or torch is asked for (``GRAFT_ENGINE=torch``, TTA),
the PyTorch :class:`graft.predict.Predictor` rebuilds it as before.

The engines (graft.inference) take and return numpy arrays; graft.engines wraps them for
torch tensors.
Preprocessing is :func:`graft.runtime.preprocess`, the exported runtime's own, equal to the
torchvision transform of training within float rounding (tests/test_fast.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .files import describe_decode_error
from .inference import (
    OnnxEngine,
    OpenVinoEngine,
    cpu_threads,
    onnx_available,
    openvino_available,
    wanted_engine,
)
from .modelinfo import ModelInfo, current_onnx, read_info
from .predictions import ScorePredictor, check_count
from .runtime import load_image, preprocess, split_output

#: Below this many images a job starts on ONNX Runtime, above it on OpenVINO. ONNX Runtime
#: is ready about 0.4 s sooner (import and session 0.17 s against OpenVINO's import, read and
#: compile 0.7 s); OpenVINO's static shapes then run about 8% faster per image
#: (BENCHMARKS.md), which pays for the slower start only past about a thousand images.
OPENVINO_FROM_IMAGES = 1000


def load_engine(onnx_path: Path, n_images: int | None = None) -> OnnxEngine | OpenVinoEngine:
    """The engine for a job of ``n_images`` (None: a long-lived one, e.g. a server):
    ``GRAFT_ENGINE`` decides when set; otherwise ONNX Runtime for small jobs (it starts
    sooner) and OpenVINO for large ones and servers (it runs faster); the other one when the
    first fails to load. Raises the last failure (ImportError when neither may run)."""
    kinds: list[type[OnnxEngine] | type[OpenVinoEngine]] = []
    if openvino_available():
        kinds.append(OpenVinoEngine)
    if onnx_available():
        small = n_images is not None and n_images < OPENVINO_FROM_IMAGES
        kinds.insert(0 if small else len(kinds), OnnxEngine)
    error: Exception = ImportError("neither OpenVINO nor ONNX Runtime may run here")
    for kind in kinds:
        try:
            if kind is OpenVinoEngine:  # compiled shapes kept on disk for the next process
                return OpenVinoEngine(onnx_path, cache=True)
            return OnnxEngine(onnx_path)
        except Exception as exc:  # a broken install or a graph it cannot read
            error = exc
    raise error


class ExportPredictor(ScorePredictor):
    """A run's current ONNX export as a predictor, the same answers as the PyTorch
    :class:`graft.predict.Predictor` without importing torch. ``workers`` threads decode
    and preprocess images while the engine runs the previous batch (Pillow releases the
    GIL while it decodes)."""

    def __init__(
        self,
        info: ModelInfo,
        engine: OnnxEngine | OpenVinoEngine,
        workers: int = 0,
        unknown: bool = True,
    ):
        self.info = info
        self.engine = engine
        self.runner = engine  # ``runner.name`` / ``runner.warm_up``, as Predictor has
        self.classes = list(info.classes)
        # -1: half the cores, at least 2: Pillow and numpy release the GIL; on 2 cores two
        # threads fed OpenVINO 2% faster than one, within the run-to-run noise of ~5%
        # (benchmarks/bench_pipeline.py): no loss, and more cores give more threads
        self.workers = workers if workers >= 0 else min(4, max(2, cpu_threads() // 2))
        self.tta = False
        self.notes: list[str] = []
        self.has_familiarity = info.familiarity_k > 0
        # --unknown off: every image gets its top class
        self.unknown_threshold = info.unknown_threshold if unknown else 0.0
        self.familiarity_threshold = info.familiarity_threshold if unknown else -1.0

    def prepare(self, source: str | Path | bytes) -> np.ndarray:
        """One image (a path or its bytes) -> the network's input ``[3, size, size]``."""
        info = self.info
        image = load_image(source, info.img_size)
        return preprocess([image], info.preprocessing)[0]

    def _decode(self, path: str | Path) -> np.ndarray | str:
        try:
            return self.prepare(path)
        except Exception as exc:  # reported per file, never a crash of the whole job
            return describe_decode_error(exc)

    def fits(self) -> bool:
        """Whether the graph answers one blank image with the columns the weights' metadata
        describes (a probability per class, then the familiarity when there is one)."""
        size = self.info.img_size
        try:
            self.scores(np.zeros((1, 3, size, size), dtype=np.float32))
        except Exception:
            return False
        return True

    def scores(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """A preprocessed batch -> probabilities and familiarity (or None)."""
        return split_output(self.engine.run(x), len(self.classes), self.has_familiarity)

    def _batches(
        self, paths: Sequence[str | Path], batch_size: int
    ) -> Iterator[tuple[range, list[np.ndarray | str]]]:
        chunks = [
            range(i, min(i + batch_size, len(paths))) for i in range(0, len(paths), batch_size)
        ]
        if not self.workers:
            for chunk in chunks:
                yield chunk, [self._decode(paths[i]) for i in chunk]
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="graft-decode") as pool:
            # one batch decoded ahead of the one the engine runs; memory stays two batches
            pending = [pool.map(self._decode, [paths[i] for i in c]) for c in chunks[:2]]
            for n, chunk in enumerate(chunks):
                decoded = list(pending[n])
                if n + 2 < len(chunks):
                    pending.append(pool.map(self._decode, [paths[i] for i in chunks[n + 2]]))
                yield chunk, decoded

    def iter_scores(
        self, paths: Sequence[str | Path], batch_size: int = 32
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[int, str]]]:
        batch_size = check_count("batch_size", batch_size)
        for chunk, decoded in self._batches(paths, batch_size):
            failed = {i: d for i, d in zip(chunk, decoded, strict=True) if isinstance(d, str)}
            good = [(i, d) for i, d in zip(chunk, decoded, strict=True) if not isinstance(d, str)]
            if not good:
                yield self._empty(failed)
                continue
            index = np.array([i for i, _ in good], dtype=np.int64)
            probs, familiarity = self.scores(np.stack([d for _, d in good]))
            yield self._finite(index, probs, familiarity, failed)


def open_export_predictor(
    weights: Path,
    info: ModelInfo,
    workers: int = 0,
    unknown: bool = True,
    n_images: int | None = None,
) -> ExportPredictor | None:
    """:class:`ExportPredictor` on the current export of ``weights`` (whose checked
    metadata is ``info``), or None when the PyTorch path has to answer: ``GRAFT_ENGINE=torch``,
    no current export, no fast engine installed, or a graph the engines cannot read or whose
    output does not fit its weights (removed, so that the PyTorch path makes it again)."""
    onnx_path = None if wanted_engine() == "torch" else current_onnx(weights)
    if onnx_path is None:
        return None
    try:
        engine = load_engine(onnx_path, n_images)
    except ImportError:  # no fast engine here: PyTorch
        return None
    except Exception:  # a damaged graph the engines cannot read
        _discard(onnx_path)
        return None
    predictor = ExportPredictor(info, engine, workers, unknown)
    if predictor.fits():
        return predictor
    _discard(onnx_path)  # its output does not match its weights' description
    return None


def open_predictor(
    run: str | Path,
    workers: int = 0,
    tta: bool = False,
    unknown: bool = True,
    n_images: int | None = None,
) -> ScorePredictor:
    """The quickest correct predictor for a run: :class:`ExportPredictor` on the run's
    current export when it has one and nothing asks for torch, else the PyTorch
    :class:`graft.predict.Predictor` (which rebuilds the export). ``n_images`` (the size of
    the job; None for a server) picks the engine (:func:`load_engine`)."""
    weights, info = read_info(run)
    if not tta:
        predictor = open_export_predictor(weights, info, workers, unknown, n_images)
        if predictor is not None:
            return predictor
    from .predict import Predictor

    # the PyTorch path makes the graph again from the weights
    return Predictor.from_run(run, workers=workers, tta=tta, unknown=unknown)


def _discard(onnx_path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only run: PyTorch uses a temporary graph
        onnx_path.unlink(missing_ok=True)
