"""Backbones side by side on this CPU: size and frozen-pass throughput at 128 and 224 px.

    python benchmarks/bench_backbones.py --json benchmarks/results/backbones.json

For each backbone: parameters of the backbone (no classifier), the length of its pooled
features, and images per second through the pooled backbone at batch 32, fp32, with random
weights (speed does not depend on the weights), on two engines: PyTorch eager (channels_last,
as graft's PyTorch runner) and OpenVINO (graft's default engine for frozen passes and
prediction on CPU: the graph exported to ONNX, compiled for the batch shape). Each figure is
the best of several timed windows, so that other processes on the machine cost as little
as possible; the load average at the start and end is recorded with them. ImageNet top-1 is
not measured here: it is quoted from timm's results (see README).

``openvino_max_rel_diff`` is OpenVINO's largest difference from PyTorch relative to the
largest feature. With random weights a deep network's features grow large and rounding
grows with them (efficientnetv2_rw_s at 224 px: 2e-2); with BatchNorm statistics taken from
data, as trained weights have, the same graph agrees within 1.2e-5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

import graft._malloc  # noqa: F401  (the allocator tuning graft uses; before any big tensor)

#: the README's recommended backbones: graft's default, then timm models by family
MODELS = (
    "efficientnet_lite0",
    "mobilenetv3_large_100",
    "convnext_atto",
    "resnet50.a1_in1k",
    "efficientnetv2_rw_s",
    "convnext_tiny",
    "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "vit_small_patch14_dinov2.lvd142m",
)
SIZES = (128, 224)
BATCH = 32


def best_rate(fn: Callable[[], object], seconds: float, windows: int = 12) -> float:
    """Images per second of ``fn`` (one batch): the best of ``windows`` timed windows."""
    fn()  # warm-up: first-call allocations, OpenVINO's lazy compilation
    rates = []
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        while True:
            fn()
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / windows:
                break
        rates.append(count * BATCH / elapsed)
    return max(rates)


def measure(name: str, size: int, seconds: float) -> dict[str, float]:
    from graft.engines import OpenVinoRunner, export_onnx
    from graft.model import FrozenPart, create_backbone

    torch.manual_seed(0)
    backbone, _ = create_backbone(name, pretrained=False, img_size=size)
    backbone.eval()
    part = FrozenPart(backbone, len(backbone.blocks)).eval()
    x = torch.randn(BATCH, 3, size, size)
    out: dict[str, float] = {
        "params_m": sum(p.numel() for p in backbone.parameters()) / 1e6,
        "features": float(backbone.num_features),
        "blocks": float(len(backbone.blocks)),
    }
    eager = part.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out["torch_img_s"] = best_rate(lambda: eager(xc), seconds)
    onnx_path = Path(f"/tmp/bench-backbones-{os.getpid()}.onnx")
    try:
        export_onnx(part, size, onnx_path)
        runner = OpenVinoRunner(onnx_path, torch.get_num_threads(), max_batch=BATCH)
    finally:
        onnx_path.unlink(missing_ok=True)
    runner.warm_up(BATCH)
    out["openvino_img_s"] = best_rate(lambda: runner(x), seconds)
    with torch.no_grad():
        want = part(x)
        diff = float((runner(x) - want).abs().max())
    # relative to the largest feature: random weights in a deep net give features in the
    # hundreds, where fp32 rounding of a folded BatchNorm alone moves the third decimal
    out["openvino_max_rel_diff"] = diff / float(want.abs().max())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--seconds", type=float, default=6.0, help="timing per measurement")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results: dict[str, dict[str, dict[str, float]]] = {}
    load_start = os.getloadavg()
    for name in args.models:
        results[name] = {}
        for size in SIZES:
            row = measure(name, size, args.seconds)
            results[name][str(size)] = row
            print(
                f"{name:45s} {size:4d}px  {row['params_m']:6.1f} M  {row['features']:5.0f} feat  "
                f"torch {row['torch_img_s']:7.1f} img/s  openvino {row['openvino_img_s']:7.1f} "
                f"img/s  (rel. diff {row['openvino_max_rel_diff']:.1e})",
                flush=True,
            )
    report = {
        "batch": BATCH,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
