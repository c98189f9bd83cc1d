"""Fast frozen forward passes: ONNX Runtime on CPU, PyTorch everywhere else.

Two places run a network without training it: caching the frozen backbone's outputs, and
prediction. On a CPU, ONNX Runtime runs EfficientNet-Lite0 at 128 px 1.5x faster than eager
PyTorch at batch 32 and about 5x faster for a single image (BENCHMARKS.md), with outputs equal
to PyTorch's within 1e-4 (tests/test_engines.py). A ``Runner`` hides which one is used:
torch tensor in, torch tensor out. When onnxruntime is missing or an export fails, graft falls
back to PyTorch and says why.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Absolute tolerance of ONNX Runtime outputs against PyTorch (fp32), checked by the tests.
ONNX_ATOL = 1e-4


def onnx_available() -> bool:
    if os.environ.get("GRAFT_ENGINE", "").lower() == "torch":
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class Runner:
    """A frozen forward pass. ``name`` says which engine runs it (printed for the user)."""

    name = "torch"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TorchRunner(Runner):
    def __init__(self, module: nn.Module, engine: Any):
        self.module, self.engine = module.eval(), engine
        self.name = f"PyTorch ({engine.reason})"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.engine.context():
            return self.module(self.engine.prepare(x)).float().cpu()


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
    engine: Any,
    onnx_path: Path | None = None,
    prefer_onnx: bool = True,
    notes: list[str] | None = None,
) -> Runner:
    """The fastest correct runner for ``module`` on this machine.

    ONNX Runtime is used on CPU when installed; ``onnx_path`` keeps the exported model (for
    reuse), otherwise it lives in a temporary file for the life of the runner.
    """
    if not (prefer_onnx and engine.device.type == "cpu" and onnx_available()):
        return TorchRunner(module, engine)
    try:
        if onnx_path is None:
            handle = tempfile.NamedTemporaryFile(suffix=".onnx", delete=False)
            handle.close()
            onnx_path = Path(handle.name)
            export_onnx(module, img_size, onnx_path)
            runner = OnnxRunner(onnx_path)
            onnx_path.unlink(missing_ok=True)  # the session holds the model in memory
        else:
            if not onnx_path.is_file():
                export_onnx(module, img_size, onnx_path)
            runner = OnnxRunner(onnx_path)
        if engine.channels_last:
            module.to(memory_format=torch.channels_last)
        return runner
    except Exception as exc:  # any export/runtime failure: PyTorch still works
        if notes is not None:
            notes.append(f"ONNX Runtime unavailable for this model ({exc}); using PyTorch.")
        return TorchRunner(module, engine)


class FrozenPart(nn.Module):
    """The backbone up to block ``cut`` (pooled to vectors when ``cut`` is the end)."""

    def __init__(self, backbone: nn.Module, cut: int):
        super().__init__()
        self.blocks = nn.ModuleList(list(backbone.blocks[:cut]))
        self.pool = cut == len(backbone.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=(2, 3)) if self.pool else x


class Probabilities(nn.Module):
    """The whole classifier with its calibrated softmax: the graph prediction exports."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) / self.model.info.temperature).softmax(dim=1)


__all__ = [
    "ONNX_ATOL",
    "FrozenPart",
    "OnnxRunner",
    "Probabilities",
    "Runner",
    "TorchRunner",
    "export_onnx",
    "make_runner",
    "onnx_available",
]
