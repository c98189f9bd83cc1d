"""Turning image files into tensors for PyTorch: the transforms of training and prediction,
a dataset of files that reports unreadable ones instead of failing, and its loader.

Kept apart from graft.data (scanning, torch-free) so that reading a dataset or a run's
split never imports torch: ``graft evaluate`` on a run's current ONNX export needs neither.
graft.data still offers these names (imported on first use).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .files import describe_decode_error
from .runtime import Preprocessing, load_image, normalise_into

# --------------------------------------------------------------------------- transforms


class TrimBackground:
    """A transform: :func:`graft.runtime.trim_background` (a class, so workers can pickle it)."""

    def __call__(self, im: Image.Image) -> Image.Image:
        from .runtime import trim_background

        return trim_background(im)


class CapDetail:
    """A transform: :func:`graft.runtime.cap_detail` (a class, so workers can pickle it)."""

    def __init__(self, detail: int):
        self.detail = detail

    def __call__(self, im: Image.Image) -> Image.Image:
        from .runtime import cap_detail

        return cap_detail(im, self.detail)


class ColourAtSmallerSize:
    """Colour changes (per pixel) and geometric ones (crop, flip, rotation) in whichever
    order puts the colour changes on fewer pixels: first on a source smaller than the
    output (a sprite, an icon: ColorJitter's hue step on a 40 px sprite costs a tenth of
    the same on its 128 px enlargement), last otherwise. Either way the result is a function
    of the image and the random state alone (cached views stay reproducible).

    One difference between the two orders: on the first, a rotation's fill (white) comes
    after the jitter and stays pure white beside a tinted background. Measured on sprites,
    emoji and Fashion-MNIST (BENCHMARKS.md "Views", against the robust fine-tuning table of
    the order before), accuracy did not move beyond noise."""

    def __init__(
        self,
        geometric: Callable[[Image.Image], Image.Image],
        colour: Callable[[Image.Image], Image.Image],
        img_size: int,
    ):
        self.geometric, self.colour, self.area = geometric, colour, img_size * img_size

    def __call__(self, im: Image.Image) -> Image.Image:
        if im.width * im.height < self.area:
            return self.geometric(self.colour(im))
        return self.colour(self.geometric(im))


class ToNormalizedTensor:
    """``T.Compose([T.ToTensor(), T.Normalize(mean, std)])`` for 8-bit RGB images: the
    same operations in the same order as torchvision and as the export's preprocessing
    (:func:`graft.runtime.normalise_into`), so the same numbers bit for bit, without
    torchvision's per-call checks and logging. Other modes go through ToTensor."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __call__(self, im: Image.Image) -> torch.Tensor:
        if im.mode == "RGB":
            # The export's own code, in place, one channel plane at a time: 0.09 ms for a
            # 128 px view against 0.34-0.41 ms for the broadcast (HWC / 255 - mean) / std
            # it replaced (paid for every view; benchmarks/bench_cache_phase.py).
            x = np.empty((1, 3, im.height, im.width), dtype=np.float32)
            normalise_into(x, np.asarray(im)[None], self.mean, self.std)
            return torch.from_numpy(x[0])
        from torchvision.transforms.functional import normalize, to_tensor

        return normalize(to_tensor(im), self.mean.tolist(), self.std.tolist())


def transform_for(
    pre: Preprocessing, augment: str = "none"
) -> Callable[[Image.Image], torch.Tensor]:
    """The torchvision transform for one image of a model whose inputs ``pre`` describes
    (``ModelInfo.preprocessing``): the same steps as graft.runtime.preprocess, plus the
    augmentation for training images."""
    return build_transform(pre.size, pre.mean, pre.std, augment, pre.trim, pre.detail)


