"""Fast frozen forward passes: OpenVINO or ONNX Runtime on CPU, PyTorch everywhere else.

Two places run a network without training it: caching the frozen backbone's outputs, and
prediction. On this 2-core AVX2 CPU, for EfficientNet-Lite0 at 128 px (BENCHMARKS.md):
OpenVINO compiled for a fixed batch shape runs about 2x eager PyTorch at batch 32 and
single images in about 2.3 ms; ONNX Runtime about 1.2x and 6.7 ms. Both give outputs equal to
PyTorch's within 1e-4 (tests/test_engines.py). A ``Runner`` hides which one is used: torch
tensor in, torch tensor out. The model is exported to ONNX once; OpenVINO reads that file.
When an engine is missing or fails, graft falls back to the next and says why;
``GRAFT_ENGINE=openvino|onnxruntime|torch`` names one.
"""

from __future__ import annotations

import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .device import Device
from .errors import UsageError

#: Absolute tolerance of ONNX Runtime / OpenVINO outputs against PyTorch (fp32), checked by
#: the tests.
ONNX_ATOL = 1e-4
#: ONNX files above this size (VGG16: 528 MB) get one dynamic-shape OpenVINO model instead of
#: one compiled model per batch shape, each of which would hold its own copy of the weights.
STATIC_SHAPES_MAX_BYTES = 64 << 20


#: the values GRAFT_ENGINE takes ("" or unset: the fastest installed; "onnx" = onnxruntime)
ENGINES = ("openvino", "onnxruntime", "onnx", "torch")


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
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def onnx_available() -> bool:
    """Whether ONNX Runtime may run frozen passes (installed, and not switched off)."""
    return wanted_engine() in ("", "onnxruntime", "onnx") and _importable("onnxruntime")


def openvino_available() -> bool:
    """Whether OpenVINO may run frozen passes (installed, and not switched off)."""
    return wanted_engine() in ("", "openvino") and _importable("openvino")


class Runner:
    """A frozen forward pass. ``name`` says which engine runs it (printed for the user)."""

    name = "torch"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def warm_up(self, max_batch: int) -> None:
        """Prepare for batches of up to ``max_batch`` now rather than on first use."""


class TorchRunner(Runner):
    def __init__(self, module: nn.Module, device: Device):
        self.module, self.device = module.eval(), device
        self.name = f"PyTorch ({device.reason})"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.device.context():
            return self.module(self.device.prepare(x)).float().cpu()


class OnnxRunner(Runner):
    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads spin by default, stealing the core that decodes the next batch.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.name = "ONNX Runtime (CPU, fp32)"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input: x.contiguous().numpy()})[0]
        return torch.from_numpy(out)


class OpenVinoRunner(Runner):
    """OpenVINO on CPU, fp32, compiled per batch shape.

    A static input shape lets OpenVINO pick its kernels and memory plan up front: measured
    here, single images 2.3 ms instead of 5 ms with a dynamic batch axis, and batch 32 about
    15% faster. Batches are padded up to the next power of two (at most 2x the work, and
    the padding rows are dropped), so a stream of ragged batches compiles a handful of
    shapes, each once, on first use.
    """

    def __init__(self, path: Path, threads: int | None = None, max_batch: int = 64):
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(str(path))  # held in memory: the file may go
        self.threads = threads or torch.get_num_threads()
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
                config = {
                    "INFERENCE_NUM_THREADS": self.threads,
                    # f32 even where the CPU has bf16, so outputs stay within ONNX_ATOL
                    "INFERENCE_PRECISION_HINT": "f32",
                    "PERFORMANCE_HINT": "LATENCY",
                }
                compiled = self.core.compile_model(model, "CPU", config)
                self.requests[n] = compiled.create_infer_request()
            return self.requests[n]

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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()
        if len(x) > self.max_batch:
            return torch.cat([self(part) for part in x.split(self.max_batch)])
        n = len(x)
        size = 1 << (n - 1).bit_length() if self.static else 0
        if size > n:
            x = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])
        request = self._request(size)
        out = request.infer({0: x.numpy()})[0]
        return torch.from_numpy(out[:n].copy())


