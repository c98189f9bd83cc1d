"""Why graft tunes glibc malloc where work starts (CLI, fit, Predictor): eager PyTorch
with and without it, side by side.

    python benchmarks/bench_malloc.py

Each variant runs in its own process (the setting must be made before torch allocates):
EfficientNet-Lite0 at 128 px, batch 32, inference and a training step, eager fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure() -> dict:
    sys.path.insert(0, str(ROOT))
    from graft._malloc import tune_malloc

    tune_malloc()  # before torch allocates; a no-op under GRAFT_NO_MALLOC_TUNING
    import timm
    import torch

    model = timm.create_model("tf_efficientnet_lite0")
    x = torch.randn(32, 3, 128, 128)

    def rate(fn, n: int) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return 32 * n / (time.perf_counter() - t)

    model.eval()
    with torch.no_grad():
        infer = rate(lambda: model(x), 8)
    model.train()
    opt = torch.optim.Adam(model.parameters(), 1e-5)

    def step() -> None:
        opt.zero_grad()
        model(x).logsumexp(1).mean().backward()
        opt.step()

    return {"inference_img_s": infer, "train_img_s": rate(step, 3)}


def main() -> None:
    if "--child" in sys.argv:
        print(json.dumps(measure()))
        return
    results = {}
    for name, env in (("glibc default", {"GRAFT_NO_MALLOC_TUNING": "1"}), ("graft tuned", {})):
        out = subprocess.run(
            [sys.executable, __file__, "--child"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **env},
        )
        results[name] = json.loads(out.stdout.splitlines()[-1])
    base, tuned = results["glibc default"], results["graft tuned"]
    print(f"{'':22} {'default':>10} {'tuned':>10} {'ratio':>7}")
    for key in ("inference_img_s", "train_img_s"):
        print(f"{key:22} {base[key]:10.1f} {tuned[key]:10.1f} {tuned[key] / base[key]:6.2f}x")


if __name__ == "__main__":
    main()
