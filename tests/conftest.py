"""Shared fixtures: small real image folders written by the tests, and one trained run.

The synthetic classes are drawn shapes (circle / square / triangle) in varied colours,
positions and sizes, so a pretrained backbone separates them easily but not trivially.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("GRAFT_CUT_CACHE_MB", "2048")


@pytest.fixture(scope="session", autouse=True)
def feature_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests share one feature cache of their own, never the user's ~/.cache."""
    path = tmp_path_factory.mktemp("feature-cache")
    os.environ["GRAFT_CACHE_DIR"] = str(path)
    return path


SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    colour = tuple(rng.randint(0, 150) for _ in range(3))
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    noise = np.asarray(im, dtype=np.int16) + np.random.default_rng(rng.randint(0, 10**6)).integers(
        -8, 9, (size, size, 3)
    )
    return Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))


def make_dataset(
    root: Path, per_class: dict[str, int] | int = 14, seed: int = 0, extras: bool = False
) -> Path:
    """Write ROOT/<shape>/*.png|jpg. ``extras`` adds the awkward-but-valid cases: a nested
    folder, an upper-case extension, a hidden file, an unsupported file and a broken image."""
    rng = random.Random(seed)
    counts = per_class if isinstance(per_class, dict) else {s: per_class for s in SHAPES}
    for shape, n in counts.items():
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            im = draw_shape(shape, rng)
            if i % 3 == 0:
                im.save(folder / f"{shape}_{i:03d}.jpg", quality=92)
            else:
                im.save(folder / f"{shape}_{i:03d}.png")
    if extras:
        nested = root / SHAPES[0] / "more" / "deeper"
        nested.mkdir(parents=True)
        draw_shape(SHAPES[0], rng).save(nested / "nested.png")
        draw_shape(SHAPES[1], rng).save(root / SHAPES[1] / "UPPER.PNG")
        draw_shape(SHAPES[1], rng).save(root / SHAPES[1] / ".hidden.png")
        (root / SHAPES[2] / "notes.txt").write_text("not an image")
        good = root / SHAPES[2] / f"{SHAPES[2]}_000.jpg"
        (root / SHAPES[2] / "broken.jpg").write_bytes(good.read_bytes()[:200])
    return root


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "shapes", extras=True)


@pytest.fixture(scope="session")
def unseen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images 'from elsewhere': the same classes, drawn with another seed."""
    return make_dataset(tmp_path_factory.mktemp("unseen") / "shapes", per_class=3, seed=99)


# Small but real: genuine ImageNet weights, 64 px inputs, a few epochs.
FAST = dict(
    img_size=64,
    epochs=4,
    fine_tune_epochs=2,
    views=2,
    batch_size=16,
    fine_tune_batch_size=8,
    workers=0,
)


def cli_args(cfg: dict) -> list[str]:
    """A config dict as `graft train` options."""
    out = []
    for key, value in cfg.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, shapes_dir: Path) -> Path:
    from graft import TrainConfig, fit

    out = tmp_path_factory.mktemp("runs") / "shapes"
    fit(TrainConfig(**FAST), shapes_dir, out)
    return out


@pytest.fixture(scope="session")
def vgg16_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VGG16 weights file saved by the test itself (no ImageNet weights exist offline):
    torchvision's architecture, the conv part only, as safetensors."""
    import torch
    from safetensors.torch import save_file
    from torchvision.models import vgg16

    torch.manual_seed(0)
    state = {k: v for k, v in vgg16(weights=None).state_dict().items() if k.startswith("features.")}
    path = tmp_path_factory.mktemp("weights") / "vgg16-features.safetensors"
    save_file(state, str(path))
    return path


def history_rows(run: Path) -> list[dict]:
    """The rows of a run's history.csv so far ([] before the first epoch)."""
    import csv

    path = run / "history.csv"
    if not path.is_file():
        return []
    with open(path) as fh:
        return list(csv.DictReader(fh))
