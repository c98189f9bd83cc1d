"""Where and how tensors are computed: the device, autocast and memory format, chosen once.

(Not to be confused with :mod:`graft.engines`, which picks the *runtime* of frozen forward
passes: OpenVINO, ONNX Runtime or PyTorch.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Device", "choose_device"]


@dataclass
class Device:
    """The device, autocast dtype and memory format of a run; ``reason`` is printed."""

    device: torch.device
    autocast: torch.dtype | None
    channels_last: bool
    reason: str

    def context(self) -> Any:
        if self.autocast is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def choose_device() -> Device:
    """CUDA with bf16/fp16 autocast where there is a GPU; on a CPU with native bf16, bf16
    autocast; else fp32. ``GRAFT_PRECISION=fp32`` turns autocast off everywhere (exact
    comparisons between runs: bf16 rounds differently when a batch is split across ranks)."""
    fp32 = os.environ.get("GRAFT_PRECISION", "auto").strip().lower() == "fp32"
    if torch.cuda.is_available():
        if fp32:
            return Device(torch.device("cuda"), None, True, "CUDA, fp32 (GRAFT_PRECISION=fp32)")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Device(
            torch.device("cuda"),
            dtype,
            True,
            f"CUDA ({torch.cuda.get_device_name()}), {str(dtype).split('.')[1]} autocast",
        )
    if fp32:
        return Device(torch.device("cpu"), None, True, "CPU, fp32 + channels_last (asked)")
    if _cpu_has_bf16():
        return Device(
            torch.device("cpu"),
            torch.bfloat16,
            True,
            "CPU with native bf16: bf16 autocast + channels_last",
        )
    # Without native bf16 (e.g. AVX2-only CPUs) bf16 autocast is ~25x slower, not faster.
    return Device(torch.device("cpu"), None, True, "CPU without native bf16: fp32 + channels_last")
