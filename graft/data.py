"""Reading a folder of labelled images: scan, decode, split, transform, load.

The expected layout (one sub-folder per class; nested folders belong to their class)::

    ROOT/
    ├── bulbasaur/
    │   ├── 001.png
    │   └── shiny/002.png
    └── pikachu/
        └── 003.jpg

Accepted extensions (any case): .jpg .jpeg .png .gif .bmp .webp .tif .tiff. Hidden files and
folders (starting with ".") are ignored. Every file is decoded once by :func:`scan`; files that
cannot be decoded are listed with the reason and left out, never a crash.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .errors import DataError, SplitError
from .runtime import load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
#: A class needs one image in each of train, validation and test.
MIN_PER_CLASS = 3
#: Below this many images a class is "small": the split works but the numbers are noisy.
SMALL_CLASS = 10
#: Warn when the largest class is this many times the smallest.
IMBALANCE_RATIO = 2.0

_LAYOUT_HINT = (
    "graft expects one sub-folder per class, e.g. ROOT/cat/*.jpg and ROOT/dog/*.jpg "
    f"(extensions: {' '.join(IMAGE_EXTENSIONS)})."
)


# --------------------------------------------------------------------------- decoding


def decode_error_kind(exc: BaseException) -> str:
    """What went wrong decoding an image: ``"too_large"`` (a decompression bomb),
    ``"not_image"`` (no decoder recognises it) or ``"corrupt"`` (anything else)."""
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return "too_large"
    if isinstance(exc, Image.UnidentifiedImageError) or "cannot identify image file" in str(exc):
        return "not_image"
    return "corrupt"


def describe_decode_error(exc: BaseException) -> str:
    """A short reason for the skipped-files list."""
    text = str(exc) or type(exc).__name__
    kind = decode_error_kind(exc)
    if kind == "too_large":
        return f"refused: image too large ({text})"
    if kind == "not_image":
        return "not an image (or an unsupported format)"
    if "truncated" in text.lower() or "broken" in text.lower():
        return f"truncated or corrupt image ({text})"
    return text


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- scanning


@dataclass
class ScanResult:
    """The usable images of a dataset folder and what was left out (see :func:`scan`)."""

    root: Path
    classes: list[str]
    paths: list[Path]  # absolute paths of images that decoded
    labels: list[int]  # index into ``classes``
    sha256: list[str] = field(default_factory=list)  # content hash of each image
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    unsupported: list[Path] = field(default_factory=list)  # files with other extensions
    warnings: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}

    def relpath(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def _iter_files(folder: Path) -> Iterable[Path]:
    # followlinks=False: a symlink loop cannot send the walk round forever.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def find_classes(root: str | Path) -> tuple[Path, list[str]]:
    """Check the dataset root and return it with its class names (sorted sub-folders)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"Dataset folder not found: {root}. {_LAYOUT_HINT}")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder. {_LAYOUT_HINT}")
    root = root.resolve()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        extra = (
            f" It holds {len(loose)} images directly; move them into one folder per class."
            if loose
            else ""
        )
        raise DataError(f"No class folders in {root}.{extra} {_LAYOUT_HINT}")
    return root, classes


