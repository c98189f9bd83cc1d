"""Reading a folder of labelled images: scan and decode every file, tell the layouts apart.

The expected layout (one sub-folder per class; nested folders belong to their class)::

    ROOT/
    ├── bulbasaur/
    │   ├── 001.png
    │   └── shiny/002.png
    └── pikachu/
        └── 003.jpg

or the same already split, ROOT/train/<class>/ with val/ and test/ optional, or a labels CSV
(:func:`read_labels_csv`); graft.layouts tells them apart (:func:`open_dataset` takes any).

Accepted extensions (any case): .jpg .jpeg .png .gif .bmp .webp .tif .tiff. Hidden files and
folders (starting with ".") are ignored. Every file is decoded once by :func:`scan`; files that
cannot be decoded are listed with the reason and left out, never a crash.

Torch-free: the transforms, the dataset of files and its loader live in graft.loading, and
are offered here too (``from graft.data import ImageFiles`` imports them, and torch, on first
use), so scanning a folder or reading a run's split costs no torch import.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataError, UsageError
from .files import (  # the decoding reasons are re-exported for graft.serve_requests
    IMAGE_EXTENSIONS,
    decode_error_kind,  # noqa: F401
    describe_decode_error,
    iter_files,
)
from .layouts import (
    check_given,
    class_folders,
    describe_layout,
    detect_layout,
    line_of,
    parse_labels_csv,
    root_notes,
)
from .runtime import load_image

if TYPE_CHECKING:  # what __getattr__ hands out, for type checkers
    from .loading import ImageFiles as ImageFiles
    from .loading import TrimBackground as TrimBackground
    from .loading import build_transform as build_transform
    from .loading import collate_skipping as collate_skipping
    from .loading import default_workers as default_workers
    from .loading import make_loader as make_loader

#: graft.loading's names, still importable from here (where training and older code look)
_LOADING = frozenset(
    {
        "ImageFiles",
        "TrimBackground",
        "build_transform",
        "collate_skipping",
        "default_workers",
        "make_loader",
    }
)


def __getattr__(name: str) -> Any:
    """The torch-dependent names (graft.loading), imported when first asked for."""
    if name in _LOADING:
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


# --------------------------------------------------------------------------- scanning


@dataclass
class ScanResult:
    """The usable images of a dataset (see :func:`scan` and graft.layouts) and what was left
    out."""

    root: Path  # every image lies under it; split.csv's paths are relative to it
    classes: list[str]
    paths: list[Path]  # absolute paths of images that decoded
    labels: list[int]  # index into ``classes``
    sha256: list[str] = field(default_factory=list)  # content hash of each image
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    unsupported: list[Path] = field(default_factory=list)  # files with other extensions
    warnings: list[str] = field(default_factory=list)
    #: the user's own subset of each image ("train", "val" or "test") when the dataset came
    #: split (ROOT/train|val|test/<class>/, or a labels CSV's split column); else None
    given: list[str] | None = None
    #: "class folders", "split folders" or "labels csv" (graft.layouts)
    layout: str = "class folders"
    #: one line saying which layout was found and how many images each part holds
    layout_note: str = ""

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}

    def relpath(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def subset(self, indices: Sequence[int]) -> ScanResult:
        """The images at ``indices`` (same root and classes; nothing left out)."""
        pick = list(indices)
        return ScanResult(
            self.root,
            list(self.classes),
            [self.paths[i] for i in pick],
            [self.labels[i] for i in pick],
            [self.sha256[i] for i in pick],
            given=[self.given[i] for i in pick] if self.given is not None else None,
            layout=self.layout,
        )


def find_classes(root: str | Path) -> tuple[Path, list[str]]:
    """Check the dataset root and return it with its class names (sorted sub-folders)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"Dataset folder not found: {root}. {_LAYOUT_HINT}")
    if not root.is_dir():
        csv_hint = f" For a CSV of labels use --labels-csv {root}." if root.suffix == ".csv" else ""
        raise DataError(f"{root} is a file, not a folder.{csv_hint} {_LAYOUT_HINT}")
    root = root.resolve()
    classes, _ = class_folders(root)
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

    ``root`` holds one folder per class, or is already split: ROOT/train/<class>/ plus any
    of val/ (valid/, validation/) and test/ (graft.layouts; ``given`` then says where each
    image is). ``classes`` fixes the class list (evaluating a run on another folder): folders
    that are not among them are an error naming them. Raises :class:`DataError` when the
    folder cannot be used at all (missing, no class folders, a class without any usable
    image, only unsupported files, split folders next to class folders).
    """
    root, found = find_classes(root)
    layout = detect_layout(root, found, evaluating=classes is not None)
    notes = root_notes(root, class_folders(root)[1]) + layout.notes
    if classes is not None:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(
                f"{root} has class folders the model does not know: {', '.join(unknown)}. "
                f"The model's classes are: {', '.join(classes)}. Rename or remove those folders."
            )
        class_list = list(classes)
    else:
        class_list = layout.classes

    candidates: list[tuple[Path, int, str]] = []
    unsupported: list[Path] = []
    for index, name in enumerate(class_list):
        for subset, part in layout.parts.items():
            folder = part / name
            if not folder.is_dir():
                continue  # a known class absent from an evaluation folder is fine
            for path in iter_files(folder):
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    candidates.append((path, index, subset))
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

    data = read_images(root, class_list, candidates, decode, progress)
    data.unsupported, data.warnings, data.layout = unsupported, notes, layout.kind
    if classes is None:
        _refuse_empty_classes(data, list(layout.parts.values()))
        data.warnings.extend(_dataset_warnings(data.counts))
        data.warnings.extend(check_given(data, layout.fix_train))
    data.layout_note = describe_layout(data, layout.names)
    return data


def read_images(
    root: Path,
    classes: list[str],
    candidates: Sequence[tuple[Path, int, str]],
    decode: bool = True,
    progress: Callable[[Iterable[Path], int, str], Iterable[Path]] | None = None,
) -> ScanResult:
    """Read (and decode) each candidate ``(path, label, subset)`` once: the ones that
    decode, with their content hash, and the ones that do not with the reason. ``subset``
    is the user's own ("" when the dataset is not split)."""
    paths: list[Path] = []
    labels: list[int] = []
    hashes: list[str] = []
    given: list[str] = []
    skipped: list[tuple[Path, str]] = []
    iterator: Iterable[tuple[Path, int, str]] = candidates
    if progress is not None:
        iterator = progress(candidates, len(candidates), "Checking images")  # type: ignore[arg-type]
    for path, label, subset in iterator:
        try:
            if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the read forever
                skipped.append((path, "not a regular file (a pipe, socket or device)"))
                continue
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
        given.append(subset)
    split = any(given)
    return ScanResult(root, classes, paths, labels, hashes, skipped, given=given if split else None)


