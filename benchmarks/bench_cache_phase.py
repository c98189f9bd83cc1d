"""Where the cache phase of a demo run goes: decoding, the network, and how much of the two
overlap with decoding worker processes.

    python benchmarks/bench_cache_phase.py --workers 0 1 2

On the demo's sprites (``make demo`` builds them under .cache/demo) with graft's default
model (EfficientNet-Lite0 at 128 px, light augmentation, the default fine-tuning cut):
decode + transform per image on one thread (clean, and one decode for two augmented
views), then for each worker count the clean pass over every image and the two augmented
views of 70% of them through FrozenFeatures (an empty cache each time), beside the network
alone on the same number of batches.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import graft._malloc  # noqa: F401  (the allocator tuning graft uses; before any big tensor)
from graft.cache import item_seed
from graft.config import TrainConfig
from graft.data import scan
from graft.detail import new_model_info
from graft.features import FrozenFeatures
from graft.loading import ImageFiles, ImageViews, transform_for
from graft.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT / ".cache/demo/sprites-1-4-7-25-150"))
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    data = scan(args.data)
    info = new_model_info(TrainConfig(), data)
    model, source = build_model(info, True, None, False)
    model.eval()
    n, pre = len(data.paths), info.preprocessing
    train = list(range(n * 7 // 10))
    clean = ImageFiles(data.paths, None, transform_for(pre), info.img_size)
    seeds = [[item_seed(h, v, 0) for v in (1, 2)] for h in data.sha256]
    views = ImageViews(data.paths, None, transform_for(pre, "light"), info.img_size, seeds)
    for name, files in (("clean", clean), ("decode once + 2 augmented views", views)):
        t = time.perf_counter()
        for i in range(300):
            files[i]
        print(f"per image, one thread: {name} {(time.perf_counter() - t) / 300 * 1e3:.2f} ms")
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            frozen = FrozenFeatures(
                model, source, model.n_blocks - 2, cache_dir=tmp, augment="light", workers=workers
            )
            x = torch.randn(16, 3, info.img_size, info.img_size)
            frozen.runner(x)  # built and warm before timing
            t = time.perf_counter()
            frozen.views(data, range(n))
            a = time.perf_counter() - t
            t = time.perf_counter()
            frozen.augmented_views(data, train, 3, "augmented")
            b = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(0, n + 2 * len(train), 16):
                frozen.runner(x)
            c = time.perf_counter() - t
        print(
            f"{workers} worker(s): clean pass {a:.2f} s ({n} images), 2 augmented views "
            f"{b:.2f} s ({len(train)} images), network alone for all {n + 2 * len(train)} "
            f"passes {c:.2f} s"
        )


if __name__ == "__main__":
    main()