def scan(
    root: str | Path,
    classes: Sequence[str] | None = None,
    decode: bool = True,
    progress: Callable[[Iterable[Path], int, str], Iterable[Path]] | None = None,
) -> ScanResult:
    """List and decode every image under ``root``; never raises for a single bad file.

    ``classes`` fixes the class list (evaluating a run on another folder): folders that are
    not among them are an error naming them. Raises :class:`DataError` when the folder cannot
    be used at all (missing, no class folders, a class without any usable image, or only
    unsupported files).
    """
    root, found = find_classes(root)
    if classes is not None:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(
                f"{root} has class folders the model does not know: {', '.join(unknown)}. "
                f"The model's classes are: {', '.join(classes)}. Rename or remove those folders."
            )
        class_list = list(classes)
    else:
        class_list = found

    candidates: list[tuple[Path, int]] = []
    unsupported: list[Path] = []
    for index, name in enumerate(class_list):
        folder = root / name
        if not folder.is_dir():
            continue  # a known class absent from an evaluation folder is fine
        for path in _iter_files(folder):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                candidates.append((path, index))
            else:
                unsupported.append(path)

    if not candidates:
        kinds = Counter(p.suffix.lower() or "(no extension)" for p in unsupported)
        found_text = (
            "only files of unsupported types: "
            + ", ".join(f"{n} {ext}" for ext, n in kinds.most_common(5))
            if unsupported
            else "no files"
        )
        raise DataError(f"No images found under {root}: {found_text}. {_LAYOUT_HINT}")

    paths: list[Path] = []
    labels: list[int] = []
    hashes: list[str] = []
    skipped: list[tuple[Path, str]] = []
    iterator: Iterable[tuple[Path, int]] = candidates
    if progress is not None:
        iterator = progress(candidates, len(candidates), "Checking images")  # type: ignore[arg-type]
    for path, label in iterator:
        try:
            # Read once: the bytes give both the content hash and the decode check.
            content = path.read_bytes()
            if decode:
                load_image(content, size_hint=64)
        except Exception as exc:  # one bad file must never stop a scan
            skipped.append((path, describe_decode_error(exc)))
            continue
        paths.append(path)
        labels.append(label)
        hashes.append(hashlib.sha256(content).hexdigest())

    data = ScanResult(root, class_list, paths, labels, hashes, skipped, unsupported)
    counts = data.counts
    if classes is None:
        empty = [name for name, n in counts.items() if n == 0]
        if empty:
            detail = []
            for name in empty:
                bad = sum(1 for p, _ in skipped if p.is_relative_to(root / name))
                detail.append(f"'{name}'" + (f" ({bad} unreadable files)" if bad else ""))
            raise DataError(
                f"Class folder {', '.join(detail)} in {root} has no usable images. "
                "Add images to it or remove the folder."
            )
        data.warnings.extend(_dataset_warnings(counts))
    return data


def _dataset_warnings(counts: dict[str, int]) -> list[str]:
    out = []
    small = {k: v for k, v in counts.items() if v < MIN_PER_CLASS}
    if small:
        out.append(
            "Too few images to split (need at least "
            f"{MIN_PER_CLASS} per class for train/validation/test): "
            + ", ".join(f"{k} ({v})" for k, v in small.items())
        )
    noisy = {k: v for k, v in counts.items() if MIN_PER_CLASS <= v < SMALL_CLASS}
    if noisy:
        out.append(
            f"Small classes (under {SMALL_CLASS} images; metrics on them will be noisy): "
            + ", ".join(f"{k} ({v})" for k, v in noisy.items())
        )
    hi, lo = max(counts.values()), min(counts.values())
    if lo > 0 and hi / lo > IMBALANCE_RATIO:
        big = max(counts, key=counts.__getitem__)
        tiny = min(counts, key=counts.__getitem__)
        out.append(
            f"Classes are imbalanced: '{big}' has {hi} images, '{tiny}' only {lo} "
            f"({hi / lo:.1f}x). graft weights the loss by inverse frequency (--class-weights auto)."
        )
    return out


# --------------------------------------------------------------------------- splitting

SUBSETS = ("train", "val", "test")


def make_split(
    labels: Sequence[int], classes: Sequence[str], test_size: float, val_size: float, seed: int
) -> list[str]:
    """Stratified, shuffled train/val/test assignment, reproducible from ``seed``.

    ``test_size`` and ``val_size`` are fractions of the whole dataset. Returns one subset name
    per image, in the order of ``labels``.
    """
    from sklearn.model_selection import train_test_split

    counts = Counter(labels)
    too_small = [f"'{classes[c]}' ({n})" for c, n in sorted(counts.items()) if n < MIN_PER_CLASS]
    if too_small:
        raise SplitError(
            f"Too few images for a stratified train/validation/test split in: "
            f"{', '.join(too_small)}. Each class needs at least {MIN_PER_CLASS} images "
            "(20 or more gives meaningful numbers). Add images or remove those classes."
        )
    n = len(labels)
    n_classes = len(counts)
    n_test = max(n_classes, math.ceil(test_size * n))
    n_val = max(n_classes, math.ceil(val_size * n))
    if n - n_test - n_val < n_classes:
        raise SplitError(
            f"{n} images are too few to hold out {n_test} for testing and {n_val} for validation "
            f"across {n_classes} classes. Add images, or lower --test-size / --val-size."
        )
    index = np.arange(n)
    y = np.asarray(labels)
    try:
        rest, test = train_test_split(
            index, test_size=n_test, stratify=y, random_state=seed, shuffle=True
        )
        train, val = train_test_split(
            rest, test_size=n_val, stratify=y[rest], random_state=seed, shuffle=True
        )
    except ValueError as exc:
        raise SplitError(f"Could not split the dataset stratified by class: {exc}") from exc
    subset = np.empty(n, dtype=object)
    subset[train], subset[val], subset[test] = "train", "val", "test"
    return [str(s) for s in subset]


