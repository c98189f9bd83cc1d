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

import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .device import Device
from .inference import (  # the engine choice is torch-free; re-exported here
    ENGINES,
    OnnxEngine,
    OpenVinoEngine,
    onnx_available,
    openvino_available,
    wanted_engine,
)

#: Absolute tolerance of ONNX Runtime / OpenVINO outputs against PyTorch (fp32), checked by
#: the tests.
ONNX_ATOL = 1e-4


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
    """ONNX Runtime (graft.fast.OnnxEngine) behind torch tensors."""

    def __init__(self, path: Path, threads: int | None = None):
        self.engine = OnnxEngine(path, threads or torch.get_num_threads())
        self.name = self.engine.name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.engine.run(x.float().contiguous().numpy()))


class OpenVinoRunner(Runner):
    """OpenVINO with static batch shapes (graft.fast.OpenVinoEngine) behind torch tensors."""

    def __init__(self, path: Path, threads: int | None = None, max_batch: int = 64):
        self.engine = OpenVinoEngine(path, threads or torch.get_num_threads(), max_batch)
        self.name = self.engine.name

    @property
    def requests(self) -> dict[int, Any]:
        """The compiled batch shapes so far."""
        return self.engine.requests

    def warm_up(self, max_batch: int) -> None:
        self.engine.warm_up(max_batch)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.engine.run(x.float().contiguous().numpy()))


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
