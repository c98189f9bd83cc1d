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
    ap.add_argument(
        "--workers", type=int, nargs="*", default=[0, 1], help="none: the per-image lines only"
    )
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
    normalisation(pre)
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


def normalisation(pre) -> None:
    """One 128 px view's ``/ 255, - mean, / std`` and HWC -> CHW: numpy broadcasting over
    the last axis (graft before the twelfth session) against in place, one channel plane
    at a time, in torch and in numpy (graft.runtime.normalise_into, what graft uses now),
    interleaved on the same pictures (same numbers, checked)."""
    import numpy as np
    from PIL import Image

    from graft.loading import ToNormalizedTensor
    from graft.runtime import normalise_into

    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)

    def before(im: Image.Image) -> torch.Tensor:
        x = np.asarray(im, dtype=np.float32) / np.float32(255.0)
        return torch.from_numpy(np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1)))

    now = ToNormalizedTensor(pre.mean, pre.std)

    def numpy_now(im: Image.Image) -> torch.Tensor:  # prediction's (graft.runtime)
        out = np.empty((1, 3, im.height, im.width), np.float32)
        normalise_into(out, np.asarray(im)[None], mean, std)
        return torch.from_numpy(out[0])

    rng = np.random.default_rng(0)
    size = (pre.size, pre.size, 3)
    images = [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for _ in range(64)]
    assert all(torch.equal(before(im), now(im)) for im in images)
    assert all(torch.equal(before(im), numpy_now(im)) for im in images)
    spent: dict[str, list[float]] = {"before": [], "now": [], "numpy": []}
    for _ in range(15):
        for name, fn in (("before", before), ("now", now), ("numpy", numpy_now)):
            t = time.perf_counter()
            for im in images:
                fn(im)
            spent[name].append((time.perf_counter() - t) / len(images) * 1e3)
    b, n, m = (float(np.median(spent[k])) for k in ("before", "now", "numpy"))
    print(
        f"normalisation of one {pre.size} px view (median of 15 interleaved rounds): "
        f"numpy broadcast {b:.3f} ms; in place per plane: torch (training) {n:.3f} ms "
        f"({b / n:.1f}x), numpy (prediction) {m:.3f} ms ({b / m:.1f}x)"
    )


if __name__ == "__main__":
    main()