def make_group_split(
    labels: Sequence[int],
    groups: Sequence[str],
    classes: Sequence[str],
    test_size: float,
    val_size: float,
    seed: int,
) -> list[str]:
    """Like :func:`make_split`, but every group (e.g. the frames of one animation) lands on
    one side only; classes stay as balanced across the subsets as the groups allow."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(labels)
    g = np.asarray(groups)
    n_groups = len(set(groups))
    k_test = max(2, round(1 / test_size))
    k_val = max(2, round((1 - test_size) / val_size))
    if n_groups < k_test + 1:
        raise SplitError(
            f"Only {n_groups} groups: too few to hold out whole groups for validation and "
            "testing. Use a finer --group-by pattern, or more data."
        )
    index = np.arange(len(y))
    try:
        rest, test = next(
            StratifiedGroupKFold(k_test, shuffle=True, random_state=seed).split(index, y, g)
        )
        train, val = next(
            StratifiedGroupKFold(k_val, shuffle=True, random_state=seed).split(
                rest, y[rest], g[rest]
            )
        )
    except ValueError as exc:
        raise SplitError(f"Could not split the dataset by group: {exc}") from exc
    val = rest[val]
    train = rest[train]
    missing = [classes[c] for c in sorted(set(y.tolist())) if c not in set(y[train].tolist())]
    if missing:
        raise SplitError(
            f"Splitting by group left no training images of: {', '.join(missing)}. Each "
            "class needs images from at least 3 groups (sources)."
        )
    subset = np.empty(len(y), dtype=object)
    subset[train], subset[val], subset[test] = "train", "val", "test"
    return [str(v) for v in subset]


def check_split_sizes(
    subsets: Sequence[str],
    labels: Sequence[int],
    classes: Sequence[str],
    test_size: float,
    val_size: float,
) -> None:
    """Raise :class:`SplitError` unless validation and test each hold between half and 1.5
    times their share, and all but a tenth of the classes keep at least half their share of
    training images. Coarse groups can put a fifth of the data, or most of one class, in one
    cluster, and a split that holds it out measures little and trains on less."""
    n = len(subsets)
    for name, want in (("test", test_size), ("val", val_size)):
        got = sum(s == name for s in subsets) / max(1, n)
        if not (want / 2 <= got <= want * 1.5):
            raise SplitError(
                f"the groups are too coarse: {name} would hold {got:.0%} of the images, "
                f"against {want:.0%} asked for"
            )
    floor = (1 - test_size - val_size) / 2
    per_class = Counter(labels)
    in_train = Counter(c for c, s in zip(labels, subsets, strict=True) if s == "train")
    short = [c for c in sorted(per_class) if in_train[c] < floor * per_class[c]]
    # Among many classes a few whose one animation lands in test are the price of honesty;
    # beyond a tenth of them the split mostly measures how the clusters fell.
    if len(short) > len(per_class) // 10:
        c = short[0]
        raise SplitError(
            f"the groups are too coarse: {len(short)} of {len(per_class)} classes would keep "
            f"under {floor:.0%} of their images for training (e.g. '{classes[c]}': "
            f"{in_train[c]} of {per_class[c]})"
        )


def groups_from_pattern(relpaths: Sequence[str], pattern: str) -> tuple[list[str], int]:
    """The group of each file from a regex on its path relative to the dataset root: the
    first capture group, or the whole match. Unmatched files are groups of their own;
    returns the groups and how many files did not match."""
    regex = re.compile(pattern)
    out, unmatched = [], 0
    for rel in relpaths:
        m = regex.search(rel)
        if m is None:
            unmatched += 1
            out.append(f"file:{rel}")
        else:
            out.append(m.group(1) if regex.groups else m.group(0))
    return out, unmatched


def groups_from_csv(path: Path, relpaths: Sequence[str]) -> tuple[list[str], int]:
    """Groups from a CSV with columns ``path`` (relative to the dataset root) and ``group``."""
    mapping: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"path", "group"} <= set(reader.fieldnames):
            raise DataError(
                f"{path} needs the columns 'path' and 'group' (found {reader.fieldnames})."
            )
        for row in reader:
            mapping[row["path"].strip()] = row["group"].strip()
    out = [mapping.get(rel, f"file:{rel}") for rel in relpaths]
    return out, sum(rel not in mapping for rel in relpaths)


def write_split(
    path: Path, data: ScanResult, subsets: Sequence[str], groups: Sequence[str] | None = None
) -> None:
    from .io import atomic_write_text

    groups = groups or [""] * len(subsets)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "class", "subset", "sha256", "group"])
    rows = zip(data.paths, data.labels, subsets, data.sha256, groups, strict=True)
    for p, label, subset, sha, group in rows:
        writer.writerow([data.relpath(p), data.classes[label], subset, sha, group])
    atomic_write_text(path, buf.getvalue())


def read_split(
    path: Path, root: Path, classes: Sequence[str]
) -> tuple[list[Path], list[int], list[str]]:
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, subsets = [], [], []
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        for row in csv.DictReader(fh):
            paths.append(root / row["path"])
            labels.append(index[row["class"]])
            subsets.append(row["subset"])
    return paths, labels, subsets


# --------------------------------------------------------------------------- transforms


class TrimBackground:
    """A transform: :func:`graft.runtime.trim_background` (a class, so workers can pickle it)."""

    def __call__(self, im: Image.Image) -> Image.Image:
        from .runtime import trim_background

        return trim_background(im)


def build_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: str = "none",
    trim: bool = False,
) -> Callable[[Image.Image], torch.Tensor]:
    """The preprocessing for one image; ``augment`` is only ever used for training images.

    Evaluation resizes the whole image to ``img_size`` x ``img_size`` (as the seed did), so
    nothing at the edges is cropped away. ``trim`` first crops a uniform background to a
    square around the object, for training and prediction alike.
    """
    from torchvision import transforms as T

    if trim:
        inner = build_transform(img_size, mean, std, augment)
        return T.Compose([TrimBackground(), inner])
    size = (img_size, img_size)
    finish = [T.ToTensor(), T.Normalize(mean, std)]
    if augment == "none":
        return T.Compose([T.Resize(size, antialias=True), *finish])
    if augment == "light":
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.75, 1.0), ratio=(0.85, 1.18), antialias=True),
                T.RandomHorizontalFlip(),
                T.RandomRotation(10, fill=255),
                T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
                *finish,
            ]
        )
    if augment == "strong":
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
                T.RandomHorizontalFlip(),
                T.RandAugment(num_ops=2, magnitude=9, fill=[255, 255, 255]),
                T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05),
                *finish,
            ]
        )
    if augment == "domain":
        # For training on one kind of picture (game sprites, studio photos) and predicting
        # another (drawings, phone photos): what changes between sources is scale, colour,
        # sharpness and how the pixels were resampled, so vary exactly those.
        crop = dict(scale=(0.35, 1.0), ratio=(0.8, 1.25), antialias=True)
        nearest = T.InterpolationMode.NEAREST
        return T.Compose(
            [
                T.RandomChoice(
                    [
                        T.RandomResizedCrop(size, **crop),  # smooth, like a drawing
                        T.RandomResizedCrop(size, interpolation=nearest, **crop),  # pixel art
                    ]
                ),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.08)], p=0.8),
                T.RandomGrayscale(p=0.2),
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
        # Seed this image's augmentation without disturbing anyone else's random stream.
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seeds[i])
            random.seed(self.seeds[i])
            tensor = self.transform(image)
        random.setstate(state)
        return tensor, self.labels[i], i

    def subset(self, indices: Sequence[int]) -> ImageFiles:
        pick = list(indices)
        return ImageFiles(
            [self.paths[i] for i in pick],
            [self.labels[i] for i in pick],
            self.transform,
            self.size_hint,
            [self.seeds[i] for i in pick] if self.seeds is not None else None,
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
