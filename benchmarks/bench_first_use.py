"""When the fast engine pays for itself: a job of the frozen part on PyTorch eager against
exporting it to ONNX and compiling it for OpenVINO first, at several input sizes.

    python benchmarks/bench_first_use.py --json benchmarks/results/first-use.json

For EfficientNet-Lite0's frozen part below the default fine-tuning cut (the part that
fills the feature cache): the one-off cost of the fast engine (ONNX export, OpenVINO read
and compile, first batch; the on-disk OpenVINO model cache switched off), both engines'
images/s at 16 rows per call, and the break-even: the number of images from which the
export pays for itself. graft.features.FAST_ENGINE_MIN_IMAGES is set from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import graft._malloc  # noqa: F401  (the allocator tuning graft uses; before any big tensor)

os.environ["GRAFT_OPENVINO_CACHE"] = "off"  # a first use really compiles

import torch

from graft.backbones import get_spec
from graft.device import choose_device
from graft.engines import TorchRunner, make_runner
from graft.model import build_model
from graft.modelinfo import ModelInfo


def rate(runner, x: torch.Tensor, repeats: int = 7) -> float:
    runner(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        runner(x)
        times.append(time.perf_counter() - t)
    return len(x) / statistics.median(times)


def measure(size: int, backbone: str) -> dict:
    spec = get_spec(backbone)
    info = ModelInfo(backbone, size, spec.mean, spec.std, ("a", "b", "c"), "linear", 0.2)
    # VGG16 has no offline weights: random ones time the same
    model, _ = build_model(info, backbone != "vgg16", None, False)
    model.eval()
    device = choose_device()
    part = model.frozen_part(model.n_blocks - 2)
    x = torch.randn(16, 3, size, size)
    t = time.perf_counter()
    fast = make_runner(part, size, device)
    fast(x)
    setup = time.perf_counter() - t
    if device.channels_last:
        part.to(memory_format=torch.channels_last)
    eager, compiled = rate(TorchRunner(part, device), x), rate(fast, x)
    saved = 1 / eager - 1 / compiled
    return {
        "backbone": backbone,
        "img_size": size,
        "fast_engine": fast.name,
        "setup_s": round(setup, 3),
        "eager_img_s": round(eager, 1),
        "fast_img_s": round(compiled, 1),
        "break_even_images": round(setup / saved) if saved > 0 else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    rows = [measure(size, args.backbone) for size in args.sizes]
    for r in rows:
        print(
            f"{r['backbone']} @ {r['img_size']} px: fast engine set-up {r['setup_s']:.2f} s; "
            f"eager {r['eager_img_s']:.0f} img/s, {r['fast_engine']} {r['fast_img_s']:.0f} "
            f"img/s; pays for itself from {r['break_even_images']} images"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch_threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