def _refuse_empty_classes(data: ScanResult, parts: list[Path]) -> None:
    """A class folder without a usable image is an error naming it (and how many of its
    files could not be read)."""
    empty = [name for name, n in data.counts.items() if n == 0]
    if not empty:
        return
    detail = []
    for name in empty:
        folders = [part / name for part in parts]
        bad = sum(1 for p, _ in data.skipped if any(p.is_relative_to(f) for f in folders))
        detail.append(f"'{name}'" + (f" ({bad} unreadable files)" if bad else ""))
    raise DataError(
        f"Class folder {', '.join(detail)} in {data.root} has no usable images. "
        "Add images to it or remove the folder."
    )


def read_labels_csv(
    path: str | Path,
    decode: bool = True,
    progress: Callable[[Iterable[Path], int, str], Iterable[Path]] | None = None,
) -> ScanResult:
    """The images a labels CSV lists (columns ``path``, ``label``, optionally ``split``;
    graft.layouts.parse_labels_csv), rooted at the deepest folder that holds them all (so
    split.csv's paths stay relative). A bad row, or an image that does not decode, is
    listed in ``skipped`` with its line and left out; a label none of whose rows is usable
    is an error naming it."""
    table = parse_labels_csv(path)
    classes = sorted({label for _, label, _, _ in table.good})
    index = {c: i for i, c in enumerate(classes)}
    root = Path(os.path.commonpath([file.parent for file, _, _, _ in table.good]))
    candidates = [(file, index[label], subset) for file, label, subset, _ in table.good]
    data = read_images(root, classes, candidates, decode, progress)
    line = {file: n for file, _, _, n in table.good}
    unread = [(p, f"{table.csv.name} line {line[p]}: {r}") for p, r in data.skipped]
    data.skipped = sorted(table.bad + unread, key=lambda item: line_of(item[1]))
    data.layout = "labels csv"
    empty = [repr(c) for c, n in data.counts.items() if n == 0]
    if empty:
        raise DataError(
            f"No row of {table.csv} labelled {', '.join(empty)} names a readable image. Fix "
            "or remove those rows."
        )
    if data.skipped:
        shown = "; ".join(r + (f" ({p.name})" * (p != table.csv)) for p, r in data.skipped[:3])
        more = f"; and {len(data.skipped) - 3} more" if len(data.skipped) > 3 else ""
        data.warnings.append(
            f"{len(data.skipped)} of the {table.rows} rows of {table.csv.name} are left out: "
            f"{shown}{more}."
        )
    data.warnings.extend(_dataset_warnings(data.counts))
    fix = f"add rows with split 'train' for it to {table.csv.name}"
    data.warnings.extend(check_given(data, fix))
    data.layout_note = describe_layout(data, {}, table.csv.name)
    return data


def open_dataset(
    root: str | Path | None,
    labels_csv: str | Path | None = None,
    progress: Callable[[Iterable[Path], int, str], Iterable[Path]] | None = None,
) -> ScanResult:
    """The images of a dataset given as a folder (``root``, any layout :func:`scan` reads)
    or as a labels CSV (:func:`read_labels_csv`): one of the two."""
    if labels_csv:
        if root is not None and str(root).strip():
            raise UsageError(
                f"Give either a data folder ({root}) or --labels-csv {labels_csv}, not both: "
                "the CSV's paths are taken relative to the CSV's own folder (or absolute)."
            )
        return read_labels_csv(labels_csv, progress=progress)
    if root is None or not str(root).strip():
        raise UsageError("Give the data folder (ROOT) or --labels-csv FILE.")
    return scan(root, progress=progress)


def _dataset_warnings(counts: dict[str, int]) -> list[str]:
    out = []
    if len(counts) == 1:
        out.append(
            f"Only one class ({next(iter(counts))!r}): a classifier needs at least two class "
            "folders; `graft train` will refuse this folder."
        )
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
