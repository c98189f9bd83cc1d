"""Running an ONNX graph on numpy arrays: ONNX Runtime and OpenVINO on CPU, and which of
them may run (``GRAFT_ENGINE``).

Torch-free, so graft.fast can predict without importing torch; graft.engines wraps these
for torch tensors (the frozen passes of training).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError

#: the values GRAFT_ENGINE takes ("" or unset: the fastest installed; "onnx" = onnxruntime)
ENGINES = ("openvino", "onnxruntime", "onnx", "torch")
#: ONNX files above this size (VGG16: 528 MB) get one dynamic-shape OpenVINO model instead of
#: one compiled model per batch shape, each of which would hold its own copy of the weights.
STATIC_SHAPES_MAX_BYTES = 64 << 20


def wanted_engine() -> str:
    """``GRAFT_ENGINE``, checked: "" (the fastest installed), openvino, onnxruntime (onnx)
    or torch; anything else is a :class:`UsageError` listing them."""
    wanted = os.environ.get("GRAFT_ENGINE", "").strip().lower()
    if wanted and wanted not in ENGINES:
        # A misspelt name would otherwise quietly run whichever engine is installed.
        raise UsageError(
            f"GRAFT_ENGINE={os.environ['GRAFT_ENGINE']!r} is not an engine graft knows: use "
            "openvino, onnxruntime or torch, or unset it to use the fastest one installed."
        )
    return wanted


def _importable(module: str) -> bool:
    """Installed, found without importing it (importing OpenVINO alone takes 0.3 s); a broken
    install fails when the engine loads, and the caller falls back to the next one."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def onnx_available() -> bool:
    """Whether ONNX Runtime may run frozen passes (installed, and not switched off)."""
    return wanted_engine() in ("", "onnxruntime", "onnx") and _importable("onnxruntime")


def openvino_available() -> bool:
    """Whether OpenVINO may run frozen passes (installed, and not switched off)."""
    return wanted_engine() in ("", "openvino") and _importable("openvino")


def cpu_threads() -> int:
    """The CPUs this process may use (its affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class OnnxEngine:
    """ONNX Runtime on CPU, fp32: a float32 NCHW batch in, the graph's output out."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads spin by default, stealing the core that decodes the next batch.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.name = "ONNX Runtime (CPU, fp32)"

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input: np.ascontiguousarray(x)})[0])

    def warm_up(self, max_batch: int) -> None:
        """ONNX Runtime has nothing to compile per shape."""


class OpenVinoEngine:
    """OpenVINO on CPU, fp32, compiled per batch shape.

    A static input shape lets OpenVINO pick its kernels and memory plan up front: measured
    here, single images 2.3 ms instead of 5 ms with a dynamic batch axis, and batch 32 about
    15% faster. Batches are padded up to the next power of two (at most 2x the work, and
    the padding rows are dropped), so a stream of ragged batches compiles a handful of
    shapes, each once, on first use.

    ``cache``: keep each compiled shape on disk for the next process (graft.ovcache; about
    2x quicker to load than to compile); on for prediction, off for training's throwaway
    graphs.
    """

    def __init__(
        self, path: Path, threads: int | None = None, max_batch: int = 64, cache: bool = False
    ):
        import openvino as ov

        from .ovcache import CompiledCache

        self.core = ov.Core()
        self.model = self.core.read_model(str(path))  # held in memory: the file may go
        self.cache = CompiledCache.open(path) if cache else None
        self.threads = threads or cpu_threads()
        self.max_batch = max_batch
        self.static = path.stat().st_size <= STATIC_SHAPES_MAX_BYTES
        self.requests: dict[int, Any] = {}
        self.lock = threading.Lock()
        self.name = "OpenVINO (CPU, fp32" + (", static batch shapes)" if self.static else ")")

    def _request(self, n: int) -> Any:
        with self.lock:
            if n not in self.requests:
                model = self.model
                if self.static:
                    model = self.model.clone()
                    dims = self.model.input(0).get_partial_shape()
                    model.reshape([n, *(d.get_length() for d in list(dims)[1:])])
                config: dict[str, Any] = {
                    "INFERENCE_NUM_THREADS": self.threads,
                    # f32 even where the CPU has bf16, so outputs stay within ONNX_ATOL
                    "INFERENCE_PRECISION_HINT": "f32",
                    "PERFORMANCE_HINT": "LATENCY",
                }
                self.requests[n] = self._compile(model, config, n).create_infer_request()
            return self.requests[n]

    def _compile(self, model: Any, config: dict[str, Any], n: int) -> Any:
        """``model`` compiled for batch ``n`` (0: dynamic), through the disk cache when it
        has one; a compile that fails with the cache is tried once more without it."""
        cache = self.cache
        folder = cache.shape_dir(n) if cache is not None else None
        if cache is None or folder is None:
            return self.core.compile_model(model, "CPU", config)
        try:
            compiled = self.core.compile_model(model, "CPU", {**config, "CACHE_DIR": str(folder)})
        except Exception as exc:  # the cache's fault or not: without it, it is known to work
            import logging

            logging.getLogger("graft.ovcache").debug("compile with the cache failed: %s", exc)
            return self.core.compile_model(model, "CPU", config)
        cache.record(folder)
        return compiled

    def warm_up(self, max_batch: int) -> None:
        """Compile every padded shape up to ``max_batch`` now: a server's first requests
        would otherwise each wait for a compile."""
        if not self.static:
            self._request(0)
            return
        top = min(1 << (max(1, max_batch) - 1).bit_length(), self.max_batch)
        n = 1
        while n <= top:
            self._request(n)
            n *= 2

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) > self.max_batch:
            parts = range(0, len(x), self.max_batch)
            return np.concatenate([self.run(x[i : i + self.max_batch]) for i in parts])
        n = len(x)
        size = 1 << (n - 1).bit_length() if self.static else 0
        if size > n:
            x = np.concatenate([x, np.zeros((size - n, *x.shape[1:]), dtype=np.float32)])
        out = self._request(size).infer({0: x})[0]
        return np.array(out[:n])  # a copy: the request reuses its output buffer