def build_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: str = "none",
    trim: bool = False,
    detail: int = 0,
) -> Callable[[Image.Image], torch.Tensor]:
    """The preprocessing for one image; ``augment`` is only ever used for training images.

    Evaluation resizes the whole image to ``img_size`` x ``img_size`` (as the seed did), so
    nothing at the edges is cropped away. ``trim`` first crops a uniform background to a
    square around the object, and ``detail`` then brings a larger picture down to that many
    pixels (graft.runtime.cap_detail), for training and prediction alike.
    """
    from torchvision import transforms as T

    if trim or detail > 0:
        inner = build_transform(img_size, mean, std, augment)
        first = [TrimBackground()] if trim else []
        return T.Compose([*first, *([CapDetail(detail)] if detail > 0 else []), inner])
    size = (img_size, img_size)
    finish = [ToNormalizedTensor(mean, std)]
    if augment == "none":
        return T.Compose([T.Resize(size, antialias=True), *finish])
    if augment == "light":
        geometric = T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.75, 1.0), ratio=(0.85, 1.18), antialias=True),
                T.RandomHorizontalFlip(),
                T.RandomRotation(10, fill=255),
            ]
        )
        colour = T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)
        return T.Compose([ColourAtSmallerSize(geometric, colour, img_size), *finish])
    if augment == "strong":
        geometric = T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
                T.RandomHorizontalFlip(),
                T.RandAugment(num_ops=2, magnitude=9, fill=[255, 255, 255]),
            ]
        )
        colour = T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05)
        return T.Compose([ColourAtSmallerSize(geometric, colour, img_size), *finish])
    if augment == "domain":
        # For training on one kind of picture (game sprites, studio photos) and predicting
        # another (drawings, phone photos): what changes between sources is scale, colour,
        # sharpness and how the pixels were resampled, so vary exactly those.
        crop = dict(scale=(0.35, 1.0), ratio=(0.8, 1.25), antialias=True)
        nearest = T.InterpolationMode.NEAREST
        geometric = T.Compose(
            [
                T.RandomChoice(
                    [
                        T.RandomResizedCrop(size, **crop),  # smooth, like a drawing
                        T.RandomResizedCrop(size, interpolation=nearest, **crop),  # pixel art
                    ]
                ),
                T.RandomHorizontalFlip(),
            ]
        )
        colour = T.Compose(
            [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.08)], p=0.8), T.RandomGrayscale(p=0.2)]
        )
        return T.Compose(
            [
                ColourAtSmallerSize(geometric, colour, img_size),
                T.RandomApply([T.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.3),
                *finish,
            ]
        )
    raise ValueError(f"unknown augment {augment!r}")


# --------------------------------------------------------------------------- loading


class ImageFiles(Dataset):
    """Images from a list of files; a file that fails to decode yields ``None`` (skipped).

    ``seeds`` (one per file) make each image's random augmentation a function of the image
    alone, not of the batch or worker it lands in: cached views are then reproducible.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | None,
        transform: Callable[[Image.Image], torch.Tensor],
        size_hint: int | None = None,
        seeds: Sequence[int] | None = None,
    ):
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform
        self.size_hint = size_hint
        self.seeds = list(seeds) if seeds is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int] | tuple[None, str, int]:
        try:
            image = load_image(self.paths[i], self.size_hint)
        except Exception as exc:  # reported per file by the caller
            return None, describe_decode_error(exc), i
        if self.seeds is None:
            return self.transform(image), self.labels[i], i
        return self._seeded(image, [self.seeds[i]])[0], self.labels[i], i

    def _seeded(self, image: Image.Image, seeds: Sequence[int]) -> list[torch.Tensor]:
        """``transform(image)`` once per seed, each seeding the augmentation, without
        disturbing anyone else's random stream.

        Only the CPU generator is seeded (the transforms draw from it alone):
        ``torch.manual_seed`` would also queue a lazy seeding of every accelerator backend,
        each capturing a stack trace, about 0.5 ms per view here."""
        state = random.getstate()
        views = []
        with torch.random.fork_rng(devices=[]):
            for seed in seeds:
                torch.default_generator.manual_seed(seed)
                random.seed(seed)
                views.append(self.transform(image))
        random.setstate(state)
        return views

    def subset(self, indices: Sequence[int]) -> ImageFiles:
        pick = list(indices)
        return ImageFiles(
            [self.paths[i] for i in pick],
            [self.labels[i] for i in pick],
            self.transform,
            self.size_hint,
            [self.seeds[i] for i in pick] if self.seeds is not None else None,
        )


class ImageViews(ImageFiles):
    """Several seeded views of each image from one decode: item ``i`` is a ``[views, C, H,
    W]`` tensor, view ``k`` augmented with the seed ``seeds[i][k]``. Decoding (and the draft
    mode's downscale) is paid once per image, not once per view."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | None,
        transform: Callable[[Image.Image], torch.Tensor],
        size_hint: int | None,
        seeds: Sequence[Sequence[int]],
    ):
        super().__init__(paths, labels, transform, size_hint)
        self.view_seeds = [tuple(s) for s in seeds]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int] | tuple[None, str, int]:
        try:
            image = load_image(self.paths[i], self.size_hint)
        except Exception as exc:  # reported per file by the caller
            return None, describe_decode_error(exc), i
        return torch.stack(self._seeded(image, self.view_seeds[i])), self.labels[i], i

    def subset(self, indices: Sequence[int]) -> ImageViews:
        pick = list(indices)
        return ImageViews(
            [self.paths[i] for i in pick],
            [self.labels[i] for i in pick],
            self.transform,
            self.size_hint,
            [self.view_seeds[i] for i in pick],
        )


def collate_skipping(batch: list) -> dict:
    """Stack the good samples; keep (index, reason) of the ones that failed to decode."""
    good = [b for b in batch if b[0] is not None]
    failed = [(b[2], b[1]) for b in batch if b[0] is None]
    if good:
        images = torch.stack([b[0] for b in good])
        labels = torch.tensor([b[1] for b in good], dtype=torch.long)
        index = torch.tensor([b[2] for b in good], dtype=torch.long)
    else:
        images, labels, index = (
            torch.empty(0),
            torch.empty(0, dtype=torch.long),
            torch.empty(0, dtype=torch.long),
        )
    return {"images": images, "labels": labels, "index": index, "failed": failed}


def default_workers() -> int:
    # One decoding process beside the main one keeps a 2-core laptop busy without
    # fighting the model's own threads; bigger machines get more.
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 1 else min(4, max(1, cpus // 2))


def make_loader(
    dataset: ImageFiles,
    batch_size: int,
    shuffle: bool,
    seed: int,
    workers: int = -1,
    generator: torch.Generator | None = None,
    sampler: Any = None,
) -> DataLoader:
    workers = default_workers() if workers < 0 else workers
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skipping,
        generator=generator,
        persistent_workers=False,
    )