def export_onnx(module: nn.Module, img_size: int, path: Path, output_name: str = "output") -> Path:
    """Export ``module`` (images -> anything) with a dynamic batch axis, atomically."""
    from .io import atomic_save

    module = module.eval().to("cpu", memory_format=torch.contiguous_format)
    example = torch.zeros(1, 3, img_size, img_size)

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter
            torch.onnx.export(
                module,
                (example,),
                tmp,
                input_names=["images"],
                output_names=[output_name],
                dynamic_axes={"images": {0: "batch"}, output_name: {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )

    atomic_save(Path(path), write)
    return Path(path)


def make_runner(
    module: nn.Module,
    img_size: int,
    device: Device,
    onnx_path: Path | None = None,
    prefer_onnx: bool = True,
    notes: list[str] | None = None,
) -> Runner:
    """The fastest correct runner for ``module`` on this machine.

    On CPU the module is exported to ONNX and run by OpenVINO, else ONNX Runtime, whichever
    is installed (and not switched off by ``GRAFT_ENGINE``); ``onnx_path`` keeps the export
    for reuse, otherwise it lives in a temporary file until the engine has read it. Any
    failure falls back to the next engine, and finally to PyTorch, with a note saying why.
    """
    engines = [e for e, ok in (("openvino", openvino_available), ("onnx", onnx_available)) if ok()]
    if not (prefer_onnx and device.device.type == "cpu" and engines):
        return TorchRunner(module, device)
    temporary = onnx_path is None
    try:
        if onnx_path is None:
            handle = tempfile.NamedTemporaryFile(suffix=".onnx", delete=False)
            handle.close()
            onnx_path = Path(handle.name)
            export_onnx(module, img_size, onnx_path)
        elif not onnx_path.is_file():
            export_onnx(module, img_size, onnx_path)
    except Exception as exc:  # an export failure: PyTorch still works
        if temporary and onnx_path is not None:
            onnx_path.unlink(missing_ok=True)  # no half-written file left in /tmp
        if notes is not None:
            notes.append(f"Could not export this model to ONNX ({exc}); using PyTorch.")
        return TorchRunner(module, device)
    runner: Runner | None = None
    for name in engines:
        try:
            runner = OpenVinoRunner(onnx_path) if name == "openvino" else OnnxRunner(onnx_path)
            break
        except Exception as exc:
            if notes is not None:
                notes.append(f"{name} could not load this model ({exc}); trying the next engine.")
    if temporary:
        onnx_path.unlink(missing_ok=True)  # the engine holds the model in memory
    if runner is None:
        return TorchRunner(module, device)
    if device.channels_last:
        module.to(memory_format=torch.channels_last)
    return runner


class Probabilities(nn.Module):
    """The whole classifier with its calibrated softmax: the graph prediction exports.

    One output, ``[batch, classes]``, or ``[batch, classes + 1]`` when the model has a
    familiarity score (graft.familiarity): the probabilities, then the familiarity in the
    last column. One tensor rather than two outputs, so every engine and runner passes it
    through unchanged; :func:`graft.runtime.split_output` takes it apart."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, familiarity = self.model.forward_with_familiarity(x)
        probs = (logits / self.model.info.temperature).softmax(dim=1)
        if familiarity is None:
            return probs
        return torch.cat([probs.float(), familiarity[:, None].float()], dim=1)


__all__ = [
    "ENGINES",
    "ONNX_ATOL",
    "OnnxRunner",
    "OpenVinoRunner",
    "Probabilities",
    "Runner",
    "TorchRunner",
    "export_onnx",
    "make_runner",
    "onnx_available",
    "openvino_available",
    "wanted_engine",
]
